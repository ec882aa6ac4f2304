"""etcd over TLS with client certificates (``--client-cert-auth``): the store, ``elastic-agent
status`` and ``elastic-agent start`` against a real etcd with a CA and certificates made here.
Every refusal is one line, exit 2, within a few seconds: never retried like an etcd that is down.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pytest

from agent.daemon.config.layers import load_config
from agent.daemon.config.values import TlsEndpoints
from agent.daemon.connection.connect import open_store
from agent.errors import ConfigError
from rendezvous.errors import StoreConfigError
from rendezvous.etcd.auth import Credentials
from rendezvous.etcd.server import EtcdServer
from rendezvous.etcd.store import EtcdStore
from rendezvous.etcd.tls import validity
from rendezvous.state import JobStatus
from tests import tls
from tests.conftest import stop_server
from tests.waiting import wait_until

AGENT = [sys.executable, "-m", "agent"]
REFUSAL_S = 10.0  # a refusal is reported at once; this bounds "at once" on a loaded machine


@dataclass(frozen=True)
class Certs:
    pki: tls.Pki
    server: tls.Pair
    node: tls.Pair
    expired: tls.Pair
    stranger: tls.Pair  # signed by a CA etcd does not trust
    other_ca: Path

    def flags(self, pair: tls.Pair | None = None, ca: Path | None = None) -> list[str]:
        pair = pair or self.node
        return ["--etcd-cacert", str(ca or self.pki.ca), "--etcd-cert", str(pair.cert), "--etcd-key", str(pair.key)]


@pytest.fixture(scope="module")
def certs():
    with tls.pki() as pki:
        other = tls.make_ca(pki.dir / "other", "other-ca")
        yield Certs(pki, pki.issue("etcd", server=True), pki.issue("node-0"), pki.issue("old", days=-1),
                    other.issue("stranger", ca=(other.ca, other.ca_key)), other.ca)


@pytest.fixture(scope="module")
def tls_etcd(certs):
    server = EtcdServer(tls=tls.server_tls(certs.pki, certs.server)).start()
    try:
        yield server
    finally:
        stop_server(server)


def run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess[str], float]:
    began = time.monotonic()
    proc = subprocess.run(AGENT + args, capture_output=True, text=True, timeout=60, cwd=cwd,
                          env={**{k: v for k, v in os.environ.items() if not k.startswith("ELASTIC_AGENT_")},
                               **(env or {})})
    return proc, time.monotonic() - began


def start(endpoint: str, flags: list[str], cwd: Path, job_id: str = "tls-job") -> tuple[subprocess.CompletedProcess[str], float]:
    return run(["start", "--etcd-endpoints", endpoint, "--job-id", job_id, "--metrics-port", "0", *flags,
                "--", sys.executable, "-c", "print('trained')"], cwd)


def one_line_exit_2(proc: subprocess.CompletedProcess[str], took: float) -> str:
    """The error line, checked: exit 2, in bounded time, the last line of stderr, no traceback
    (``start`` logs a few INFO lines before it; ``status`` prints nothing else)."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("elastic-agent: error: ")]
    assert errors == lines[-1:] and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    if proc.args[3] == "status":
        assert len(lines) == 1, proc.stderr
    assert took < REFUSAL_S, took
    return errors[0].removeprefix("elastic-agent: error: ")


# --- it works ---------------------------------------------------------------------------------
def test_the_store_reads_writes_watches_and_keeps_leases_over_mtls(certs, tls_etcd, job_id) -> None:
    creds = Credentials(cacert=str(certs.pki.ca), cert=str(certs.node.cert), key=str(certs.node.key))
    store = EtcdStore(tls_etcd.url, credentials=creds)  # https://127.0.0.1:PORT
    try:
        events = []
        store.watch(f"/{job_id}/", events.extend, lambda exc: None, start_revision=store.get("/x")[1] + 1,
                    prefix=True)
        lease = store.grant(5)
        store.put(f"/{job_id}/k", b"v", lease=lease)
        assert store.get(f"/{job_id}/k")[0].value == b"v"
        assert store.keepalive(lease) > 0
        wait_until(lambda: [e.key for e in events] == [f"/{job_id}/k"], 10, "the watch event")
    finally:
        store.close()


