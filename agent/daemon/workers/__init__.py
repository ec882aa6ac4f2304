"""This node's worker processes: the keeper that parents them (``keeper``, ``keeper_main``),
starting one (``spawn``, ``prewarm``, ``env``), one round's group (``group``), the node's
workers across rounds (``local``), their output, their failures, and ``/proc``.
"""
