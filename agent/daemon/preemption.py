"""Cloud preemption notices: poll the instance metadata service and report the first notice.

``make_source(kind)`` builds one :class:`NoticeSource` per cloud (``aws``, ``gcp``, ``azure``;
``auto`` probes each once; ``none`` gives ``None``). A source's ``check()`` is one poll: it
returns a :class:`Notice` or ``None`` and never raises, because a metadata service that does
not answer is normal off-cloud and must not take the agent down. :class:`PreemptionWatcher`
polls a source on a daemon thread and calls ``on_notice`` once; the callback only records
(``signals.request(at=notice.deadline)``), the agent's loop acts.

Parsing is pure (``aws_notice``, ``gcp_notice``, ``azure_notice``) and takes the clocks as
arguments. The cloud gives a wall-clock termination time; we turn it into a monotonic deadline
at once, ``mono() + (termination - wall())``, so nothing later compares wall clocks.

Standard library only: no ``requests``, and proxies are bypassed (metadata is link-local).
"""

from __future__ import annotations

import email.utils
import http.client
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Protocol

log = logging.getLogger(__name__)

METADATA_URL_ENV = "ELASTIC_AGENT_METADATA_URL"
# One address for all three clouds (GCP answers on it too): no DNS lookup for
# metadata.google.internal, whose resolution the socket timeout would not bound off-cloud.
DEFAULT_METADATA_URL = "http://169.254.169.254"
KINDS = ("none", "aws", "gcp", "azure", "auto")
AUTO_ORDER = ("aws", "gcp", "azure")
AUTO_PROBE_TIMEOUT_S = 0.5

AWS_TOKEN_PATH = "/latest/api/token"
AWS_ACTION_PATH = "/latest/meta-data/spot/instance-action"
AWS_TOKEN_TTL_S = 21600
AWS_TOKEN_REFRESH_MARGIN_S = 60.0
GCP_PREEMPTED_PATH = "/computeMetadata/v1/instance/preempted"
GCP_NOTICE_S = 30.0  # GCP gives ~30 s from the notice to the ACPI soft-off
AZURE_EVENTS_PATH = "/metadata/scheduledevents?api-version=2020-07-01"
AZURE_NAME_PATH = "/metadata/instance/compute/name?api-version=2021-02-01&format=text"


@dataclass(frozen=True)
class Notice:
    """``deadline`` is the ``time.monotonic()`` value at which the node goes away, if known."""

    source: str
    detail: str
    deadline: float | None


class NoticeSource(Protocol):
    def check(self) -> Notice | None:
        """One poll; never raises (a network error is ``None`` and a debug log line)."""
        ...


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    headers: Mapping[str, str]


# (method, url, headers, timeout) -> Response, or None when nothing answered.
Fetch = Callable[[str, str, Mapping[str, str], float], Response | None]

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_fetch(method: str, url: str, headers: Mapping[str, str], timeout: float) -> Response | None:
    """One HTTP request with urllib, bypassing proxies. Any HTTP status is a ``Response``;
    no answer at all (refused, timed out, reset, garbled) is ``None``."""
    try:
        request = urllib.request.Request(url, method=method, headers=dict(headers))
        try:
            with _OPENER.open(request, timeout=timeout) as reply:
                return Response(reply.status, reply.read(), dict(reply.headers.items()))
        except urllib.error.HTTPError as exc:  # a status >= 400 is still an answer
            with exc:
                body = exc.read() if exc.fp is not None else b""
                return Response(exc.code, body, dict(exc.headers.items()) if exc.headers else {})
    except (OSError, ValueError, http.client.HTTPException) as exc:
        log.debug("metadata %s %s: no answer (%s)", method, url, exc)
        return None


# ---- pure parsing: bytes and clock readings in, Notice or None out -------------------------

def _to_deadline(termination_wall: float, now_wall: float, now_mono: float) -> float:
    return now_mono + (termination_wall - now_wall)


def aws_notice(body: bytes, now_wall: float, now_mono: float) -> Notice | None:
    """A 200 body of ``/spot/instance-action``: ``{"action": ..., "time": "<RFC 3339>"}``."""
    try:
        doc = json.loads(body)
        action, stamp = doc["action"], doc["time"]
        if not isinstance(action, str) or not isinstance(stamp, str):
            raise TypeError(f"action and time must be strings, got {action!r} and {stamp!r}")
        when = datetime.fromisoformat(stamp)
    except (ValueError, TypeError, KeyError) as exc:
        log.debug("aws: unreadable spot/instance-action body %r (%s)", body[:200], exc)
        return None
    if when.tzinfo is None:  # IMDS writes UTC with a "Z"; read a bare time as UTC too
        when = when.replace(tzinfo=timezone.utc)
    return Notice("aws", f"spot instance-action {action} at {stamp}",
                  _to_deadline(when.timestamp(), now_wall, now_mono))