def test_status_over_mtls_by_flags_and_by_variables(certs, tls_etcd, job_id, tmp_path) -> None:
    creds = Credentials(tls=True, cacert=str(certs.pki.ca), cert=str(certs.node.cert), key=str(certs.node.key))
    store = EtcdStore(tls_etcd.endpoint, credentials=creds)
    try:
        store.put(f"/elastic-agent/{job_id}/status", JobStatus("succeeded", "every worker exited 0").encode())
    finally:
        store.close()
    by_flags, _ = run(["status", "--etcd-endpoints", tls_etcd.url, "--job-id", job_id, *certs.flags()], tmp_path)
    assert by_flags.returncode == 0, by_flags.stderr
    assert by_flags.stdout.startswith(f"job {job_id}: succeeded (every worker exited 0)")
    variables = {"ELASTIC_AGENT_ETCD_CACERT": str(certs.pki.ca), "ELASTIC_AGENT_ETCD_CERT": str(certs.node.cert),
                 "ELASTIC_AGENT_ETCD_KEY": str(certs.node.key)}
    by_env, _ = run(["status", "--etcd-endpoints", tls_etcd.endpoint, "--job-id", job_id], tmp_path, variables)
    assert by_env.returncode == 0 and by_env.stdout == by_flags.stdout, by_env.stderr


def test_a_job_runs_over_mtls(certs, tls_etcd, job_id, tmp_path) -> None:
    proc, _ = start(tls_etcd.url, certs.flags(), tmp_path, job_id)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (f"etcd at {tls_etcd.endpoint}: TLS (CA {certs.pki.ca}, client certificate {certs.node.cert}), "
            "as the user named by the certificate's CN") in proc.stderr


# --- refusals: one line, exit 2, at once ------------------------------------------------------
def test_a_wrong_ca(certs, tls_etcd, tmp_path) -> None:
    for command in ("start", "status"):
        flags = certs.flags(ca=certs.other_ca)
        proc, took = (start(tls_etcd.url, flags, tmp_path) if command == "start" else
                      run(["status", "--etcd-endpoints", tls_etcd.url, "--job-id", "j", *flags], tmp_path))
        assert one_line_exit_2(proc, took) == (
            f"etcd at {tls_etcd.endpoint}: its server certificate is not signed by the CA in --etcd-cacert "
            f"({certs.other_ca}) (unable to get local issuer certificate): give the CA that signed etcd's "
            "--cert-file as --etcd-cacert"), command


def test_no_client_certificate_where_etcd_requires_one(certs, tls_etcd, tmp_path) -> None:
    proc, took = start(tls_etcd.url, ["--etcd-cacert", str(certs.pki.ca)], tmp_path)
    assert one_line_exit_2(proc, took) == (
        f"etcd at {tls_etcd.endpoint} requires a client certificate (SSLV3_ALERT_BAD_CERTIFICATE): "
        "give --etcd-cert and --etcd-key")


def test_a_client_certificate_from_a_ca_etcd_does_not_trust(certs, tls_etcd, tmp_path) -> None:
    proc, took = start(tls_etcd.url, certs.flags(certs.stranger), tmp_path)
    assert one_line_exit_2(proc, took) == (
        f"etcd at {tls_etcd.endpoint} refused the client certificate --etcd-cert ({certs.stranger.cert}) "
        "(SSLV3_ALERT_BAD_CERTIFICATE): sign it with a CA in etcd's --trusted-ca-file")


def test_an_expired_client_certificate(certs, tls_etcd, tmp_path) -> None:
    _, not_after = validity(certs.expired.cert.read_bytes())
    proc, took = start(tls_etcd.url, certs.flags(certs.expired), tmp_path)
    assert one_line_exit_2(proc, took) == (
        f"--etcd-cert ({certs.expired.cert}) expired on {not_after:%Y-%m-%d %H:%M} UTC: renew it")


def test_an_expired_server_certificate(certs, tmp_path) -> None:
    old = certs.pki.issue("etcd-old", server=True, days=-1)
    # etcd starts with it, but its own health check fails on it: wait for the port only.
    server = EtcdServer(tls=tls.server_tls(certs.pki, old, client_cert_auth=False)).start(check_health=False)
    try:
        proc, took = run(["status", "--etcd-endpoints", server.url, "--job-id", "j",
                          "--etcd-cacert", str(certs.pki.ca)], tmp_path)
        assert one_line_exit_2(proc, took) == (
            f"etcd at {server.endpoint}: its server certificate has expired (certificate has expired): "
            "renew etcd's --cert-file")
    finally:
        stop_server(server)


