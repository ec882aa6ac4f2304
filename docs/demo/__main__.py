"""``python -m docs.demo``: see the package docstring. Exit codes: 0 the story ran to the end;
1 something went wrong (what it waited for is printed); 130 / 143 stopped by SIGINT / SIGTERM.
Whatever happens, everything it started is stopped by its own pid and the temporary
directory is removed."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from pathlib import Path

from docs.demo import report
from docs.demo.display import LiveDisplay, PlainDisplay
from docs.demo.metrics import Scraper
from docs.demo.nodes import Cluster, Job
from docs.demo.scenario import DemoFailed, Interrupted, Story


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m docs.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--plain", action="store_true", help="a line per update even on a terminal")
    parser.add_argument("--png", type=Path, help="also draw step against time into this PNG (needs matplotlib)")
    parser.add_argument("--restart", action="store_true",
                        help="the process-restart loop (el.step) instead of the in-process one (el.run): a "
                             "membership change restarts the workers, which resume from the last checkpoint")
    parser.add_argument("--sharded", action="store_true",
                        help="train the FSDP2 example (docs/examples/train_fsdp.py: each rank holds only its "
                             "shards, checkpoints through torch.distributed.checkpoint) instead of the DDP one")
    args = parser.parse_args(argv)

    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:  # only records; the story's loop acts
        received.append(signum)
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    job = Job(inprocess=not args.restart, sharded=args.sharded)
    cluster = Cluster(job)
    scraper = Scraper(lambda: {n.node_id: n.metrics_port for n in list(cluster.nodes.values())
                               if n.metrics_port is not None and n.exit_code() is None})
    t0 = time.monotonic()
    live = sys.stdout.isatty() and not args.plain
    display = (LiveDisplay if live else PlainDisplay)(cluster, scraper, t0)
    story = Story(cluster, scraper, display, stop, t0)
    code = 1
    failure = ""
    try:
        scraper.start()
        display.start()
        result = story.run()
        code = 0
    except Interrupted:
        code = 128 + received[0]
    except DemoFailed as exc:
        failure = str(exc)
    finally:
        scraper.stop()
        display.close()
        started = list(cluster.started_pids)
        stragglers = cluster.close()
    out = display.print
    if code == 0:
        steps = list(cluster.steps)
        out()
        for line in report.summary(job, result, steps):
            out(line)
        out()
        for line in report.text_chart(result, steps, job.steps):
            out(line)
        if args.png:
            out(report.png_chart(result, steps, args.png))
    elif failure:
        out(f"demo failed: {failure}")
    else:
        out(f"interrupted ({signal.Signals(received[0]).name}): stopped everything")
    out(f"stopped what it started (pids {', '.join(map(str, started))})"
        + (f" and {len(stragglers)} leftover processes ({', '.join(map(str, stragglers))})" if stragglers else "")
        + f"; removed {cluster.root}")
    return code


if __name__ == "__main__":
    sys.exit(main())
