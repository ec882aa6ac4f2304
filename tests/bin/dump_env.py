"""Worker: print this worker's whole environment as one JSON line prefixed with ENV."""

import json
import os

print("ENV " + json.dumps(dict(os.environ)), flush=True)
