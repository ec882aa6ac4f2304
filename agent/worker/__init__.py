"""What training scripts import: ``from agent.worker import Elastic``.

``agent.worker.checkpoint`` (atomic checkpoints; ``manifest``, ``fence`` and ``choice`` below it)
and ``agent.worker.protocol`` (the names the agent and its workers share) never import torch,
so the agent reads them freely; only the helper (``agent.worker.helper``) does, and it is
imported on first use of its names.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DRAINED_EXIT_CODE", "STATE_FILE", "Elastic", "WorkerConfigError"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from agent.worker import helper  # noqa: PLC0415 - imports torch: only when asked for

        return getattr(helper, name)
    raise AttributeError(f"module 'agent.worker' has no attribute {name!r}")