def test_plaintext_to_a_tls_etcd_and_tls_to_a_plaintext_one(certs, tls_etcd, etcd, tmp_path) -> None:
    proc, took = start(tls_etcd.endpoint, [], tmp_path)
    assert one_line_exit_2(proc, took) == (
        f"etcd at {tls_etcd.endpoint} serves TLS: use https:// endpoints or give --etcd-cacert (and "
        "--etcd-cert, --etcd-key if it asks for a client certificate)")
    proc, took = start(f"https://{etcd.endpoint}", [], tmp_path)
    assert one_line_exit_2(proc, took) == (
        f"etcd at {etcd.endpoint} does not serve TLS: drop https:// and --etcd-cacert, --etcd-cert, "
        "--etcd-key, or give etcd a --cert-file and --key-file")


# --- the files, checked before connecting -------------------------------------------------------
def test_unusable_files_are_named_before_any_connection(certs) -> None:
    ca, node = str(certs.pki.ca), certs.node
    cases = [
        (dict(cacert="/nonexistent/ca.crt"), "--etcd-cacert (/nonexistent/ca.crt): cannot read: No such file or directory"),
        (dict(cacert=str(node.key)), f"--etcd-cacert ({node.key}): cannot use it (NO_CERTIFICATE_OR_CRL_FOUND): "
                                     "not a PEM CA certificate"),
        (dict(cacert=ca, cert=str(node.cert)), f"--etcd-cert ({node.cert}) needs --etcd-key too: give the client "
                                               "certificate and its key together"),
        (dict(cacert=ca, cert=str(node.cert), key=str(certs.expired.key)),
         f"--etcd-cert ({node.cert}) with --etcd-key ({certs.expired.key}): cannot use it (KEY_VALUES_MISMATCH): "
         "the key must be the unencrypted PEM private key of that certificate"),
    ]
    for given, message in cases:
        with pytest.raises(StoreConfigError) as caught:
            EtcdStore("127.0.0.1:1", credentials=Credentials(**given))
        assert str(caught.value) == message


def test_config_takes_https_and_the_tls_settings(certs, tmp_path) -> None:
    environ = {"ELASTIC_AGENT_ETCD_CACERT": str(certs.pki.ca)}
    config = load_config(["--etcd-endpoints", "https://127.0.0.1:1,https://[::1]:2", "--job-id", "j",
                          "--etcd-cert", str(certs.node.cert), "--etcd-key", str(certs.node.key), "--", "x"], environ)
    assert isinstance(config.etcd_endpoints, TlsEndpoints) and config.endpoints_text == "127.0.0.1:1,[::1]:2"
    assert (config.etcd_cacert, config.etcd_cert) == (certs.pki.ca, certs.node.cert)
    with pytest.raises(ConfigError) as caught:
        load_config(["--standalone", "--", "x"], environ)
    assert str(caught.value) == (f"--etcd-cacert ({certs.pki.ca}, from ELASTIC_AGENT_ETCD_CACERT) cannot be used "
                                 "with --standalone, whose embedded etcd serves plaintext on 127.0.0.1 only: drop one of them")
    config = load_config(["--etcd-endpoints", "127.0.0.1:1", "--job-id", "j", "--etcd-key", str(certs.node.key),
                          "--", "x"], {})
    with pytest.raises(ConfigError) as caught:
        open_store(config, config.endpoints_text)
    assert str(caught.value).startswith(f"--etcd-key ({certs.node.key}) needs --etcd-cert too")


def test_certificate_dates_are_read_as_openssl_reads_them(certs) -> None:
    for pair in (certs.node, certs.expired):
        out = subprocess.run(["openssl", "x509", "-in", str(pair.cert), "-noout", "-startdate", "-enddate"],
                             capture_output=True, text=True, check=True).stdout
        dates = dict(line.split("=", 1) for line in out.split("\n") if line)
        expected = tuple(datetime.strptime(dates[k], "%b %d %H:%M:%S %Y GMT").replace(tzinfo=timezone.utc)
                         for k in ("notBefore", "notAfter"))
        assert validity(pair.cert.read_bytes()) == expected
    assert validity(b"not a certificate") is None
