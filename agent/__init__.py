"""elastic-agent: keeps long PyTorch training jobs alive on preemptible machines.

Three rooms, one per audience, over the vocabulary two of them share:

- ``agent.daemon``: the per-node daemon (``elastic-agent start``): the loop and its decisions,
  with its configuration (``config``), worker processes (``workers``) and connection
  (``connection``) in folders of their own. Never imports torch.
- ``agent.observe``: what operators read: Prometheus metrics, goodput, health endpoints,
  ``elastic-agent status``. Never imports torch, nor the daemon.
- ``agent.common``: the states and progress records both of them use.
- ``agent.worker``: what training scripts import (``from agent.worker import Elastic``):
  the helper, atomic checkpoints, and the agent-worker protocol. Only its helper imports torch.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("elastic-agent")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
