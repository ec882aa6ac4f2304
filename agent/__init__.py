"""elastic-agent: keeps long PyTorch training jobs alive on preemptible machines.

Three rooms, one per audience:

- ``agent.daemon``: the per-node daemon (``elastic-agent start``): configuration, the loop,
  worker processes, preemption notices. Never imports torch.
- ``agent.observe``: what operators read: Prometheus metrics, goodput, health endpoints,
  ``elastic-agent status``. Never imports torch.
- ``agent.worker``: what training scripts import (``from agent.worker import Elastic``):
  the helper, atomic checkpoints, and the agent-worker protocol. Only its helper imports torch.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("elastic-agent")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
