"""docs/troubleshooting.md quotes the agent's messages: each quoted fragment must still be
what the code prints, so a reworded message cannot leave the guide describing a line no one
will see. (The doc's lines were captured by running each scenario.)"""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "troubleshooting.md").read_text()
SOURCE = "\n".join(p.read_text() for pkg in ("agent", "rendezvous") for p in (ROOT / pkg).rglob("*.py"))

FRAGMENTS = [
    "must be <= ", "must be 0 (none), 1 (stdout), 2 (stderr) or 3 (both)",
    "not found or not executable", "waiting for etcd at", "did not answer for", "(--etcd-wait)",
    "is already registered in job", "by a live agent (waited", "give this node another --node-id",
    "worker failed: ", "restart budget spent (", "authentication failed (wrong password, or no such",
    "has no permission on", "grant it a role with readwrite on that key prefix", "cannot load the checkpoint rank 0 chose",
    "The checkpoint directory must be shared by every node", "another rank could not load the checkpoint chosen in",
    "reported no progress for", "past its deadline: fencing", "lost our lease", "re-registered with etcd after losing",
    "etcd is out of space (", "could not open the next round yet",
]


@pytest.mark.parametrize("fragment", FRAGMENTS)
def test_the_quoted_message_is_still_printed(fragment: str) -> None:
    assert fragment in DOC, f"docs/troubleshooting.md no longer quotes {fragment!r}"
    assert fragment in SOURCE, f"the agent no longer prints {fragment!r}: update docs/troubleshooting.md"


def test_ten_errors() -> None:
    assert [line.split(".")[0] for line in DOC.splitlines() if line.startswith("## ")] == [
        f"## {n}" for n in range(1, 11)]
