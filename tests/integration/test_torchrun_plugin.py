"""torchrun's RendezvousHandler contract, run against the etcd-v3 plug-in on a real etcd.

What a backend must do, from torch's own suites (test/distributed/elastic/rendezvous/
dynamic_rendezvous_test.py, out_of_tree_rendezvous_test.py) and from how torchrun's agent
(torch/distributed/elastic/agent/server/api.py) calls it: found through the
``torchrun.handlers`` entry point; every node joins with a distinct rank; a round's store is
shared, prefixed per round and blocks with timeouts; calling next_rendezvous again moves to the
next round; a join times out; nodes beyond max wait and are let in when a member goes or the
world can grow (num_nodes_waiting); set_closed/is_closed/shutdown close the rendezvous; bad
settings are one line naming the key. Handlers come from torch's registry, as torchrun gets them.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist
from torch.distributed.elastic.agent.server.api import _TERMINAL_STATE_SYNC_ID
from torch.distributed.elastic.rendezvous import (
    RendezvousClosedError,
    RendezvousGracefulExitError,
    RendezvousParameters,
    RendezvousTimeoutError,
    registry,
    rendezvous_handler_registry,
)
from torch.distributed.elastic.utils import store as store_util

from rendezvous.etcd.server import EtcdServer
from rendezvous.etcd.store import EtcdStore
from rendezvous.settings import Settings
from rendezvous.state import JobStatus, Outcome
from rendezvous.torchrun import plugin as torchrun_plugin
from rendezvous.torchrun.c10d_store import EtcdC10dStore
from tests.conftest import torchrun_env, wait_until

HANG_S = 30.0
FAST = {"lease_ttl": "3", "presence_ttl": "2", "last_call": "0.2", "scale_up_cooldown": "0.2", "timeout": "20"}

Make = Callable[..., Any]


@pytest.fixture
def make(etcd: EtcdServer, job_id: str) -> Iterator[Make]:
    """Handlers through torch's registry; each leaves (without closing the job) at the end."""
    made: list[Any] = []

    def create(min_nodes: int = 2, max_nodes: int = 2, **conf: str) -> Any:
        params = RendezvousParameters(backend="etcd-v3", endpoint=etcd.endpoint, run_id=job_id, min_nodes=min_nodes,
                                      max_nodes=max_nodes, local_addr="127.0.0.1", **{**FAST, **conf})
        handler = registry.get_rendezvous_handler(params)
        made.append(handler)
        return handler

    yield create
    for handler in made:
        handler.core.release(timeout=HANG_S)


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=4) as executor:
        yield executor


def rendezvous(pool: ThreadPoolExecutor, *handlers: Any) -> list[Any]:
    """next_rendezvous on every handler at once; their RendezvousInfo, in order."""
    futures = [pool.submit(h.next_rendezvous) for h in handlers]
    return [f.result(timeout=HANG_S) for f in futures]


def status(etcd: EtcdServer, job_id: str) -> JobStatus | None:
    store = EtcdStore(etcd.endpoint)
    try:
        kv, _ = store.get(Settings(job_id=job_id, min_nodes=1, max_nodes=1).status_key)
        return JobStatus.decode(kv.key, kv.value) if kv else None
    finally:
        store.close()


def die(handler: Any) -> None:
    """As kill -9 of its torchrun: nothing revoked, its leases run out."""
    handler.core.participant.close()


# --- found and built as torchrun finds and builds it --------------------------------------------
def test_the_entry_point_registers_etcd_v3_with_torch() -> None:
    (point,) = [p for p in importlib.metadata.entry_points(group="torchrun.handlers") if p.name == "etcd-v3"]
    assert point.value == "rendezvous.torchrun.plugin:create_handler"
    assert point.load()() is torchrun_plugin.handler_for_torchrun
    registry._register_out_of_tree_handlers()  # torch may register twice: the same creator is accepted
    assert rendezvous_handler_registry._registry["etcd-v3"] is torchrun_plugin.handler_for_torchrun
    assert torchrun_plugin.EXIT_BARRIER_DONE == f"{_TERMINAL_STATE_SYNC_ID}/last_member"


def test_handler_identity(make: Make, job_id: str) -> None:
    handler = make()
    assert handler.get_backend() == "etcd-v3" and handler.get_run_id() == job_id
    assert handler.use_agent_store is False  # workers start their own TCPStore at MASTER_ADDR:MASTER_PORT
    assert handler.num_nodes_waiting() == 0 and handler.is_closed() is False


