"""Worker: print how it was invoked (argv, __name__, sys.path[0], cwd, a variable) as JSON."""

import json
import os
import sys

print(json.dumps({
    "ppid": os.getppid(), "argv": sys.argv, "name": __name__, "path0": sys.path[0], "cwd": os.getcwd(),
    "rank": os.environ.get("RANK"), "torch_loaded": "torch" in sys.modules,
}), flush=True)
print("to stderr", file=sys.stderr, flush=True)
sys.exit(int(os.environ.get("EXIT_WITH", "0")))
