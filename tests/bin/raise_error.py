"""Worker: raise ValueError. With --error-file, first write a torchelastic-style error file
(the shape torch.distributed.elastic's @record writes), without importing torch."""

import json
import os
import sys
import time
import traceback


def main() -> None:
    raise ValueError("boom at step 42")


if __name__ == "__main__":
    print("about to fail", file=sys.stderr, flush=True)
    try:
        main()
    except ValueError as exc:
        if "--error-file" in sys.argv:
            with open(os.environ["TORCHELASTIC_ERROR_FILE"], "w") as handle:
                json.dump(
                    {
                        "message": {
                            "message": f"{type(exc).__name__}: {exc}",
                            "extraInfo": {
                                "py_callstack": traceback.format_exc(),
                                "timestamp": str(int(time.time())),
                            },
                        }
                    },
                    handle,
                )
        raise