# --- rounds ---------------------------------------------------------------------------------------
def test_all_nodes_join_with_distinct_ranks_and_share_a_store_per_round(make: Make, pool: ThreadPoolExecutor) -> None:
    a, b = make(), make()
    first = rendezvous(pool, a, b)
    assert sorted(i.rank for i in first) == [0, 1] and {i.world_size for i in first} == {2}
    assert first[0].bootstrap_store_info == first[1].bootstrap_store_info
    assert first[0].bootstrap_store_info.master_addr == "127.0.0.1"  # group rank 0's --local-addr
    for info in first:
        assert isinstance(info.store, dist.Store) and isinstance(info.store, EtcdC10dStore)
        assert not isinstance(info.store, dist.TCPStore)
    first[0].store.set("k", "from a")
    assert first[1].store.get("k") == b"from a"

    again = rendezvous(pool, a, b)  # torchrun calls again after its workers failed: the next round
    assert [i.rank for i in again] == [i.rank for i in first]  # ranks are stable
    assert again[0].store.keys.round_number == first[0].store.keys.round_number + 1
    assert again[1].store.check(["k"]) is False  # a fresh prefix per round


def test_a_join_times_out(make: Make) -> None:
    lone = make(min_nodes=2, max_nodes=2, timeout="1")
    began = time.monotonic()
    with pytest.raises(RendezvousTimeoutError):
        lone.next_rendezvous()
    assert time.monotonic() - began < 10


def test_nodes_beyond_max_wait_and_time_out(make: Make, pool: ThreadPoolExecutor) -> None:
    a, b = make(), make()
    rendezvous(pool, a, b)
    extra = make(timeout="1.5")
    with pytest.raises(RendezvousTimeoutError):
        extra.next_rendezvous()
    assert a.num_nodes_waiting() == 0  # the world is at max: no reason to restart
    assert not a.is_closed()  # and a standby that gave up did not close the job
    extra.shutdown()
    assert not a.is_closed()


def test_a_standby_exits_gracefully_when_the_job_succeeds(make: Make, pool: ThreadPoolExecutor) -> None:
    a, b = make(), make()
    infos = rendezvous(pool, a, b)
    standby = make(timeout=str(HANG_S))
    waiting: Future[Any] = pool.submit(standby.next_rendezvous)
    wait_until(lambda: standby.core.participant.current_round is not None, 10, "the standby registered")
    for barrier in [pool.submit(store_util.barrier, i.store, 2, _TERMINAL_STATE_SYNC_ID, 10) for i in infos]:
        barrier.result(timeout=HANG_S)
    assert a.shutdown() is True  # the job succeeded: the standby has nothing to wait for, and did not fail
    with pytest.raises(RendezvousGracefulExitError, match="job already succeeded"):
        waiting.result(timeout=HANG_S)
    with pytest.raises(RendezvousGracefulExitError, match="job already succeeded"):
        make().next_rendezvous()  # arriving after the end (torch's test_launch_elastic_multiple_agents): no failure


def test_a_node_arriving_after_the_job_failed_finds_it_closed(make: Make, pool: ThreadPoolExecutor) -> None:
    a, b = make(), make()
    rendezvous(pool, a, b)
    assert a.shutdown() is True  # before the exit barrier: the job failed
    with pytest.raises(RendezvousClosedError) as late:
        make().next_rendezvous()
    assert not isinstance(late.value, RendezvousGracefulExitError)


def test_a_standby_takes_the_place_of_a_member_that_died(make: Make, pool: ThreadPoolExecutor) -> None:
    a, b = make(1, 2), make(1, 2)
    infos = rendezvous(pool, a, b)
    first, second = sorted(zip(infos, (a, b)), key=lambda pair: pair[0].rank)
    first[0].store.set("written-by-rank-0", "v")
    standby = make(1, 2)
    waiting: Future[Any] = pool.submit(standby.next_rendezvous)
    die(first[1])  # group rank 0's node goes: its store and its keys stay in etcd
    assert second[0].store.get("written-by-rank-0") == b"v"
    wait_until(lambda: second[1].num_nodes_waiting() > 0, 15, "the survivor told to rendezvous again")
    mine = second[1].next_rendezvous()
    theirs = waiting.result(timeout=HANG_S)
    assert (mine.rank, theirs.rank, mine.world_size) == (0, 1, 2)


