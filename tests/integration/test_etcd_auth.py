"""etcd users, roles and auth tokens, against a real etcd over mTLS locked down with exactly the
etcdctl commands of docs/security.md: a job's user reaches its key prefix and nothing else, a
user without the role is refused, a wrong password is one line and exit 2, an expired token (or
an etcd restart, which forgets every token) is renewed without the caller noticing, and the
password is never taken from a command line.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.daemon.config.layers import load_config
from agent.errors import ConfigError
from rendezvous.errors import StoreConfigError
from rendezvous.etcd.auth import Credentials
from rendezvous.etcd.server import EtcdServer, etcd_binary
from rendezvous.etcd.store import EtcdStore
from tests import tls
from tests.conftest import stop_server
from tests.integration.test_etcd_tls import one_line_exit_2, run
from tests.waiting import wait_until

PASSWORD = "s3cret-Pa55word-for-llama"  # what must never be shown
TOKEN_TTL = 2  # etcd's --auth-token-ttl: a simple token unused this long is forgotten
JOB = "llama-ft"  # the job docs/security.md sets up
SCOPE = f"/elastic-agent/{JOB}/"


@dataclass(frozen=True)
class Secured:
    server: EtcdServer
    pki: tls.Pki
    root: tls.Pair  # CN=root, the administrator
    node: tls.Pair  # an agent's certificate (its CN is no etcd user)
    nightly: tls.Pair  # CN=nightly-eval, the certificate-only job user
    workdir: Path

    def credentials(self, pair: tls.Pair | None = None, **given: object) -> Credentials:
        pair = pair or self.node
        return Credentials(cacert=str(self.pki.ca), cert=str(pair.cert), key=str(pair.key), **given)  # type: ignore[arg-type]

    def store(self, **given: object) -> EtcdStore:
        return EtcdStore(self.server.url, credentials=self.credentials(**given), retry_for=3.0)

    def flags(self) -> list[str]:
        return ["--etcd-cacert", str(self.pki.ca), "--etcd-cert", str(self.node.cert), "--etcd-key", str(self.node.key)]


def secured_etcd(pki: tls.Pki, workdir: Path) -> Secured:
    server = EtcdServer(data_dir=str(workdir / "etcd"), extra_args=("--auth-token-ttl", str(TOKEN_TTL)),
                        tls=tls.server_tls(pki, pki.issue("etcd", server=True)))
    root = pki.issue("root")
    secured = Secured(server.start(), pki, root, pki.issue("node-0"), pki.issue("nightly-eval"), workdir)
    tls.lock_down(server, pki, root, PASSWORD, workdir)
    return secured


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    with tls.pki() as pki:
        made = secured_etcd(pki, tmp_path_factory.mktemp("secured"))
        try:
            yield made
        finally:
            stop_server(made.server)


def job_user(secured: Secured, **given: object) -> EtcdStore:
    return secured.store(user=JOB, password=PASSWORD, scope=SCOPE, **given)


def refusal(action) -> str:
    with pytest.raises(StoreConfigError) as caught:
        action()
    return str(caught.value)


# --- the docs' roles -----------------------------------------------------------------------------
def test_the_docs_commands_give_each_job_its_prefix_and_nothing_else(secured) -> None:
    store = job_user(secured)
    try:
        store.put(f"{SCOPE}scratch/a", b"1")
        events = []
        store.watch(SCOPE, events.extend, lambda exc: None, store.get(f"{SCOPE}scratch/a")[1] + 1, prefix=True)
        store.put(f"{SCOPE}scratch/b", b"2")
        wait_until(lambda: events, 10, "an event on the job's own prefix")
        assert refusal(lambda: store.get("/elastic-agent/nightly-eval/round")) == (
            f"etcd user '{JOB}' has no permission on {SCOPE} (etcd refused a range): grant it a role "
            "with readwrite on that key prefix (see docs/security.md)")
        assert "etcd refused a watch" in refusal(lambda: store.watch("/elastic-agent/", print, print, 1, prefix=True))
    finally:
        store.close()
    nightly = EtcdStore(secured.server.url, credentials=secured.credentials(secured.nightly))
    try:  # the certificate-only user: its CN is the user name
        nightly.put("/elastic-agent/nightly-eval/scratch", b"1")
        assert "the etcd user named by the client certificate's CN has no permission" in refusal(
            lambda: nightly.get(f"{SCOPE}scratch/a"))
    finally:
        nightly.close()


def test_a_user_with_the_jobs_role_runs_the_job(secured, tmp_path) -> None:
    proc, _ = run(["start", "--etcd-endpoints", secured.server.url, "--job-id", JOB, "--etcd-user", JOB,
                   "--metrics-port", "0", *secured.flags(), "--", sys.executable, "-c", "print('trained')"],
                  tmp_path, {"ELASTIC_AGENT_ETCD_PASSWORD": PASSWORD})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"as etcd user '{JOB}' (password given)" in proc.stderr
    assert PASSWORD not in proc.stdout + proc.stderr


def test_a_user_without_the_role_is_refused(secured, tmp_path) -> None:
    (tmp_path / "intruder.password").write_text("intruder-pw\n")
    tls.run_as_admin("etcdctl user add intruder --interactive=false < intruder.password", secured.server,
                     secured.pki.ca, secured.root, tmp_path)
    for command in ("start", "status"):
        extra = ["--metrics-port", "0", "--", sys.executable, "-c", "pass"] if command == "start" else []
        proc, took = run([command, "--etcd-endpoints", secured.server.url, "--job-id", JOB,
                          "--etcd-user", "intruder", "--etcd-password-file", "intruder.password",
                          *secured.flags(), *extra], tmp_path)
        message = one_line_exit_2(proc, took)
        assert message.startswith(f"etcd user 'intruder' has no permission on {SCOPE} (etcd refused a "), message
        assert message.endswith("): grant it a role with readwrite on that key prefix (see docs/security.md)")


def test_a_wrong_password_is_one_line_and_exit_2(secured, tmp_path) -> None:
    for command in ("start", "status"):
        extra = ["--metrics-port", "0", "--", sys.executable, "-c", "pass"] if command == "start" else []
        proc, took = run([command, "--etcd-endpoints", secured.server.url, "--job-id", JOB, "--etcd-user", JOB,
                          *secured.flags(), *extra], tmp_path, {"ELASTIC_AGENT_ETCD_PASSWORD": "not-" + PASSWORD})
        assert one_line_exit_2(proc, took) == (
            f"etcd user '{JOB}': authentication failed (wrong password, or no such user): check --etcd-user "
            "and the password in ELASTIC_AGENT_ETCD_PASSWORD or --etcd-password-file")
        assert PASSWORD not in proc.stdout + proc.stderr


def test_no_user_at_all_where_etcd_requires_one(tmp_path) -> None:
    server = EtcdServer().start()
    try:
        ctl = [str(etcd_binary().parent / "etcdctl"), "--endpoints", server.endpoint]
        subprocess.run(ctl + ["user", "add", "root", "--interactive=false"], input="root-pw\n", check=True,
                       capture_output=True, text=True, timeout=30)
        for args in (["user", "grant-role", "root", "root"], ["auth", "enable"]):
            subprocess.run(ctl + args, check=True, capture_output=True, timeout=30)
        proc, took = run(["status", "--etcd-endpoints", server.endpoint, "--job-id", JOB], tmp_path)
        assert one_line_exit_2(proc, took) == (
            f"etcd at {server.endpoint} requires authentication: give --etcd-user with a password "
            "(ELASTIC_AGENT_ETCD_PASSWORD or --etcd-password-file), or a client certificate whose CN is an "
            "etcd user (see docs/security.md)")
    finally:
        stop_server(server)


def test_a_user_given_to_an_etcd_without_authentication(etcd, tmp_path) -> None:
    proc, took = run(["status", "--etcd-endpoints", etcd.endpoint, "--job-id", JOB, "--etcd-user", JOB],
                     tmp_path, {"ELASTIC_AGENT_ETCD_PASSWORD": PASSWORD})
    assert one_line_exit_2(proc, took) == (
        f"--etcd-user ({JOB}) was given but etcd has authentication disabled, so anyone may write the job's "
        "keys: enable it (see docs/security.md) or drop --etcd-user")


# --- tokens ----------------------------------------------------------------------------------------
def test_an_expired_token_is_renewed_and_the_request_retried_once(secured) -> None:
    store = job_user(secured)
    try:
        store.put(f"{SCOPE}scratch/a", b"1")
        events, errors = [], []
        store.watch(f"{SCOPE}scratch/a", events.extend, errors.append, store.get(f"{SCOPE}scratch/a")[1] + 1)
        time.sleep(TOKEN_TTL + 1.5)  # what is under test: idle past --auth-token-ttl
        assert store.get(f"{SCOPE}scratch/a")[0].value == b"1"  # "invalid auth token": signed in again
        time.sleep(TOKEN_TTL + 1.5)
        # The watch stream's token is stale too: etcd refuses a new watch on it, "permission
        # denied". The watch is made on a new stream; the old stream's watches are told to
        # watch again (etcd stops serving them correctly after a refusal).
        revision = store.get(f"{SCOPE}scratch/a")[1] + 1
        store.watch(f"{SCOPE}scratch/b", events.extend, errors.append, revision)
        wait_until(lambda: errors, 10, "the old stream's watch told to watch again")
        store.watch(f"{SCOPE}scratch/a", events.extend, errors.append, revision)
        store.put(f"{SCOPE}scratch/a", b"2")
        store.put(f"{SCOPE}scratch/b", b"3")
        wait_until(lambda: sorted(e.key for e in events) == [f"{SCOPE}scratch/a", f"{SCOPE}scratch/b"], 10,
                   "events on both watches")
    finally:
        store.close()


def test_tokens_forgotten_by_an_etcd_restart_are_renewed(tmp_path) -> None:
    with tls.pki() as pki:
        secured = secured_etcd(pki, tmp_path)
        store = job_user(secured)
        try:
            store.put(f"{SCOPE}scratch/a", b"1")
            secured.server.kill()
            secured.server.start()
            assert store.get(f"{SCOPE}scratch/a")[0].value == b"1"
            events = []
            store.watch(f"{SCOPE}scratch/a", events.extend, lambda exc: None, store.get(f"{SCOPE}scratch/a")[1] + 1)
            store.put(f"{SCOPE}scratch/a", b"2")
            wait_until(lambda: events, 10, "a watch event after the restart")
        finally:
            store.close()
            stop_server(secured.server)


# --- the password: never on a command line, never shown -----------------------------------------
CLUSTER = ["--etcd-endpoints", "127.0.0.1:1", "--job-id", JOB]


def config_error(argv: list[str], environ: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(argv + ["--", "x"], environ)
    assert PASSWORD not in str(caught.value)
    return str(caught.value)


def test_the_password_comes_from_the_variable_or_the_file_only(tmp_path) -> None:
    secret = tmp_path / "pw"
    secret.write_text(PASSWORD + "\n")
    env = {"ELASTIC_AGENT_ETCD_PASSWORD": PASSWORD}
    assert load_config(CLUSTER + ["--etcd-user", JOB, "--", "x"], env).etcd_password == PASSWORD
    from_file = load_config(CLUSTER + ["--etcd-user", JOB, "--etcd-password-file", str(secret), "--", "x"], {})
    assert from_file.etcd_password == PASSWORD and PASSWORD not in repr(from_file)
    assert config_error(CLUSTER + ["--etcd-password", PASSWORD], {}) == (
        "--etcd-password is not accepted: a command line is visible to every user of this machine (ps); "
        "set ELASTIC_AGENT_ETCD_PASSWORD or --etcd-password-file")
    assert config_error(CLUSTER + ["--etcd-user", JOB, "--etcd-password-file", str(secret)], env) == (
        f"ELASTIC_AGENT_ETCD_PASSWORD and --etcd-password-file ({secret}) are both set: give the password one way")
    assert config_error(CLUSTER, env) == (
        "a password is set (ELASTIC_AGENT_ETCD_PASSWORD) but --etcd-user is not: give the user it belongs to")
    assert config_error(CLUSTER + ["--etcd-user", JOB], {}).startswith(
        f"--etcd-user ({JOB}) needs a password: set ELASTIC_AGENT_ETCD_PASSWORD or --etcd-password-file")
    empty = tmp_path / "empty"
    empty.write_text("\n")
    assert config_error(CLUSTER + ["--etcd-user", JOB, "--etcd-password-file", str(empty)], {}) == (
        f"--etcd-password-file ({empty}) is empty: write --etcd-user's password in it")
    toml = tmp_path / "agent.toml"
    toml.write_text(f'etcd-password = "{PASSWORD}"\n')
    assert config_error(CLUSTER + ["--config", str(toml)], {}) == (
        f"config file {toml}: key 'etcd-password' is not accepted: set ELASTIC_AGENT_ETCD_PASSWORD or "
        "etcd-password-file")


def test_status_refuses_a_password_flag(tmp_path) -> None:
    proc, took = run(["status", "--etcd-endpoints", "127.0.0.1:1", "--job-id", JOB, "--etcd-password", PASSWORD],
                     tmp_path)
    assert one_line_exit_2(proc, took).startswith("--etcd-password is not accepted")
    assert PASSWORD not in proc.stderr


def test_the_etcd_flags_the_docs_show_exist() -> None:
    shown = subprocess.run([str(etcd_binary()), "--help"], capture_output=True, text=True, timeout=30)
    block = tls.SECURITY_DOC.read_text().split("### 1. TLS between etcd members", 1)[1].split("```sh", 1)[1]
    flags = {word.split("=")[0] for word in block.split("```", 1)[0].split() if word.startswith("--")}
    known = set(re.findall(r"^\s+(--[a-z-]+)", shown.stdout + shown.stderr, re.M))
    assert len(flags) > 10 and flags - known == set()