def gcp_notice(body: bytes, now_mono: float) -> Notice | None:
    """``TRUE`` is a notice (about 30 s left), ``FALSE`` is not; anything else is ignored."""
    text = body.strip()
    if text == b"TRUE":
        return Notice("gcp", "instance/preempted is TRUE", now_mono + GCP_NOTICE_S)
    if text != b"FALSE":
        log.debug("gcp: unexpected instance/preempted body %r", body[:200])
    return None


def azure_notice(body: bytes, vm_name: str | None, now_wall: float, now_mono: float) -> Notice | None:
    """The first ``Preempt`` event of a Scheduled Events document that names this VM (events
    for other VMs of the availability set or scale set are listed too). With ``vm_name``
    unknown, any ``Preempt`` counts. ``NotBefore`` is empty once an event has started: then
    the deadline is unknown."""
    try:
        events = json.loads(body)["Events"]
        if not isinstance(events, list):
            raise TypeError(f"Events is {type(events).__name__}, expected a list")
        preempts = [e for e in events if isinstance(e, dict) and e.get("EventType") == "Preempt"]
    except (ValueError, TypeError, KeyError) as exc:
        log.debug("azure: unreadable scheduledevents body %r (%s)", body[:200], exc)
        return None
    for event in preempts:
        resources = event.get("Resources")
        resources = resources if isinstance(resources, list) else []
        if vm_name is not None and resources and vm_name not in resources:
            continue
        not_before = event.get("NotBefore") or ""
        deadline = None
        if isinstance(not_before, str) and not_before:
            try:
                when = email.utils.parsedate_to_datetime(not_before)
                if when.tzinfo is None:  # "-0000": UTC, per RFC 5322
                    when = when.replace(tzinfo=timezone.utc)
                deadline = _to_deadline(when.timestamp(), now_wall, now_mono)
            except (ValueError, TypeError):
                log.debug("azure: unreadable NotBefore %r", not_before)
        detail = f"scheduled event {event.get('EventId')} Preempt, NotBefore {not_before or 'now'}"
        return Notice("azure", detail, deadline)
    return None


# ---- sources: thin I/O around the parsers ---------------------------------------------------

class AwsSource:
    """IMDSv2: a session token (PUT), refreshed before it expires or on 401, then the
    spot instance-action document (404 means no notice)."""

    name = "aws"

    def __init__(self, base_url: str, *, timeout: float = 1.0, fetch: Fetch = http_fetch,
                 wall: Callable[[], float] = time.time, mono: Callable[[], float] = time.monotonic) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._fetch, self._wall, self._mono = fetch, wall, mono
        self._token: str | None = None
        self._token_until = 0.0

    def _new_token(self, timeout: float) -> str | None:
        reply = self._fetch("PUT", self.base_url + AWS_TOKEN_PATH,
                            {"X-aws-ec2-metadata-token-ttl-seconds": str(AWS_TOKEN_TTL_S)}, timeout)
        if reply is None or reply.status != 200 or not reply.body.strip():
            log.debug("aws: no IMDSv2 token (%s)", "no answer" if reply is None else reply.status)
            return None
        self._token = reply.body.strip().decode("ascii", "replace")
        self._token_until = self._mono() + AWS_TOKEN_TTL_S - AWS_TOKEN_REFRESH_MARGIN_S
        return self._token

    def probe(self, timeout: float) -> bool:
        return self._new_token(timeout) is not None

    def check(self) -> Notice | None:
        for attempt in (1, 2):
            if self._token is None or self._mono() >= self._token_until:
                if self._new_token(self.timeout) is None:
                    return None
            reply = self._fetch("GET", self.base_url + AWS_ACTION_PATH,
                                {"X-aws-ec2-metadata-token": self._token or ""}, self.timeout)
            if reply is None:
                return None
            if reply.status == 401 and attempt == 1:
                self._token = None  # expired or revoked: get a new one and ask again
                continue
            if reply.status == 200:
                return aws_notice(reply.body, self._wall(), self._mono())
            if reply.status != 404:
                log.debug("aws: spot/instance-action answered %s", reply.status)
            return None
        return None


class GcpSource:
    """``instance/preempted`` with ``Metadata-Flavor: Google``; ``TRUE`` is a notice."""

    name = "gcp"

    def __init__(self, base_url: str, *, timeout: float = 1.0, fetch: Fetch = http_fetch,
                 mono: Callable[[], float] = time.monotonic) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._fetch, self._mono = fetch, mono

    def _get(self, timeout: float) -> Response | None:
        return self._fetch("GET", self.base_url + GCP_PREEMPTED_PATH, {"Metadata-Flavor": "Google"}, timeout)

    def probe(self, timeout: float) -> bool:
        reply = self._get(timeout)
        flavor = {k.lower(): v for k, v in reply.headers.items()}.get("metadata-flavor") if reply else None
        return reply is not None and reply.status == 200 and flavor == "Google"

    def check(self) -> Notice | None:
        reply = self._get(self.timeout)
        if reply is None:
            return None
        if reply.status != 200:
            log.debug("gcp: instance/preempted answered %s", reply.status)
            return None
        return gcp_notice(reply.body, self._mono())


