"""The default node id survives an agent restart on the same host (agent.daemon.config.node_identity):
kept per (host, job) in a node-local file, distinct for two agents running at once, and an
explicit --node-id is used as given. Real processes hold the file locks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from agent.daemon.config.layers import load_config

ARGV = ["--etcd-endpoints", "127.0.0.1:2379", "--job-id", "j", "--", "python", "train.py"]


def node_id_of_a_new_agent(id_dir: Path, argv: list[str] = ARGV) -> str:
    """The node id an agent started now (and gone when this returns) would take."""
    code = ("import sys; from pathlib import Path; from agent.daemon.config.layers import load_config; "
            "print(load_config(sys.argv[2:], {}, hostname=lambda: 'host-a', id_dir=Path(sys.argv[1])).node_id)")
    out = subprocess.run([sys.executable, "-c", code, str(id_dir), *argv], capture_output=True, text=True,
                         timeout=60, check=True)
    return out.stdout.strip()


def test_a_restarted_agent_on_the_same_host_keeps_its_node_id(tmp_path):
    first = node_id_of_a_new_agent(tmp_path)
    assert first.startswith("host-a-") and len(first) == len("host-a-") + 6  # DESIGN section 2's form
    assert node_id_of_a_new_agent(tmp_path) == first
    other_job = node_id_of_a_new_agent(tmp_path, [a if a != "j" else "k" for a in ARGV])
    assert other_job != first


def test_two_agents_of_one_job_running_on_one_host_get_distinct_ids(tmp_path):
    running = load_config(ARGV, {}, hostname=lambda: "host-a", id_dir=tmp_path).node_id  # holds its slot
    assert node_id_of_a_new_agent(tmp_path) != running


def test_an_explicit_node_id_is_used_as_given_and_keeps_nothing(tmp_path):
    assert load_config(["--node-id", "n7", *ARGV], {}, id_dir=tmp_path / "ids").node_id == "n7"
    assert not (tmp_path / "ids").exists()

