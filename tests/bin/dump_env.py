"""Worker: print this worker's whole environment as one JSON line prefixed with ENV.

One write(2) for the whole line: the workers share the launcher's stdout, and print() writes
the text and its newline separately, so two workers' lines could run together."""

import json
import os

os.write(1, ("ENV " + json.dumps(dict(os.environ)) + "\n").encode())
