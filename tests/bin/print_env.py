"""Worker: print the torchrun contract variables as one JSON line, and a line on stderr."""

import json
import os
import sys

NAMES = [
    "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
    "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_ERROR_FILE", "ELASTIC_AGENT_NODE_ID",
]
print(json.dumps({name: os.environ.get(name) for name in NAMES}), flush=True)
print(f"stderr from rank {os.environ.get('RANK')}", file=sys.stderr, flush=True)
