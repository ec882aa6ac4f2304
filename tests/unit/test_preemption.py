"""agent.preemption without a network: parsing with fixed clock readings, the sources over a
scripted fetch, make_source's choices, and the watcher over a scripted source."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
from collections.abc import Mapping
from datetime import datetime, timezone

import pytest

from agent.daemon.preemption import (
    AUTO_PROBE_TIMEOUT_S,
    AWS_TOKEN_TTL_S,
    METADATA_URL_ENV,
    AwsSource,
    AzureSource,
    GcpSource,
    Notice,
    PreemptionWatcher,
    Response,
    aws_notice,
    azure_notice,
    gcp_notice,
    make_source,
)

WALL = datetime(2026, 11, 25, 6, 38, 0, tzinfo=timezone.utc).timestamp()  # 06:38:00Z
MONO = 5000.0  # unrelated to WALL on purpose: only differences carry over
WAIT_S = 5.0


class FakeClock:
    def __init__(self) -> None:
        self.wall_now, self.mono_now = WALL, MONO

    def wall(self) -> float:
        return self.wall_now

    def mono(self) -> float:
        return self.mono_now

    def advance(self, seconds: float) -> None:
        self.wall_now += seconds
        self.mono_now += seconds


class ScriptedFetch:
    """Answers by (method, path); records every call. ``None`` in the table = no answer."""

    def __init__(self, table: dict[tuple[str, str], Response | None | list[Response | None]]) -> None:
        self.table = table
        self.calls: list[tuple[str, str, dict[str, str], float]] = []

    def __call__(self, method: str, url: str, headers: Mapping[str, str], timeout: float) -> Response | None:
        self.calls.append((method, url, dict(headers), timeout))
        path = "/" + url.split("://", 1)[1].split("/", 1)[1]
        answer = self.table.get((method, path), Response(404, b"", {}))
        if isinstance(answer, list):
            return answer.pop(0) if len(answer) > 1 else answer[0]
        return answer

    def paths(self, method: str | None = None) -> list[str]:
        return [url.split("://", 1)[1].split("/", 1)[1] for m, url, _, _ in self.calls if method in (None, m)]


def ok(body: bytes, **headers: str) -> Response:
    return Response(200, body, headers)


AWS_ACTION = ("GET", "/latest/meta-data/spot/instance-action")
AWS_TOKEN = ("PUT", "/latest/api/token")
GCP = ("GET", "/computeMetadata/v1/instance/preempted")
AZURE = ("GET", "/metadata/scheduledevents?api-version=2020-07-01")
AZURE_NAME = ("GET", "/metadata/instance/compute/name?api-version=2021-02-01&format=text")


# ---- parsing --------------------------------------------------------------------------------

@pytest.mark.parametrize("action", ["terminate", "stop", "hibernate"])
def test_aws_notice_turns_the_wall_clock_time_into_a_monotonic_deadline(action: str) -> None:
    body = f'{{"action": "{action}", "time": "2026-11-25T06:40:00Z"}}'.encode()
    notice = aws_notice(body, WALL, MONO)
    assert notice == Notice("aws", f"spot instance-action {action} at 2026-11-25T06:40:00Z", MONO + 120.0)


def test_aws_notice_reads_a_time_without_zone_as_utc_and_keeps_a_past_time_in_the_past() -> None:
    notice = aws_notice(b'{"action": "terminate", "time": "2026-11-25T06:37:50"}', WALL, MONO)
    assert notice is not None and notice.deadline == MONO - 10.0


@pytest.mark.parametrize("body", [
    b"", b"not json", b"\xff\xfe", b"null", b"[]", b'"terminate"', b"{}",
    b'{"action": "terminate"}', b'{"time": "2026-11-25T06:40:00Z"}',
    b'{"action": "terminate", "time": "soon"}', b'{"action": "terminate", "time": 1764052800}',
    b'{"action": null, "time": "2026-11-25T06:40:00Z"}',
])
def test_aws_notice_ignores_malformed_bodies(body: bytes) -> None:
    assert aws_notice(body, WALL, MONO) is None


@pytest.mark.parametrize(("body", "notice"), [
    (b"TRUE", Notice("gcp", "instance/preempted is TRUE", MONO + 30.0)),
    (b"TRUE\n", Notice("gcp", "instance/preempted is TRUE", MONO + 30.0)),
    (b"FALSE", None), (b"", None), (b"true", None), (b"<html>TRUE</html>", None), (b"\xff", None),
])
def test_gcp_notice(body: bytes, notice: Notice | None) -> None:
    assert gcp_notice(body, MONO) == notice


def azure_doc(*events: dict[str, object], incarnation: int = 2) -> bytes:
    return json.dumps({"DocumentIncarnation": incarnation, "Events": list(events)}).encode()


def azure_event(event_type: str = "Preempt", resources: object = ("vm-1",),
                not_before: object = "Wed, 25 Nov 2026 06:38:45 GMT") -> dict[str, object]:
    return {"EventId": "E-1", "EventStatus": "Scheduled", "EventType": event_type,
            "ResourceType": "VirtualMachine", "Resources": list(resources) if isinstance(resources, tuple) else resources,
            "NotBefore": not_before, "Description": "", "EventSource": "Platform", "DurationInSeconds": -1}


def test_azure_notice_for_this_vm_has_the_not_before_deadline() -> None:
    notice = azure_notice(azure_doc(azure_event()), "vm-1", WALL, MONO)
    assert notice == Notice("azure", "scheduled event E-1 Preempt, NotBefore Wed, 25 Nov 2026 06:38:45 GMT",
                            MONO + 45.0)


@pytest.mark.parametrize(("body", "vm_name", "deadline"), [
    (azure_doc(azure_event(resources=("vm-2",)), azure_event(resources=("vm-1",))), "vm-1", MONO + 45.0),
    (azure_doc(azure_event(resources=("vm-2",))), None, MONO + 45.0),  # name unknown: any Preempt
    (azure_doc(azure_event(resources=())), "vm-1", MONO + 45.0),  # no resources listed: ours
    (azure_doc(azure_event(not_before="")), "vm-1", None),  # started: no time left to know
    (azure_doc(azure_event(not_before="whenever")), "vm-1", None),
    (azure_doc(azure_event(not_before="Wed, 25 Nov 2026 06:38:45 -0000")), "vm-1", MONO + 45.0),
])
def test_azure_notice_variants(body: bytes, vm_name: str | None, deadline: float | None) -> None:
    notice = azure_notice(body, vm_name, WALL, MONO)
    assert notice is not None and notice.deadline == deadline


@pytest.mark.parametrize("body", [
    azure_doc(), azure_doc(azure_event("Reboot"), azure_event("Freeze"), azure_event("Redeploy")),
    azure_doc(azure_event(resources=("vm-2",))),  # another VM of the scale set
    b"", b"not json", b"\xff", b"null", b"[]", b'{"DocumentIncarnation": 1}',
    b'{"Events": {"EventType": "Preempt"}}', b'{"Events": ["Preempt", 3, null]}',
])
def test_azure_notice_ignores_other_events_and_malformed_bodies(body: bytes) -> None:
    assert azure_notice(body, "vm-1", WALL, MONO) is None


# ---- sources over a scripted fetch ----------------------------------------------------------

def aws_table(action: Response | None | list[Response | None]) -> dict:
    return {AWS_TOKEN: ok(b"token-1"), AWS_ACTION: action}


def test_aws_source_gets_a_token_once_and_sends_it() -> None:
    clock = FakeClock()
    fetch = ScriptedFetch(aws_table([Response(404, b"", {}), ok(b'{"action": "stop", "time": "2026-11-25T06:40:00Z"}')]))
    source = AwsSource("http://md/", timeout=0.7, fetch=fetch, wall=clock.wall, mono=clock.mono)
    assert source.check() is None
    clock.advance(10)
    notice = source.check()
    assert notice is not None and notice.deadline == MONO + 120.0  # 06:40:00 from 06:38:10, read at MONO+10
    assert fetch.paths() == ["latest/api/token", "latest/meta-data/spot/instance-action",
                             "latest/meta-data/spot/instance-action"]
    put, get = fetch.calls[0], fetch.calls[1]
    assert put[2] == {"X-aws-ec2-metadata-token-ttl-seconds": str(AWS_TOKEN_TTL_S)} and put[3] == 0.7
    assert get[2] == {"X-aws-ec2-metadata-token": "token-1"}


def test_aws_source_refreshes_the_token_before_it_expires() -> None:
    clock = FakeClock()
    fetch = ScriptedFetch(aws_table(Response(404, b"", {})))
    source = AwsSource("http://md", fetch=fetch, wall=clock.wall, mono=clock.mono)
    source.check()
    clock.advance(AWS_TOKEN_TTL_S - 120)
    source.check()
    assert fetch.paths("PUT") == ["latest/api/token"]
    clock.advance(90)  # within the refresh margin of expiry
    source.check()
    assert fetch.paths("PUT") == ["latest/api/token"] * 2


def test_aws_source_gets_a_new_token_on_401_and_asks_again_once() -> None:
    fetch = ScriptedFetch(aws_table([Response(401, b"", {}), ok(b'{"action": "terminate", "time": "2026-11-25T06:40:00Z"}')]))
    assert AwsSource("http://md", fetch=fetch, wall=lambda: WALL, mono=lambda: MONO).check() is not None
    assert fetch.paths() == ["latest/api/token", "latest/meta-data/spot/instance-action"] * 2

    always_401 = ScriptedFetch(aws_table(Response(401, b"", {})))
    assert AwsSource("http://md", fetch=always_401).check() is None
    assert len(always_401.calls) == 4  # no loop: one retry per check


@pytest.mark.parametrize("table", [
    {AWS_TOKEN: None}, {AWS_TOKEN: Response(403, b"", {})}, {AWS_TOKEN: ok(b"")},
    aws_table(None), aws_table(Response(500, b"oops", {})), aws_table(ok(b"garbage")),
])
def test_aws_source_reports_nothing_when_imds_misbehaves(table: dict) -> None:
    assert AwsSource("http://md", fetch=ScriptedFetch(table)).check() is None


def test_gcp_source_sends_the_flavor_header() -> None:
    fetch = ScriptedFetch({GCP: [ok(b"FALSE"), Response(503, b"TRUE", {}), None, ok(b"TRUE")]})
    source = GcpSource("http://md", fetch=fetch, mono=lambda: MONO)
    assert [source.check() for _ in range(3)] == [None, None, None]
    assert source.check() == Notice("gcp", "instance/preempted is TRUE", MONO + 30.0)
    assert all(call[2] == {"Metadata-Flavor": "Google"} for call in fetch.calls)


def test_azure_source_reads_its_vm_name_once_and_skips_other_vms_events() -> None:
    fetch = ScriptedFetch({AZURE_NAME: ok(b"vm-1\n"), AZURE: [
        ok(azure_doc(azure_event(resources=("vm-2",)))), ok(azure_doc(azure_event(resources=("vm-1",))))]})
    source = AzureSource("http://md", fetch=fetch, wall=lambda: WALL, mono=lambda: MONO)
    assert source.check() is None
    assert source.check() is not None
    assert fetch.paths().count(AZURE_NAME[1][1:]) == 1
    assert all(call[2] == {"Metadata": "true"} for call in fetch.calls)


def test_azure_source_without_its_name_takes_any_preempt() -> None:
    fetch = ScriptedFetch({AZURE_NAME: None, AZURE: ok(azure_doc(azure_event(resources=("vm-2",))))})
    assert AzureSource("http://md", fetch=fetch, wall=lambda: WALL, mono=lambda: MONO).check() is not None


# ---- make_source ----------------------------------------------------------------------------

def test_make_source_none_and_unknown() -> None:
    assert make_source("none") is None
    with pytest.raises(ValueError, match=r"preemption source \('ibm'\) must be one of none\|aws\|gcp\|azure\|auto"):
        make_source("ibm")


def test_make_source_rejects_a_url_without_scheme() -> None:
    with pytest.raises(ValueError, match=r"ELASTIC_AGENT_METADATA_URL \('127.0.0.1:80'\) must be an http:// URL"):
        make_source("aws", env={METADATA_URL_ENV: "127.0.0.1:80"})


@pytest.mark.parametrize(("kind", "cls"), [("aws", AwsSource), ("GCP", GcpSource), ("azure", AzureSource)])
def test_make_source_builds_the_named_cloud_without_probing(kind: str, cls: type) -> None:
    fetch = ScriptedFetch({})
    assert isinstance(make_source(kind, fetch=fetch, env={}), cls)
    assert fetch.calls == []


@pytest.mark.parametrize(("base_url", "env", "expected"), [
    (None, {}, "http://169.254.169.254"),
    (None, {METADATA_URL_ENV: "http://127.0.0.1:8080"}, "http://127.0.0.1:8080"),
    ("http://10.0.0.1/", {METADATA_URL_ENV: "http://127.0.0.1:8080"}, "http://10.0.0.1"),
])
def test_make_source_url_precedence(base_url: str | None, env: dict[str, str], expected: str) -> None:
    fetch = ScriptedFetch({})
    source = make_source("gcp", base_url, fetch=fetch, env=env)
    assert source is not None
    source.check()
    assert fetch.calls[0][1] == expected + "/computeMetadata/v1/instance/preempted"


def test_auto_uses_the_first_cloud_that_answers_its_probe() -> None:
    fetch = ScriptedFetch({GCP: ok(b"FALSE", **{"Metadata-Flavor": "Google"})})
    source = make_source("auto", "http://md", fetch=fetch, env={})
    assert isinstance(source, GcpSource)
    assert [(c[0], c[3]) for c in fetch.calls] == [("PUT", AUTO_PROBE_TIMEOUT_S), ("GET", AUTO_PROBE_TIMEOUT_S)]


def test_auto_does_not_take_a_plain_200_for_gcp() -> None:
    fetch = ScriptedFetch({GCP: ok(b"FALSE"), AZURE_NAME: ok(b"vm-1")})
    assert isinstance(make_source("auto", "http://md", fetch=fetch, env={}), AzureSource)


def test_auto_with_no_answer_logs_one_line_and_disables(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="agent.daemon.preemption")
    assert make_source("auto", "http://md", fetch=ScriptedFetch({AWS_TOKEN: None, GCP: None, AZURE_NAME: None}), env={}) is None
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert lines == ["preemption notices disabled: no metadata service (aws|gcp|azure) answered at http://md within 0.5s"]


# ---- the watcher ----------------------------------------------------------------------------

class ScriptedSource:
    """Answers from a list (last answer repeats); an Exception in the list is raised."""

    def __init__(self, answers: list[Notice | None | Exception]) -> None:
        self.answers = answers
        self.polls = 0

    def check(self) -> Notice | None:
        self.polls += 1
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


NOTICE = Notice("gcp", "instance/preempted is TRUE", 123.0)


def test_watcher_calls_back_once_and_stops_polling() -> None:
    called = threading.Event()
    notices: list[Notice] = []
    source = ScriptedSource([None, RuntimeError("a source must not raise, but survive it"), None, NOTICE])

    def on_notice(notice: Notice) -> None:
        notices.append(notice)
        called.set()

    watcher = PreemptionWatcher(source, on_notice, interval=0.01).start()
    assert called.wait(WAIT_S)
    watcher.stop()
    assert not watcher.running
    assert notices == [NOTICE] and watcher.notice == NOTICE and source.polls == 4


def test_watcher_stopped_before_a_notice_never_calls_back() -> None:
    polled = threading.Event()

    class Source:
        def check(self) -> Notice | None:
            polled.set()
            return None

    watcher = PreemptionWatcher(Source(), lambda n: pytest.fail("no notice expected"), interval=60.0).start()
    assert polled.wait(WAIT_S)
    watcher.stop()  # wakes the 60 s wait at once
    assert not watcher.running and watcher.notice is None


def test_watcher_survives_a_failing_callback_and_allows_stop_from_it() -> None:
    done = threading.Event()

    def on_notice(notice: Notice) -> None:
        watcher.stop()  # from the watcher's own thread: must not deadlock
        done.set()
        raise RuntimeError("callback bug")

    watcher = PreemptionWatcher(ScriptedSource([NOTICE]), on_notice, interval=0.01)
    watcher.start()  # after the name is bound: the callback may run before start() returns
    assert done.wait(WAIT_S)
    watcher.stop()
    assert not watcher.running


def test_watcher_rejects_a_nonpositive_interval() -> None:
    with pytest.raises(ValueError, match=r"interval \(0\) must be > 0"):
        PreemptionWatcher(ScriptedSource([None]), print, interval=0)


def test_importing_the_module_pulls_in_neither_torch_nor_requests() -> None:
    code = ("import sys, agent.daemon.preemption; bad = {'torch', 'requests'} & set(sys.modules); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_after_a_notice_the_whole_leave_fits_before_the_termination_time() -> None:
    from agent.daemon.endings import DRAIN_MARGIN, drain_budget  # noqa: PLC0415

    # A GCP notice: 30 s. A drain that runs out is followed by SIGTERM and up to
    # --shutdown-timeout (10 s) before SIGKILL, then the leave itself.
    budget = drain_budget(60.0, terminated_at=130.0, now=100.0, shutdown_timeout=10.0)
    assert budget + 10.0 + DRAIN_MARGIN <= 30.0
    assert budget == 15.0
    assert drain_budget(60.0, terminated_at=None, now=100.0, shutdown_timeout=10.0) == 60.0  # a SIGTERM: no notice
    assert drain_budget(60.0, terminated_at=105.0, now=100.0, shutdown_timeout=10.0) == 0.0  # too late to drain
    assert drain_budget(20.0, terminated_at=400.0, now=100.0, shutdown_timeout=10.0) == 20.0  # --drain-timeout caps it
