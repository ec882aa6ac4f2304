"""A Slurm cluster on this one host for the deploy check: munged with its own key and socket,
slurmctld, and one slurmd per simulated node (n1..n3, all on 127.0.0.1, each with its own
port and spool), from a slurm.conf generated in the check's temp dir (never /etc)."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

from tests.deploy_check import accounting
from tests.deploy_check.procs import CheckFailed, Procs, free_port, log, sbin, wait_for

NODES = ("n1", "n2", "n3")
# One CPU a node, so that each one-node task gets a node of its own, as on a GPU cluster
# (config_overrides: 4 nodes x CPUs on a smaller machine; the check's tasks sleep between steps).
CPUS = {"n1": 1, "n2": 1, "n3": 1, "localhost": 2}


class SlurmCluster:
    def __init__(self, work: Path, procs: Procs) -> None:
        self.work, self.procs = work, procs
        self.conf = work / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self) -> None:
        w = self.work
        for d in ("munge", "state", "spool", "log"):
            (w / d).mkdir(mode=0o700)
        key = w / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        sock = w / "munge" / "munge.sock"
        self.procs.start("munged", [sbin("munged"), "-F", "--force", f"--key-file={key}", f"--socket={sock}",
                                    f"--pid-file={w / 'munge' / 'munged.pid'}", f"--seed-file={w / 'munge' / 'seed'}",
                                    f"--log-file={w / 'log' / 'munged.log'}"], w / "log" / "munged.out")
        wait_for("munged's socket", sock.exists, 20)
        acct = accounting.start(w, self.procs, self.env, sock)
        ctld_port = free_port()
        host = socket.gethostname()
        nodes = "\n".join(
            f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={free_port()} CPUs={CPUS[n]} RealMemory=1000 State=UNKNOWN"
            for n in (*NODES, "localhost"))
        # JobRequeue=0: jobs are not requeueable unless they ask (--requeue), as on sites that
        # turn the default off; so the scripts' own --requeue is what the check relies on.
        self.conf.write_text(f"""\
ClusterName=deploycheck
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={sock}
StateSaveLocation={w / 'state'}
SlurmdSpoolDir={w / 'spool'}/%n
SlurmctldPidFile={w / 'slurmctld.pid'}
SlurmdPidFile={w / 'spool'}/slurmd-%n.pid
SlurmctldLogFile={w / 'log' / 'slurmctld.log'}
SlurmdLogFile={w / 'log'}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=0
KillWait=30
MinJobAge=3600
SlurmctldTimeout=30
SlurmdTimeout=30
{acct}JobAcctGatherType=jobacct_gather/none
{nodes}
PartitionName=check Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP
# etcd.sbatch's never-preempted service partition; its node is 'localhost' so that the
# endpoints file it writes (node:port) resolves on this host.
PartitionName=services Nodes=localhost MaxTime=INFINITE State=UP
""")
        for n in (*NODES, "localhost"):
            (w / "spool" / n).mkdir()
        accounting.register(self.env, "deploycheck")
        self.procs.start("slurmctld", [sbin("slurmctld"), "-D", "-i", "-f", str(self.conf)], w / "log" / "slurmctld.out", env=self.env)
        for n in (*NODES, "localhost"):
            self.procs.start(f"slurmd {n}", [sbin("slurmd"), "-D", "-f", str(self.conf), "-N", n], w / "log" / f"slurmd-{n}.out", env=self.env)
        wait_for("3 idle Slurm nodes", lambda: self.sinfo_idle() == len(NODES) + 1, 60)
        log(f"Slurm up: slurmctld and slurmd {', '.join(NODES)} on this host (conf {self.conf})")

    def sinfo_idle(self) -> int:
        out = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False)
        return sum(1 for line in out.splitlines() if line.split()[-1:] == ["idle"])

    def run(self, args: list[str], *, check: bool = True, cwd: Path | None = None) -> str:
        done = subprocess.run(args, env=self.env, cwd=cwd, capture_output=True, text=True, timeout=60)
        if check and done.returncode != 0:
            raise CheckFailed(f"{' '.join(args)}: exit {done.returncode}: {done.stderr.strip()}")
        return done.stdout

