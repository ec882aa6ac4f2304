"""agent.preemption over real HTTP against the fake metadata server on 127.0.0.1."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.daemon.preemption import (
    METADATA_URL_ENV,
    AwsSource,
    AzureSource,
    GcpSource,
    Notice,
    PreemptionWatcher,
    http_fetch,
    make_source,
)
from rendezvous.net import free_port
from tests.fakes.metadata_server import MetadataServer, remote

ROOT = Path(__file__).resolve().parents[2]
WAIT_S = 5.0
SPOT_ACTION = "/latest/meta-data/spot/instance-action"


@pytest.fixture
def server() -> Iterator[MetadataServer]:
    with MetadataServer(vm_name="vm-1") as fake:
        yield fake


@pytest.mark.parametrize("cloud", ["aws", "gcp", "azure"])
def test_each_source_sees_nothing_then_the_armed_notice(server: MetadataServer, cloud: str) -> None:
    source = make_source(cloud, server.url, env={})
    assert source is not None
    assert source.check() is None
    assert source.check() is None
    before = time.monotonic()
    server.preempt(cloud, in_seconds=30)
    notice = source.check()
    after = time.monotonic()
    assert notice is not None and notice.source == cloud
    # AWS writes whole seconds, hence the slack; GCP's 30 s is the cloud's fixed lead.
    assert notice.deadline is not None and before + 28.5 <= notice.deadline <= after + 30.5


def test_aws_uses_a_token_and_the_fake_refuses_requests_without_one(server: MetadataServer) -> None:
    reply = http_fetch("GET", server.url + SPOT_ACTION, {}, 1.0)
    assert reply is not None and reply.status == 401
    server.preempt("aws", in_seconds=120, action="stop")
    notice = AwsSource(server.url).check()
    assert notice is not None and "stop" in notice.detail
    spot = [r for r in server.requests() if r.path == SPOT_ACTION]
    assert spot[0].header("X-aws-ec2-metadata-token") is None  # our bare probe above
    assert spot[1].header("X-aws-ec2-metadata-token")  # the source's
    put = next(r for r in server.requests() if r.path == "/latest/api/token")
    assert (put.method, put.header("X-aws-ec2-metadata-token-ttl-seconds")) == ("PUT", "21600")


def test_aws_gets_a_new_token_after_the_old_one_is_refused(server: MetadataServer) -> None:
    source = AwsSource(server.url)
    assert source.check() is None
    server.revoke_tokens()
    server.preempt("aws", in_seconds=60)
    assert source.check() is not None
    assert [r.path for r in server.requests()] == [
        "/latest/api/token", SPOT_ACTION, SPOT_ACTION, "/latest/api/token", SPOT_ACTION]


def test_azure_ignores_a_preempt_for_another_vm(server: MetadataServer) -> None:
    source = AzureSource(server.url)
    server.preempt("azure", in_seconds=45, resources=["vm-2"])
    assert source.check() is None
    server.preempt("azure", in_seconds=45)
    notice = source.check()
    assert notice is not None and notice.source == "azure"


@pytest.mark.parametrize(("cloud", "path"), [
    ("aws", SPOT_ACTION), ("gcp", "/computeMetadata/v1/instance/preempted"), ("azure", "/metadata/scheduledevents")])
@pytest.mark.parametrize("body", [b"", b"{not json", b"\x00\xff", b"TRUE TRUE"])
def test_garbled_answers_are_no_notice(server: MetadataServer, cloud: str, path: str, body: bytes) -> None:
    server.override(path, 200, body)
    source = make_source(cloud, server.url, env={})
    assert source is not None and source.check() is None


@pytest.mark.parametrize(("clouds", "expected"), [
    (("aws",), AwsSource), (("gcp",), GcpSource), (("azure",), AzureSource), (("gcp", "azure", "aws"), AwsSource)])
def test_auto_picks_the_cloud_that_answers(clouds: tuple[str, ...], expected: type) -> None:
    with MetadataServer(clouds) as fake:
        source = make_source("auto", env={METADATA_URL_ENV: fake.url})
        assert isinstance(source, expected)
        assert source.check() is None
        fake.preempt(clouds[0] if expected is not AwsSource else "aws")
        assert source.check() is not None


def test_auto_disables_itself_when_nothing_answers() -> None:
    with MetadataServer(clouds=()) as fake:
        assert make_source("auto", fake.url, env={}) is None
    started = time.monotonic()
    assert make_source("auto", f"http://127.0.0.1:{free_port()}", env={}) is None  # connection refused
    assert time.monotonic() - started < 3 * 0.5 + 1.0


def test_the_environment_variable_points_a_source_at_the_fake(server: MetadataServer,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(METADATA_URL_ENV, server.url)
    source = make_source("gcp")
    assert source is not None and source.check() is None
    assert server.requests()[-1].header("Metadata-Flavor") == "Google"


@pytest.mark.parametrize("cloud", ["aws", "gcp", "azure"])
def test_watcher_calls_on_notice_once_after_arming(server: MetadataServer, cloud: str) -> None:
    source = make_source(cloud, server.url, env={})
    assert source is not None
    called = threading.Event()
    notices: list[Notice] = []

    def on_notice(notice: Notice) -> None:
        notices.append(notice)
        called.set()

    watcher = PreemptionWatcher(source, on_notice, interval=0.02).start()
    try:
        polled = {"aws": SPOT_ACTION, "gcp": "/computeMetadata/", "azure": "/metadata/scheduledevents"}[cloud]
        server.wait_for_request(lambda r: r.path.startswith(polled), timeout=WAIT_S)
        assert not called.is_set()
        server.preempt(cloud, in_seconds=30)
        assert called.wait(WAIT_S), f"no {cloud} notice within {WAIT_S}s of arming"
    finally:
        watcher.stop()
    assert not watcher.running
    assert len(notices) == 1 and notices[0].source == cloud


def test_the_fake_runs_as_its_own_process_and_stops_on_sigterm() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "tests.fakes.metadata_server", "--port", "0", "--clouds", "gcp"],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 20.0)
        assert ready, "the fake printed no port within 20s"
        port = int(proc.stdout.readline())
        url = f"http://127.0.0.1:{port}"
        source = make_source("auto", url, env={})
        assert isinstance(source, GcpSource) and source.check() is None
        remote(url, "preempt", cloud="gcp")
        assert source.check() is not None
        assert b"/computeMetadata/v1/instance/preempted" in remote(url, "requests")
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        proc.stdout.close()