def test_a_waiting_node_grows_the_job_through_num_nodes_waiting(make: Make, pool: ThreadPoolExecutor) -> None:
    a, b = make(2, 3), make(2, 3)
    ranks = {id(h): i.rank for h, i in zip((a, b), rendezvous(pool, a, b))}
    newcomer = make(2, 3)
    joining: Future[Any] = pool.submit(newcomer.next_rendezvous)
    # torchrun's monitor loop asks every member; group rank 0 lets the newcomer in.
    wait_until(lambda: a.num_nodes_waiting() + b.num_nodes_waiting() == 2, 15, "both members told to grow")
    grown = rendezvous(pool, a, b)
    assert [i.rank for i in grown] == [ranks[id(a)], ranks[id(b)]]
    assert joining.result(timeout=HANG_S).rank == 2 and grown[0].world_size == 3


def test_worker_failures_spend_the_job_wide_budget(make: Make, pool: ThreadPoolExecutor, etcd: EtcdServer,
                                                   job_id: str) -> None:
    a, b = make(max_restarts="1"), make(max_restarts="1")
    rendezvous(pool, a, b)

    def a_workers_fail() -> Future[Any]:  # torchrun on a calls again; b hears of it from num_nodes_waiting
        retry = pool.submit(a.next_rendezvous)
        wait_until(lambda: b.num_nodes_waiting() > 0, 15, "b told to rendezvous again")
        return retry

    retry = a_workers_fail()
    rendezvous(pool, b)
    retry.result(timeout=HANG_S)
    assert not a.is_closed()  # the first failure is within the budget of 1

    retry = a_workers_fail()
    with pytest.raises(RendezvousClosedError, match="restart budget spent"):
        b.next_rendezvous()
    with pytest.raises(RendezvousClosedError, match="restart budget spent"):
        retry.result(timeout=HANG_S)
    assert status(etcd, job_id).outcome == Outcome.FAILED


# --- closing ------------------------------------------------------------------------------------
def test_set_closed_closes_for_everyone_and_can_be_repeated(make: Make, pool: ThreadPoolExecutor) -> None:
    a, b = make(), make()
    rendezvous(pool, a, b)
    a.set_closed()
    a.set_closed()
    assert a.is_closed() and b.is_closed()
    with pytest.raises(RendezvousClosedError):
        b.next_rendezvous()
    with pytest.raises(RendezvousClosedError):
        make().next_rendezvous()  # a node arriving late finds the job over


def test_shutdown_after_the_exit_barrier_records_success(make: Make, pool: ThreadPoolExecutor, etcd: EtcdServer,
                                                         job_id: str) -> None:
    a, b = make(), make()
    infos = rendezvous(pool, a, b)
    # What torchrun's agents do once their workers all exited 0, then launch_agent's shutdown.
    barriers = [pool.submit(store_util.barrier, i.store, 2, _TERMINAL_STATE_SYNC_ID, 10) for i in infos]
    for barrier in barriers:
        barrier.result(timeout=HANG_S)
    assert a.shutdown() is True and a.shutdown() is True
    assert b.is_closed() and b.shutdown() is True
    recorded = status(etcd, job_id)
    assert recorded.outcome == Outcome.SUCCEEDED and "exit barrier" in recorded.reason


def test_shutdown_before_the_exit_barrier_records_failure(make: Make, pool: ThreadPoolExecutor, etcd: EtcdServer,
                                                          job_id: str) -> None:
    a, b = make(), make()
    rendezvous(pool, a, b)
    assert a.shutdown() is True
    assert b.is_closed() and status(etcd, job_id).outcome == Outcome.FAILED


