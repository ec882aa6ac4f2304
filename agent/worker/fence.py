"""The fence file of a checkpoint directory: the newest round that has loaded from it. No torch.

``<dir>/fence.json`` holds ``{"v": 1, "round": N}``. Global rank 0 of round N raises it to N
once it has chosen the checkpoint its round resumes from; a save of an older round is then
refused (``agent.worker.checkpoint.save``), even before round N wrote a checkpoint of its own.
So a worker fenced off by the agent that saves late, in its grace period, can neither become
the checkpoint the next round loads nor push a newer one out through ``keep_last``.

The fence only goes up: a lower round never replaces a higher one. It is written like a
manifest (temporary name, fsync, rename, fsync of the directory). A fence file that cannot be
read or parsed is logged as a warning that names it and counts as no fence; the next raise
replaces it. Two rounds raising at the same instant could still race (read, then rename);
the agent never runs two rounds' workers at once beyond its stop grace period, and complete
checkpoints fence by their own round as well.
"""

from __future__ import annotations

import json
from pathlib import Path

from agent.worker.manifest import log, write_json

FENCE_FILE = "fence.json"
FENCE_VERSION = 1


def fence_path(directory: Path) -> Path:
    return directory / FENCE_FILE


def read_fence(directory: Path) -> int | None:
    """The round the fence file names; None when there is none or it is unusable (warned)."""
    path = fence_path(directory)
    try:
        document = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("checkpoint fence file %s cannot be read (%s); ignored", path, exc.strerror)
        return None
    except (ValueError, RecursionError) as exc:  # RecursionError: "[[[[..." nested too deep
        log.warning("checkpoint fence file %s is not valid JSON (%s); ignored", path, exc)
        return None
    round_number = document.get("round") if isinstance(document, dict) else None
    if (
        not isinstance(document, dict)
        or document.get("v") != FENCE_VERSION
        or isinstance(round_number, bool)
        or not isinstance(round_number, int)
    ):
        log.warning("checkpoint fence file %s must hold {\"v\": %d, \"round\": <integer>}, found %.200r; ignored",
                    path, FENCE_VERSION, document)
        return None
    return round_number


def raise_fence(directory: Path, round_number: int) -> int:
    """Record ``round_number`` unless the fence already names it or a newer round; return the
    round the fence names afterwards."""
    current = read_fence(directory)
    if current is not None and current >= round_number:
        return current
    directory.mkdir(parents=True, exist_ok=True)
    write_json(fence_path(directory), {"v": FENCE_VERSION, "round": round_number})
    return round_number
