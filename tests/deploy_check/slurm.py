"""The Slurm scenarios: the shipped sbatch scripts under a real slurmctld/slurmd on this host.

1. etcd.sbatch runs the jobs' etcd (one member, on the 'services' node 'localhost').
2. elastic-agent-array.sbatch: 3 one-node tasks of one --job-id. A preemption (SIGTERM to every
   process of one task, as Slurm sends it) -> the others go on, that task is requeued and
   rejoins; then one task's agent is killed hard -> requeued, rejoins; the job completes.
3. elastic-agent.sbatch (one allocation, srun --no-kill): one agent killed -> the others go on;
   then a node lost (DOWN) -> the one left goes on; the job completes.
Only what a CPU test cluster needs differs from the shipped scripts, given on sbatch's command
line as a user would (--gpus-per-node=0, --cpus-per-task=1, --array=0-2, --nodes=3)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.deploy_check.procs import CheckFailed, Procs, free_port, http_json, log, wait_for
from tests.deploy_check.slurm_cluster import SlurmCluster

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TRAIN = [str(BIN / "python"), str(REPO / "docs" / "examples" / "train_ddp.py"), "--step-time", "0.2",
         "--checkpoint-every", "5"]
CPU = ["--gpus-per-node=0", "--cpus-per-task=1"]


class Scenarios:
    def __init__(self, deploy: Path, work: Path, cluster: SlurmCluster) -> None:
        self.deploy, self.work, self.c = deploy, work, cluster
        self.endpoints_file = work / "etcd-endpoints"
        self.endpoints = ""
        self.jobs: list[str] = []

    def env(self) -> dict[str, str]:
        return {**self.c.env, "AGENT_BIN": str(BIN / "elastic-agent"), "PYTHON": str(BIN / "python"),
                "PATH": f"{BIN}:{os.environ['PATH']}", "ETCD_ENDPOINTS_FILE": str(self.endpoints_file),
                "NPROC_PER_NODE": "1", "ELASTIC_AGENT_METRICS_PORT": "0", "MIN_NODES": "2"}

    def sbatch(self, script: str, args: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
        cwd.mkdir(exist_ok=True)
        done = subprocess.run(["sbatch", "--parsable", *args, str(self.deploy / "slurm" / script)]
                              + (TRAIN_ARGS.get(script) or []), env=env or self.env(), cwd=cwd,
                              capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise CheckFailed(f"sbatch {script}: {done.stderr.strip()}")
        job = done.stdout.strip().split(";")[0]
        self.jobs.append(job)
        log(f"sbatch {' '.join(args)} {script}: Slurm job {job}")
        return job

    def status(self, job_id: str) -> dict:
        done = subprocess.run([str(BIN / "elastic-agent"), "status", "--etcd-endpoints", self.endpoints,
                               "--job-id", job_id, "--json", "--timeout", "5"], capture_output=True, text=True, timeout=30)
        try:
            return json.loads(done.stdout)
        except ValueError:
            return {}

    def tasks(self, job: str) -> dict[str, dict[str, str]]:
        """Slurm's view of a job (every array task): JobId -> its fields from scontrol."""
        out = {}
        for line in self.c.run(["scontrol", "show", "job", "-o", job], check=False).splitlines():
            fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
            if "JobId" in fields:
                key = f"{fields.get('ArrayJobId')}_{fields['ArrayTaskId']}" if fields.get("ArrayTaskId") else fields["JobId"]
                out[key] = fields
        return out

    def show(self, job: str) -> None:
        for key, f in sorted(self.tasks(job).items()):
            log(f"  job {key}: {f.get('JobState')} restarts={f.get('Restarts')} exit={f.get('ExitCode')} node={f.get('NodeList')}")

    # --- 1: etcd ---------------------------------------------------------------------------
    def etcd(self) -> None:
        env = {**self.env(), "ETCD_BIN": str(BIN / "etcd"), "ETCD_DATA_ROOT": str(self.work / "etcd-data"),
               "ETCD_CLIENT_PORT": str(free_port()), "ETCD_PEER_PORT": str(free_port())}
        job = self.sbatch("etcd.sbatch", ["--partition=services", "--nodes=1", "--mem=100M"], self.work / "etcd", env)
        self.endpoints = wait_for("etcd.sbatch's endpoints file", lambda: _read(self.endpoints_file), 60)
        wait_for(f"etcd at {self.endpoints} to answer", lambda: _healthy(self.endpoints), 60)
        log(f"etcd job {job} serves {self.endpoints}")

    # --- 2: the array ------------------------------------------------------------------------
    def array(self) -> None:
        aid = self.sbatch("elastic-agent-array.sbatch", ["--array=0-2", *CPU], self.work / "array")
        jid = f"slurm-{aid}"
        self.wait_world(jid, 3, "all 3 array tasks in the job")
        # A preemption as Slurm delivers it: SIGTERM to every process of the task, batch shell,
        # agent and workers alike (scancel --full; a time limit's --signal=B: reaches the shell only).
        self.c.run(["scancel", "--signal=TERM", "--full", f"{aid}_1"])
        log(f"scancel --signal=TERM --full {aid}_1 (a preemption)")
        self.wait_requeued(f"{aid}_1")
        self.wait_world(jid, 2, "the other 2 tasks to go on")
        self.expect_running(aid, {"0": "0", "2": "0"})
        self.wait_world(jid, 3, f"task {aid}_1 back after its requeue (Slurm holds a requeued job ~2 min)")
        pid = self.agent_pid(f"{aid}_2")
        os.kill(pid, signal.SIGKILL)
        log(f"kill -9 of task {aid}_2's agent (pid {pid})")
        self.wait_requeued(f"{aid}_2")
        self.wait_world(jid, 2, "the other 2 tasks to go on")
        self.expect_running(aid, {"0": "0", "1": "1"})
        self.wait_done(aid, jid, expect_tasks=3)

    # --- 3: one allocation, srun --no-kill ---------------------------------------------------
    def allocation(self) -> None:
        # MIN_NODES=1: it loses two of its three nodes, one agent and then one whole node.
        job = self.sbatch("elastic-agent.sbatch", ["--nodes=3", *CPU], self.work / "alloc", {**self.env(), "MIN_NODES": "1"})
        jid = f"slurm-{job}"
        self.wait_world(jid, 3, "the 3 agents of the allocation")
        pid = self.agent_pid(job, node="n2")
        os.kill(pid, signal.SIGKILL)
        log(f"kill -9 of job {job}'s agent on n2 (pid {pid})")
        self.wait_world(jid, 2, "the 2 others to go on without it (srun -K0 --wait=0)")
        # A node lost: slurmctld sees it DOWN (without --no-kill it ends the step, or requeues
        # the whole allocation), and its processes die with the machine (if Slurm has not
        # killed them already).
        self.c.run(["scontrol", "update", "NodeName=n3", "State=DOWN", "Reason=deploy-check-node-lost"])
        pid = self.find_agent(self.tasks(job).get(job, {}).get("JobId", job), "n3")
        if pid:
            os.kill(pid, signal.SIGKILL)
        log(f"scontrol update NodeName=n3 State=DOWN, kill -9 of its agent (pid {pid}): job {job} loses a node")
        self.wait_world(jid, 1, "the one left to go on without n3 (--no-kill)")
        self.expect_state(job, "RUNNING")
        self.wait_done(job, jid, expect_tasks=1)

    # --- waits -------------------------------------------------------------------------------
    def wait_world(self, jid: str, n: int, what: str) -> None:
        s = wait_for(f"{what} (world of {n} nodes, training)", lambda: (
            st := self.status(jid)).get("world_size_nodes") == n and st.get("state") == "running" and st, 240, 1)
        log(f"job {jid}: world {n} nodes {[m['node_id'] for m in s['members']]}, step {s.get('last_step')}")

    def expect_running(self, aid: str, tasks: dict[str, str]) -> None:
        """The other tasks (task -> its requeue count before) must not have been stopped or
        requeued by what happened to one."""
        for t, restarts in tasks.items():
            f = self.tasks(f"{aid}_{t}").get(f"{aid}_{t}", {})
            if f.get("JobState") != "RUNNING" or f.get("Restarts") != restarts:
                raise CheckFailed(f"task {aid}_{t} is {f.get('JobState')} (restarts {f.get('Restarts')}): it should have gone on")
        log(f"tasks {', '.join(f'{aid}_{t}' for t in tasks)} still RUNNING, not requeued again")

    def expect_state(self, job: str, state: str) -> None:
        f = self.tasks(job).get(job, {})
        if f.get("JobState") != state or f.get("Restarts") != "0":
            raise CheckFailed(f"job {job} is {f.get('JobState')} (restarts {f.get('Restarts')}): it should be {state}, never requeued")
        log(f"job {job} still {state} on {f.get('NodeList')}, not requeued")

    def wait_requeued(self, task: str) -> None:
        f = wait_for(f"{task} to be requeued", lambda: (
            t := self.tasks(task).get(task, {})).get("Restarts", "0") != "0" and t, 120, 1)
        log(f"{task}: requeued (restarts={f['Restarts']}, state {f['JobState']}, eligible at {f.get('EligibleTime')})")

    def wait_done(self, job: str, jid: str, expect_tasks: int) -> None:
        def finished() -> dict | None:
            tasks = self.tasks(job)
            done = len(tasks) >= expect_tasks and all(t.get("JobState") in _ENDED for t in tasks.values())
            return tasks if done else None
        tasks = wait_for(f"Slurm job {job} to end", finished, 300, 2)
        outcome = self.status(jid).get("outcome")
        log(f"Slurm job {job} ended; elastic job {jid} outcome: {outcome}")
        for out in sorted((self.work / ("array" if expect_tasks > 1 else "alloc")).glob("*.out")):
            for line in out.read_text(errors="replace").splitlines():
                if any(k in line for k in ("elastic-agent job", "SIGTERM", "requeue", "succeeded", "nothing to do", "left job")):
                    print(f"    {out.name}: {line}")
        self.show(job)
        bad = {k: t["JobState"] for k, t in tasks.items() if t["JobState"] != "COMPLETED"}
        if outcome != "succeeded" or bad:
            raise CheckFailed(f"job {job}: outcome {outcome}, tasks not COMPLETED: {bad}")

    def agent_pid(self, job: str, node: str | None = None) -> int:
        """The pid of the elastic-agent process of that Slurm job (and node), from /proc."""
        jobid = self.tasks(job)[job]["JobId"] if "_" in job else job
        return wait_for(f"the agent of Slurm job {job}", lambda: self.find_agent(jobid, node), 30)

    @staticmethod
    def find_agent(jobid: str, node: str | None) -> int | None:
        for proc in Path("/proc").iterdir():
            try:
                cmd = (proc / "cmdline").read_bytes().split(b"\0")
                env = dict(e.split(b"=", 1) for e in (proc / "environ").read_bytes().split(b"\0") if b"=" in e)
            except OSError:
                continue
            if (len(cmd) > 2 and cmd[1].endswith(b"elastic-agent") and cmd[2] == b"start"
                    and env.get(b"SLURM_JOB_ID") == jobid.encode()
                    and (node is None or env.get(b"SLURMD_NODENAME") == node.encode())):
                return int(proc.name)
        return None

_ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
TRAIN_ARGS = {"elastic-agent-array.sbatch": [*TRAIN, "--steps", "1000"],
              "elastic-agent.sbatch": [*TRAIN, "--steps", "300"]}


def _healthy(endpoint: str) -> bool:
    try:
        return http_json(f"http://{endpoint}/health").get("health") == "true"
    except (OSError, ValueError):
        return False


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def run(deploy: Path, work: Path, procs: Procs) -> None:
    cluster = SlurmCluster(work, procs)
    cluster.start()
    s = Scenarios(deploy, work, cluster)
    try:
        s.etcd()
        s.array()
        s.allocation()
    finally:
        for job in s.jobs:
            cluster.run(["scancel", job], check=False)
        # The daemons go only once slurmd has stopped every process of the jobs.
        wait_for("Slurm to have no job left running", lambda: not cluster.run(
            ["squeue", "-h", "-t", "RUNNING,COMPLETING"], check=False).strip(), 90, 1)
        report = sacct(cluster, s.jobs)
    ids = {line.split()[0].split("_")[0] for line in report.splitlines() if line.split()}
    missing = [job for job in s.jobs if job not in ids]
    if missing:
        raise CheckFailed(f"sacct has no record of Slurm job(s) {missing}")


def sacct(cluster: SlurmCluster, jobs: list[str]) -> str:
    """What sacct says of the check's jobs, every run of each (-D: a requeued job's earlier
    runs too), printed once slurmdbd has every job's end; '' when it could not say."""
    if not jobs:
        return ""
    args = ["sacct", "-X", "-D", "-j", ",".join(jobs), "--format=JobID%12,JobName%28,State%20,ExitCode,NodeList%12,Start,End"]
    def settled() -> str | None:
        out = cluster.run([*args, "-n"], check=False)
        last = {line.split()[0]: line.split()[2] for line in out.splitlines() if len(line.split()) > 2}
        return out if out.strip() and not set(last.values()) & {"RUNNING", "PENDING", "COMPLETING"} else None
    try:
        wait_for("sacct to record every job's end", settled, 30, 1)
    except CheckFailed as exc:
        log(f"warning: {exc}")
    out = cluster.run(args, check=False)
    log(f"Slurm jobs ({' '.join(args)}):")
    print("\n".join(f"    {line}" for line in out.splitlines()), flush=True)
    return out