# --- the store ------------------------------------------------------------------------------------
def test_the_store_keeps_torchs_semantics(make: Make, pool: ThreadPoolExecutor) -> None:
    one, two = (i.store for i in rendezvous(pool, make(), make()))
    assert one.add("n", 2) == 2 and two.add("n", 3) == 5 and one.get("n") == b"5"
    assert one.compare_set("cs", "", "v") == b"v"  # absent and nothing expected: written
    assert one.compare_set("cs", "x", "y") == b"v"  # not what was expected: the current value
    assert two.compare_set("cs", "v", "w") == b"w" and one.compare_set("absent", "x", "y") == b"x"
    one.multi_set(["m1", "m2"], ["1", "2"])
    assert two.multi_get(["m1", "m2"]) == [b"1", b"2"]
    one.append("log", "a")
    one.append("log", "b")
    assert two.get("log") == b"ab"
    assert one.check(["m1", "m2"]) and not one.check(["m1", "nope"])
    assert one.delete_key("m1") is True and one.delete_key("m1") is False
    assert one.num_keys() == two.num_keys() == 4  # n, cs, m2, log: counted under this round's prefix
    prefixed = dist.PrefixStore("torchelastic", two)  # C++ callers reach the Python methods
    prefixed.set("x", b"1")
    assert one.get("torchelastic/x") == b"1"

    later = threading.Timer(0.3, lambda: two.set("late", "z"))
    later.start()
    began = time.monotonic()
    assert one.get("late") == b"z"  # get blocks, on a watch, until the key is set
    assert 0.2 < time.monotonic() - began < 5
    began = time.monotonic()
    with pytest.raises(dist.DistStoreError, match="not set within"):
        one.wait(["never"], timedelta(seconds=0.5))
    assert 0.4 < time.monotonic() - began < 5
    with store_util.store_timeout(one, 0.3), pytest.raises(dist.DistStoreError):
        one.get("never")  # torch's barriers set the timeout this way


def test_a_wait_ends_when_its_round_is_over(make: Make, pool: ThreadPoolExecutor) -> None:
    a, b = make(), make()
    infos = rendezvous(pool, a, b)
    etcd_requests = a.core.store.requests
    watches = etcd_requests.snapshot().get("watch_create", 0)
    waiting: Future[Any] = pool.submit(infos[0].store.get, "never-written")
    wait_until(lambda: etcd_requests.snapshot().get("watch_create", 0) >= watches + 2, 10, "the wait watching")
    retry: Future[Any] = pool.submit(b.next_rendezvous)  # b's workers failed: round 2 opens
    with pytest.raises(dist.DistStoreError, match="round 1 is over"):
        waiting.result(timeout=HANG_S)
    wait_until(lambda: a.num_nodes_waiting() > 0, 15, "a told to rendezvous again")
    rendezvous(pool, a)
    retry.result(timeout=HANG_S)


# --- bad input --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("conf", "named"), [
    ({"lease_ttl": "abc"}, "lease_ttl=abc: expected a number of seconds"),
    ({"lease_ttl": "1"}, "--rdzv-conf lease_ttl (1.0) must be >= 2 seconds"),
    ({"lease_ttl": "3", "presence_ttl": "4"}, "--rdzv-conf presence_ttl (4.0) must be >= 2 seconds and <= the lease ttl"),
    ({"max_restarts": "-1"}, "max_restarts=-1: expected a whole number >= 0"),
    ({"timeout": "0"}, "timeout=0: expected a number of seconds > 0"),
    ({"lease_tll": "5"}, "lease_tll=5: unknown key"),
    ({"last_call": "1", "last_call_timeout": "2"}, "last_call_timeout and last_call are the same setting"),
    ({"cacert": "/nonexistent/ca.pem"}, "--rdzv-conf cacert (/nonexistent/ca.pem): cannot read"),
    ({"cert": "/tmp/c.pem"}, "--rdzv-conf cert (/tmp/c.pem) needs --rdzv-conf key too"),
])
def test_a_bad_rdzv_conf_value_is_one_line_naming_the_key(etcd: EtcdServer, job_id: str, capsys: Any,
                                                          conf: dict[str, str], named: str) -> None:
    params = RendezvousParameters(backend="etcd-v3", endpoint=etcd.endpoint, run_id=job_id, min_nodes=1,
                                  max_nodes=2, **conf)
    with pytest.raises(torchrun_plugin.PluginConfigError) as raised:  # a library raises; only the CLI exits
        registry.get_rendezvous_handler(params)
    assert named in str(raised.value) and "\n" not in str(raised.value), str(raised.value)
    assert capsys.readouterr().err == ""


def test_elastic_launch_in_a_process_raises_on_a_bad_setting_and_never_exits(etcd: EtcdServer, job_id: str,
                                                                           tmp_path: Path, monkeypatch: Any) -> None:
    import tempfile

    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # elastic_launch makes its torchelastic_* log directory in the temp dir and never removes it.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=1, run_id=job_id, rdzv_backend="etcd-v3",
                          rdzv_endpoint=etcd.endpoint, rdzv_configs={"lease_ttl": "soon"}, max_restarts=0)
    with pytest.raises(torchrun_plugin.PluginConfigError, match="--rdzv-conf lease_ttl=soon"):
        elastic_launch(config, print)("never runs")


