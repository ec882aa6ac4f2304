"""Slurm accounting for the deploy check, so that its report comes from ``sacct`` as a user's
would: a throwaway MariaDB (datadir, socket and a 127.0.0.1 port in the check's temp dir, never
the system's) and slurmdbd on it, with the check's cluster registered before slurmctld starts."""

from __future__ import annotations

import secrets
import socket
import subprocess
from pathlib import Path

from tests.deploy_check.procs import CheckFailed, Procs, free_port, log, sbin, wait_for

DB = "slurm_acct_db"


def start(work: Path, procs: Procs, env: dict[str, str], munge_sock: Path) -> str:
    """Starts MariaDB and slurmdbd; returns the slurm.conf lines that point slurmctld at it.
    slurmdbd reads slurmdbd.conf from the directory of $SLURM_CONF (``env``)."""
    db = work / "mariadb"
    db.mkdir(mode=0o700)
    sock = db / "mysqld.sock"
    _run([sbin("mariadb-install-db"), "--no-defaults", "--user=root", f"--datadir={db / 'data'}",
          "--auth-root-authentication-method=socket", "--skip-test-db"], "mariadb-install-db", db / "install.log")
    port = free_port()
    # --no-defaults: nothing from /etc/mysql; root's socket login is how the user is created.
    procs.start("mariadbd", [sbin("mariadbd"), "--no-defaults", "--user=root", f"--datadir={db / 'data'}",
                             f"--socket={sock}", f"--port={port}", "--bind-address=127.0.0.1",
                             f"--pid-file={db / 'mariadbd.pid'}", f"--log-error={db / 'error.log'}"],
                db / "mariadbd.out")
    wait_for("MariaDB's socket", sock.exists, 60)
    password = secrets.token_hex(16)
    # The check's one-off secret, on a server in its own temp dir that only 127.0.0.1 reaches.
    sql = (f"CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '{password}'; "
           f"GRANT ALL ON {DB}.* TO 'slurm'@'127.0.0.1';")
    _run([sbin("mariadb"), "--no-defaults", f"--socket={sock}", "-uroot", "-e", sql], "creating the slurm DB user", db / "client.log")
    conf = Path(env["SLURM_CONF"]).parent / "slurmdbd.conf"
    dbd_port, host = free_port(), socket.gethostname()
    conf.write_text(f"""\
AuthType=auth/munge
AuthInfo=socket={munge_sock}
DbdHost={host}
DbdAddr=127.0.0.1
DbdPort={dbd_port}
SlurmUser=root
PidFile={work / 'slurmdbd.pid'}
LogFile={work / 'log' / 'slurmdbd.log'}
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={port}
StorageUser=slurm
StoragePass={password}
StorageLoc={DB}
""")
    conf.chmod(0o600)  # slurmdbd refuses a slurmdbd.conf others can read (it holds the password)
    procs.start("slurmdbd", [sbin("slurmdbd"), "-D"], work / "log" / "slurmdbd.out", env=env)
    # AccountingStoragePass: the munged socket for slurmdbd's connections (not AuthInfo's),
    # else sacct and slurmctld look for the system's /run/munge.
    return (f"AccountingStorageType=accounting_storage/slurmdbd\nAccountingStorageHost=127.0.0.1\n"
            f"AccountingStoragePort={dbd_port}\nAccountingStoragePass={munge_sock}\n")


def register(env: dict[str, str], cluster: str) -> None:
    """``sacctmgr add cluster`` once slurmdbd answers: before slurmctld, which would otherwise
    start unregistered and send its jobs' records nowhere."""
    said = [""]
    def added() -> bool:
        done = subprocess.run(["sacctmgr", "-i", "add", "cluster", cluster], env=env,
                              capture_output=True, text=True, timeout=30)
        said[0] = (done.stdout + done.stderr).strip()
        return done.returncode == 0 or "already exists" in said[0]
    try:
        wait_for(f"slurmdbd to register cluster {cluster} (sacctmgr add cluster)", added, 60, 1)
    except CheckFailed as exc:
        raise CheckFailed(f"{exc}; sacctmgr said: {said[0]}") from None
    log(f"slurmdbd up on MariaDB; cluster {cluster} registered")


def _run(args: list[str], what: str, logfile: Path) -> None:
    with open(logfile, "ab") as out:
        done = subprocess.run(args, stdout=out, stderr=subprocess.STDOUT, timeout=120)
    if done.returncode != 0:
        raise CheckFailed(f"{what}: exit {done.returncode} (see {logfile})")

