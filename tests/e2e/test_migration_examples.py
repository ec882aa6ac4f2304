"""docs/migrating.md's examples run under the agent as a user would start them: real
`elastic-agent start`, one etcd, two agents on 127.0.0.1, gloo on CPU. Each must train (the
ranks end with the same weights, checked inside the example) and every agent must exit 0."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from rendezvous.etcd.server import EtcdServer
from tests.e2e.harness import PYTHON, REPO, Cluster

EXAMPLES = REPO / "docs" / "examples"
STEPS = 8

pytestmark = pytest.mark.e2e

# (example and its arguments, workers per agent, extra agent flags, what global rank 0 prints at the end)
CASES = [
    ("torchrun_ddp.py", 1, [], "torchrun: trained 8 steps, world size 2"),
    ("launch_local_rank.py", 2, ["--local-rank-arg"], "launch: trained 8 steps, world size 4"),
    ("apex_local_rank.py --local_rank=${local_rank}", 2, [], "apex: trained 8 steps, world size 4"),
    ("mp_spawn.py", 1, [], "mp.spawn: trained 8 steps, world size 2"),
    ("accelerate_train.py", 1, [], "accelerate: trained 8 steps, world size 2"),
    ("fabric_train.py", 1, [], "fabric: trained 8 steps, world size 2"),
]


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    server = EtcdServer(data_dir=str(tmp_path_factory.mktemp("etcd"))).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize(("script", "nproc", "extra", "done"), CASES,
                         ids=[c[0].split()[0].removesuffix(".py") for c in CASES])
def test_the_example_trains_and_every_agent_exits_0(etcd: EtcdServer, script: str, nproc: int, extra: list[str],
                                                     done: str) -> None:
    script, *args = script.split()
    job = "migrate-" + script.removesuffix(".py").replace("_", "-")
    with Cluster(job_id=job, endpoints=etcd.endpoint) as cluster:
        agents = [cluster.start_agent(f"node-{n}", min_nodes=2, max_nodes=2, nproc=nproc, extra=extra,
                                      command=[PYTHON, str(EXAMPLES / script), *args, "--steps", str(STEPS)])
                  for n in range(2)]
        codes = [agent.wait(timeout=90) for agent in agents]
        text = "\n".join(agent.text() for agent in agents)
        assert codes == [0, 0], text[-4000:]
        assert re.search(rf"^\[node-[01]/0\] {re.escape(done)}, loss ", text, re.M), text[-4000:]  # global rank 0
        assert "Traceback" not in text, text[-4000:]