def test_quotes_left_around_rdzv_conf_are_taken_off() -> None:
    # --rdzv-conf='join_timeout=5,last_call_timeout=1,timeout=5' as one argv element (torch's
    # own launcher tests): torch's parser keeps the quotes on the first key and the last value.
    params = RendezvousParameters(backend="etcd-v3", endpoint="127.0.0.1:2379", run_id="job", min_nodes=1,
                                  max_nodes=2, **{"'join_timeout": "5", "last_call_timeout": "1"})
    params.config["timeout"] = "5'"
    config = torchrun_plugin.parse_config(params)
    assert (config.join_timeout, config.settings.last_call) == (5.0, 1.0)


def test_c10d_only_keys_are_ignored_with_a_warning(caplog: Any) -> None:
    params = RendezvousParameters(backend="etcd-v3", endpoint="127.0.0.1:2379", run_id="job", min_nodes=1,
                                  max_nodes=2, is_host="true", keep_alive_interval="1", last_call_timeout="2")
    config = torchrun_plugin.parse_config(params)
    assert config.settings.last_call == 2.0
    ignored = sorted(r.getMessage().split()[1] for r in caplog.records if "is ignored" in r.getMessage())
    assert ignored == ["is_host", "keep_alive_interval"]


@pytest.mark.parametrize(("endpoint", "run_id", "named"), [
    ("", "job", "--rdzv-endpoint (''): etcd endpoints must be host:port"),
    ("etcd-0:notaport", "job", "--rdzv-endpoint ('etcd-0:notaport'): etcd endpoint 'etcd-0:notaport'"),
    ("127.0.0.1:2379", "bad id!", "--rdzv-id ('bad id!') must be"),
])
def test_a_bad_endpoint_or_run_id_is_named(endpoint: str, run_id: str, named: str) -> None:
    params = RendezvousParameters(backend="etcd-v3", endpoint=endpoint, run_id=run_id, min_nodes=1, max_nodes=2)
    with pytest.raises(torchrun_plugin.PluginConfigError) as exc_info:
        torchrun_plugin.parse_config(params)
    assert str(exc_info.value).startswith(named), str(exc_info.value)


def test_torchrun_itself_prints_one_line_and_exits_2(etcd: EtcdServer, job_id: str, tmp_path: Path) -> None:
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    out = subprocess.run([torchrun, "--nnodes", "1:2", "--rdzv-backend", "etcd-v3", "--rdzv-endpoint", etcd.endpoint,
                          "--rdzv-id", job_id, "--rdzv-conf", "lease_ttl=soon", "-m", "this_never_runs"],
                         capture_output=True, text=True, timeout=120,
                         env=torchrun_env(dict(os.environ), tmp_path))
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    assert out.stderr.strip().splitlines()[-1] == (
        "torchrun --rdzv-backend etcd-v3: --rdzv-conf lease_ttl=soon: expected a number of seconds >= 0")


def test_agents_finishing_apart_with_a_zero_exit_barrier_timeout_both_succeed(etcd: EtcdServer, job_id: str,
                                                                              tmp_path: Path) -> None:
    # torch's test_workers_drift_fail shape: two agents, one worker each, finishing apart (8 s
    # here, so the first one's leaving is surely seen), exit_barrier_timeout=0. The first
    # leaves at once; the second must neither restart its healthy workers for the node that
    # left nor wait for it in a new round (it hung until killed at 450 s).
    script = str(Path(__file__).resolve().parents[1] / "bin" / "torchrun_agent_once.py")
    env = torchrun_env(dict(os.environ), tmp_path)
    procs = [subprocess.Popen([sys.executable, script, etcd.endpoint, job_id, sleep_s, "0"], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
             for sleep_s in ("0", "8")]
    outs = []
    try:
        for proc in procs:
            outs.append(proc.communicate(timeout=90)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait()
    for proc, out in zip(procs, outs):
        assert proc.returncode == 0 and "agent result: SUCCEEDED" in out, out[-3000:]
    assert "restarts its workers" not in outs[1], outs[1][-3000:]
    recorded = status(etcd, job_id)
    assert recorded is not None and recorded.outcome == Outcome.SUCCEEDED, recorded