class AzureSource:
    """Scheduled Events with ``Metadata: true``; a ``Preempt`` event for this VM is a notice.
    The VM's name (to skip events for other VMs) is read once, when first available."""

    name = "azure"

    def __init__(self, base_url: str, *, timeout: float = 1.0, fetch: Fetch = http_fetch,
                 wall: Callable[[], float] = time.time, mono: Callable[[], float] = time.monotonic) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._fetch, self._wall, self._mono = fetch, wall, mono
        self.vm_name: str | None = None

    def _read_name(self, timeout: float) -> str | None:
        reply = self._fetch("GET", self.base_url + AZURE_NAME_PATH, {"Metadata": "true"}, timeout)
        if reply is not None and reply.status == 200 and reply.body.strip():
            self.vm_name = reply.body.strip().decode("utf-8", "replace")
        return self.vm_name

    def probe(self, timeout: float) -> bool:
        # Not scheduledevents: its first call switches the service on and may take minutes.
        return self._read_name(timeout) is not None

    def check(self) -> Notice | None:
        if self.vm_name is None:
            self._read_name(self.timeout)
        reply = self._fetch("GET", self.base_url + AZURE_EVENTS_PATH, {"Metadata": "true"}, self.timeout)
        if reply is None:
            return None
        if reply.status != 200:
            log.debug("azure: scheduledevents answered %s", reply.status)
            return None
        return azure_notice(reply.body, self.vm_name, self._wall(), self._mono())


def make_source(kind: str, base_url: str | None = None, *, timeout: float = 1.0,
                wall: Callable[[], float] = time.time, mono: Callable[[], float] = time.monotonic,
                env: Mapping[str, str] | None = None, fetch: Fetch = http_fetch,
                probe_timeout: float = AUTO_PROBE_TIMEOUT_S) -> NoticeSource | None:
    """The source for ``--preemption-source``; ``None`` for ``none`` or when ``auto`` finds no
    metadata service. The URL is ``base_url``, else ``$ELASTIC_AGENT_METADATA_URL``, else
    169.254.169.254."""
    kind = kind.strip().lower()
    if kind not in KINDS:
        raise ValueError(f"preemption source ({kind!r}) must be one of {'|'.join(KINDS)}")
    if kind == "none":
        return None
    environ = os.environ if env is None else env
    url = base_url or environ.get(METADATA_URL_ENV) or DEFAULT_METADATA_URL
    if not url.startswith(("http://", "https://")):
        origin = "base_url" if base_url else METADATA_URL_ENV
        raise ValueError(f"{origin} ({url!r}) must be an http:// URL, e.g. {DEFAULT_METADATA_URL}")

    def build(name: str) -> AwsSource | GcpSource | AzureSource:
        if name == "aws":
            return AwsSource(url, timeout=timeout, fetch=fetch, wall=wall, mono=mono)
        if name == "gcp":
            return GcpSource(url, timeout=timeout, fetch=fetch, mono=mono)
        return AzureSource(url, timeout=timeout, fetch=fetch, wall=wall, mono=mono)

    if kind != "auto":
        return build(kind)
    for name in AUTO_ORDER:
        source = build(name)
        if source.probe(probe_timeout):
            log.info("preemption notices: %s metadata service answered at %s", name, url)
            return source
    log.info("preemption notices disabled: no metadata service (%s) answered at %s within %.1fs",
             "|".join(AUTO_ORDER), url, probe_timeout)
    return None


class PreemptionWatcher:
    """Polls ``source`` every ``interval`` seconds on a daemon thread; on the first notice calls
    ``on_notice(notice)`` once and stops polling."""

    def __init__(self, source: NoticeSource, on_notice: Callable[[Notice], None], interval: float = 1.0) -> None:
        if interval <= 0:
            raise ValueError(f"preemption poll interval ({interval}) must be > 0")
        self.source = source
        self.on_notice = on_notice
        self.interval = interval
        self.notice: Notice | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="preemption-watcher")

    def start(self) -> PreemptionWatcher:
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        """Whether the polling thread is still alive (it ends after a notice or ``stop()``)."""
        return self._thread.is_alive()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                notice = self.source.check()
            except Exception:  # noqa: BLE001 - a source must not raise; if one does, keep polling
                log.exception("preemption source %r raised; still polling", self.source)
                notice = None
            if notice is not None and not self._stop.is_set():
                self.notice = notice
                log.warning("preemption notice from %s: %s", notice.source, notice.detail)
                try:
                    self.on_notice(notice)
                except Exception:  # noqa: BLE001 - the callback only records; never kill the thread loudly
                    log.exception("preemption on_notice callback failed")
                return
            self._stop.wait(self.interval)
