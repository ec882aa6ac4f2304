"""The etcd client libraries, loaded quietly: every etcd adapter module imports grpc and
the etcd stubs (``etcdrpc``, whose import loads grpc) from here, never directly.

grpc's core prints a failed TLS handshake to stderr at INFO level (reading GRPC_VERBOSITY
once, when it loads); the adapter reports such failures itself, in one line naming what to
fix. The variable is unset again afterwards, so worker processes, which inherit the agent's
environment, keep the user's own setting.
"""

import os

_UNSET = "GRPC_VERBOSITY" not in os.environ
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
import grpc  # noqa: E402
from etcd3 import etcdrpc  # noqa: E402

if _UNSET:
    os.environ.pop("GRPC_VERBOSITY", None)

__all__ = ["etcdrpc", "grpc"]
