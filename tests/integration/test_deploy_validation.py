"""deploy/kubernetes, deploy/slurm and deploy/systemd, checked offline: by the validators
their ecosystems use (yamllint, kubernetes-validate, shellcheck, bash -n, systemd-analyze
verify), and by what matters to the agent: every flag and variable is one of
``elastic-agent start``'s (agent.daemon.config.options), every agent command line loads with the
agent's own config loader, grace periods outlast the drain, exit codes are handled as
docs/deploy/*.md say. The Slurm scripts run for real against a fake srun, scontrol and agent,
so the trap, the waits and the requeue decision are exercised, not just read.

A validator that is not installed fails its test (they are in the ``test`` extras); only
systemd-analyze, which is not a Python package, is skipped with a printed notice. Resources
without a bundled schema (CRDs, kustomize's own file) are reported, not silently passed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from agent.daemon.config import options
from agent.daemon.config.layers import PASSWORD_VAR, load_config
from agent.daemon.endings import DRAIN_MARGIN
from agent.daemon.preemption import METADATA_URL_ENV
from agent.errors import EXIT_FAILED, EXIT_PREEMPTED, EXIT_SUCCEEDED, EXIT_USAGE
from tests.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "kubernetes"
SLURM = DEPLOY / "slurm"
SYSTEMD = DEPLOY / "systemd"
UNIT = SYSTEMD / "elastic-agent@.service"
DROP_IN = SYSTEMD / "elastic-agent@.service.d" / "etcd-password.conf"
ENV_EXAMPLE = SYSTEMD / "elastic-agent.env.example"
OUR_DOCS = [REPO / "docs" / "preemption.md", *sorted((REPO / "docs" / "deploy").glob("*.md"))]
BIN = Path(sys.executable).parent

# The oldest Kubernetes we support (its schemas still require podFailurePolicy's `status`)
# and the newest kubernetes-validate knows.
K8S_VERSIONS = ("1.30.0", "1.37.0")
# Kinds with no schema in kubernetes-validate: reported, and checked by the tests below.
SCHEMALESS = {
    ("monitoring.coreos.com/v1", "PodMonitor"),
    ("kubeflow.org/v1", "PyTorchJob"),
    ("kustomize.config.k8s.io/v1beta1", "Kustomization"),
}
# yamllint's default rules, strict (warnings fail), with long lines and `---` allowed.
YAMLLINT_CONFIG = "{extends: default, rules: {line-length: disable, document-start: disable}}"

AGENT_FLAGS = options.flags()
STATUS_FLAGS = {"--etcd-endpoints", "--job-id", "--json", "--timeout"} | {
    options.flag(f) for f in options.CONNECTION_FIELDS}
# ELASTIC_AGENT_* names the agent reads besides one per option.
AGENT_ENV = {o.env_var for o in options.OPTIONS} | {options.env_var("config"), PASSWORD_VAR, METADATA_URL_ENV}
# PET_* names the docs may mention as set by the Kubeflow operator and ignored by the agent
# (PET_N_PROC_PER_NODE: older operator releases' spelling of PET_NPROC_PER_NODE).
IGNORED_PET = {"PET_RDZV_BACKEND", "PET_RDZV_CONF", "PET_STANDALONE", "PET_MONITOR_INTERVAL",
               "PET_N_PROC_PER_NODE"}
# Flags of other tools that deploy/ and our docs use (etcd, Slurm, kubectl, validators, the
# example training script): anything else spelled --like-this must be an agent flag.
OTHER_TOOL_FLAGS = {
    # etcd
    "--name", "--data-dir", "--listen-client-urls", "--advertise-client-urls", "--listen-peer-urls",
    "--initial-advertise-peer-urls", "--initial-cluster", "--initial-cluster-state",
    "--initial-cluster-token", "--listen-metrics-urls", "--auto-compaction-mode",
    "--auto-compaction-retention", "--quota-backend-bytes", "--enable-v2", "--cluster",
    # Slurm: sbatch, srun, scancel
    "--job-name", "--nodes", "--ntasks", "--ntasks-per-node", "--gpus-per-node", "--cpus-per-task",
    "--time", "--requeue", "--no-requeue", "--open-mode", "--output", "--signal", "--array", "--mem",
    "--partition", "--qos", "--no-kill", "--kill-on-bad-exit", "--wait", "--export", "--batch",
    "--full", "--overlap", "--nodelist", "--dependency",
    # kubectl, kubernetes-validate, yamllint, systemd-analyze
    "--replicas", "--strict", "--peer-urls", "--home-dir", "--system", "--now",
    # docs/examples/train_ddp.py-style training arguments
    "--lr",
}
FLAG_RE = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
ENV_RE = re.compile(r"\bELASTIC_AGENT_[A-Z0-9_]*[A-Z0-9]")
PET_RE = re.compile(r"\bPET_[A-Z0-9_]*[A-Z0-9]")
FAKE_POD_IP = "10.0.0.7"


class SchemalessNotice(UserWarning):
    """A manifest kubernetes-validate could not check (shown in pytest's warnings summary)."""


def tool(name: str) -> str:
    """A validator installed with the ``test`` extras: beside this interpreter, else on PATH."""
    found = BIN / name if (BIN / name).exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed: pip install -e '.[test]' (it is in the test extras)")
    return str(found)


def run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, **kwargs)


def deploy_files() -> list[Path]:
    return sorted(p for d in (K8S, SLURM, SYSTEMD) for p in d.rglob("*") if p.is_file())


def k8s_files() -> list[Path]:
    return sorted(K8S.rglob("*.yaml"))


def k8s_docs() -> Iterator[tuple[Path, dict]]:
    for path in k8s_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield path, doc


def resource(kind: str, name: str, path: str | None = None) -> dict:
    found = [d for p, d in k8s_docs() if d["kind"] == kind and d["metadata"]["name"] == name
             and (path is None or p == K8S / path)]
    assert len(found) == 1, f"expected one {kind}/{name}{' in ' + path if path else ''}, found {len(found)}"
    return found[0]


def pod_spec(doc: dict) -> dict:
    if doc["kind"] == "PyTorchJob":
        return doc["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    return doc["spec"]["template"]["spec"]


def pod_labels(doc: dict) -> dict:
    if doc["kind"] == "PyTorchJob":
        return doc["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["metadata"]["labels"]
    return doc["spec"]["template"]["metadata"]["labels"]


def agent_container(doc: dict) -> dict:
    found = [c for c in pod_spec(doc)["containers"] if c.get("command", [None])[0] == "elastic-agent"]
    assert len(found) == 1, f"{doc['kind']}/{doc['metadata']['name']}: no elastic-agent container"
    return found[0]


AGENT_WORKLOADS = [("Job", "elastic-agent", "agent/job-indexed.yaml"),
                   ("StatefulSet", "elastic-agent", "agent/statefulset.yaml"),
                   ("PyTorchJob", "llama-ft", "kubeflow/pytorchjob.yaml")]


def operator_env(doc: dict) -> dict[str, str]:
    """What the Kubeflow training-operator sets from a PyTorchJob's elasticPolicy
    (pkg/controller.v1/pytorch/elastic.go), the rendezvous backend included."""
    if doc["kind"] != "PyTorchJob":
        return {}
    policy = doc["spec"]["elasticPolicy"]
    return {
        "PET_RDZV_ENDPOINT": f"{policy['rdzvHost']}:{policy['rdzvPort']}",
        "PET_RDZV_BACKEND": policy.get("rdzvBackend", "c10d"),
        "PET_NNODES": f"{policy['minReplicas']}:{policy['maxReplicas']}",
        "PET_MAX_RESTARTS": str(policy["maxRestarts"]),
        "PET_NPROC_PER_NODE": str(policy["nProcPerNode"]),
        "PET_RDZV_ID": policy["rdzvId"],
    }


def container_env(container: dict, pod_name: str) -> dict[str, str]:
    """The container's environment as the kubelet would give it (downward API filled in)."""
    fields = {"status.podIP": FAKE_POD_IP, "metadata.name": pod_name, "metadata.namespace": "training"}
    env = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = str(var["value"])
        else:
            env[var["name"]] = fields[var["valueFrom"]["fieldRef"]["fieldPath"]]
    return env


def loaded(kind: str, name: str, path: str):
    """The agent's own configuration for a workload's container, and the workload."""
    doc = resource(kind, name, path)
    container = agent_container(doc)
    env = operator_env(doc) | container_env(container, "pod-0")
    argv = container["args"]
    assert argv[0] == "start", argv
    config = load_config(argv[1:], env, hostname=lambda: "host", fqdn=lambda: "host.example")
    return config, doc, container


# --- the validators --------------------------------------------------------------------------

def test_yamllint_strict_on_deploy() -> None:
    proc = run([tool("yamllint"), "--strict", "-f", "parsable", "-d", YAMLLINT_CONFIG, str(DEPLOY)])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_yamllint_config_is_strict_enough_to_catch_mistakes(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: 1\na: 2\nb:   yes\nc: [1,2]  \n")
    proc = run([tool("yamllint"), "--strict", "-f", "parsable", "-d", YAMLLINT_CONFIG, str(bad)])
    assert proc.returncode != 0
    for rule in ("key-duplicates", "truthy", "trailing-spaces", "commas"):
        assert rule in proc.stdout, proc.stdout


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_validate_strict(version: str) -> None:
    files = k8s_files()
    proc = run([tool("kubernetes-validate"), "-k", version, "--strict", *map(str, files)])
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    skipped = set(re.findall(r"Couldn't find schema for kind (\S+) with api version (\S+)", out))
    skipped = {(api, kind) for kind, api in skipped}
    # Only the kinds we know have no schema: a typo'd apiVersion of a core kind lands here too.
    assert skipped <= SCHEMALESS, f"no schema for {sorted(skipped - SCHEMALESS)}: a wrong apiVersion?"
    for api, kind in sorted(skipped):
        notice = (f"kubernetes-validate {version}: no schema for {kind} ({api}), not validated by it; "
                  f"checked by this file's semantic tests instead")
        print("NOTICE", notice)
        warnings.warn(notice, SchemalessNotice, stacklevel=1)
    expected = sum(1 for _, d in k8s_docs() if (d["apiVersion"], d["kind"]) not in SCHEMALESS)
    assert out.count(" passed for resource ") == expected, out


def test_kubernetes_validate_rejects_what_the_schemas_forbid(tmp_path: Path) -> None:
    """The version pin matters: <= 1.36 requires podFailurePolicy's condition `status`."""
    no_status = yaml.safe_load((K8S / "agent" / "job-indexed.yaml").read_text())
    for rule in no_status["spec"]["podFailurePolicy"]["rules"]:
        for condition in rule.get("onPodConditions", []):
            del condition["status"]
    typo = yaml.safe_load((K8S / "agent" / "job-indexed.yaml").read_text())
    typo["metadata"]["name"] = "typo"
    typo["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["periodSecond"] = 10
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump_all([no_status, typo]))  # kubernetes-validate reports one error per resource
    proc = run([tool("kubernetes-validate"), "-k", K8S_VERSIONS[0], "--strict", str(path)])
    assert proc.returncode != 0, proc.stdout
    assert "'status' is a required property" in proc.stdout + proc.stderr
    assert "periodSecond" in proc.stdout + proc.stderr


def slurm_scripts() -> list[Path]:
    scripts = sorted(SLURM.glob("*.sbatch"))
    assert {p.name for p in scripts} >= {"elastic-agent.sbatch", "elastic-agent-array.sbatch", "etcd.sbatch"}
    return scripts


def test_shellcheck_slurm_scripts() -> None:
    proc = run([tool("shellcheck"), "--shell=bash", "--severity=style", *map(str, slurm_scripts())])
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", ["elastic-agent.sbatch", "elastic-agent-array.sbatch", "etcd.sbatch"])
def test_bash_n_slurm_scripts(script: str) -> None:
    proc = run(["bash", "-n", str(SLURM / script)])
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def verify_unit(tmp_path: Path, unit_text: str, drop_in_text: str) -> subprocess.CompletedProcess:
    """systemd-analyze verify on an instance of the unit, with the drop-in beside it and
    ExecStart pointing at an existing stub (verify fails on a missing binary). Its parse
    errors are warnings on stderr with exit code 0: the caller checks both."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        print("NOTICE systemd-analyze is not installed: the unit was not verified")
        pytest.skip("systemd-analyze is not installed")
    stub = tmp_path / "elastic-agent"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    exec_start = "ExecStart=/opt/elastic-agent/.venv/bin/elastic-agent "
    assert exec_start in unit_text
    (tmp_path / "elastic-agent@.service").write_text(unit_text.replace(exec_start, f"ExecStart={stub} "))
    (tmp_path / "elastic-agent@.service.d").mkdir()
    (tmp_path / "elastic-agent@.service.d" / DROP_IN.name).write_text(drop_in_text)
    instance = tmp_path / "elastic-agent@llama-ft.service"
    instance.write_text((tmp_path / "elastic-agent@.service").read_text())
    return run([analyze, "verify", str(instance)], env={**os.environ, "SYSTEMD_LOG_LEVEL": "info"})


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    proc = verify_unit(tmp_path, UNIT.read_text(), DROP_IN.read_text())
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stdout + proc.stderr


def test_systemd_analyze_verify_catches_a_bad_value_in_the_unit_or_drop_in(tmp_path: Path) -> None:
    (tmp_path / "unit").mkdir()
    unit = UNIT.read_text().replace("RestartPreventExitStatus=1 2", "RestartPreventExitStatus=1 two")
    proc = verify_unit(tmp_path / "unit", unit, DROP_IN.read_text())
    assert "Failed to parse" in proc.stderr, proc.stderr
    (tmp_path / "drop").mkdir()
    proc = verify_unit(tmp_path / "drop", UNIT.read_text(), DROP_IN.read_text() + "LoadCredentials=x\n")
    assert "Unknown key" in proc.stderr, proc.stderr


# --- names: every flag and variable is the agent's -----------------------------------------

def agent_command_lines(text: str) -> list[list[str]]:
    """``elastic-agent start|status`` invocations in shell-like text (continuations joined):
    the flags up to ``--`` (the training command)."""
    joined = re.sub(r"\\\n\s*", " ", text)
    lines = []
    for m in re.finditer(r'(?:elastic-agent|"\$AGENT_BIN")\s+(start|status)\b([^\n]*)', joined):
        words = m.group(2).split(" -- ")[0].split()
        lines.append([m.group(1), *words])
    return lines


def test_every_agent_variable_in_deploy_and_docs_exists() -> None:
    unknown = {}
    for path in [*deploy_files(), *OUR_DOCS]:
        names = set(ENV_RE.findall(path.read_text()))
        if names - AGENT_ENV:
            unknown[str(path.relative_to(REPO))] = sorted(names - AGENT_ENV)
    assert unknown == {}


def test_every_pet_variable_in_deploy_is_one_the_agent_reads() -> None:
    read = {name for name in options.PET_VARS if name.startswith("PET_")}
    used = {str(p.relative_to(REPO)): set(PET_RE.findall(p.read_text())) for p in deploy_files()}
    assert {k: sorted(v - read) for k, v in used.items() if v - read} == {}
    assert set().union(*used.values()) == read, "the PyTorchJob example names every PET_* variable it relies on"
    in_docs = {str(p.relative_to(REPO)): set(PET_RE.findall(p.read_text())) for p in OUR_DOCS}
    assert {k: sorted(v - read - IGNORED_PET) for k, v in in_docs.items() if v - read - IGNORED_PET} == {}


def test_every_double_dash_word_in_deploy_and_docs_is_a_known_flag() -> None:
    known = AGENT_FLAGS | STATUS_FLAGS | OTHER_TOOL_FLAGS | {"--help"}
    unknown = {}
    for path in [*deploy_files(), *OUR_DOCS]:
        words = set(FLAG_RE.findall(path.read_text()))
        if words - known:
            unknown[str(path.relative_to(REPO))] = sorted(words - known)
    assert unknown == {}


def test_agent_command_lines_in_scripts_units_and_docs_use_only_agent_flags() -> None:
    found = 0
    for path in [*SLURM.glob("*.sbatch"), UNIT, *OUR_DOCS]:
        for words in agent_command_lines(path.read_text()):
            found += 1
            allowed = (AGENT_FLAGS if words[0] == "start" else STATUS_FLAGS) | {"--help"}
            flags = set(FLAG_RE.findall(" ".join(words[1:])))
            assert flags <= allowed, f"{path.relative_to(REPO)}: {sorted(flags - allowed)} in {' '.join(words)}"
    assert found >= 6, "the scripts, the unit and the docs show agent command lines"


@pytest.mark.parametrize(("kind", "name", "path"), AGENT_WORKLOADS)
def test_manifest_flags_are_agent_flags(kind: str, name: str, path: str) -> None:
    container = agent_container(resource(kind, name, path))
    args = container["args"]
    flags = {a.split("=")[0] for a in args[: args.index("--")] if a.startswith("--")}
    assert flags <= AGENT_FLAGS, sorted(flags - AGENT_FLAGS)
    assert {e["name"] for e in container.get("env", [])} <= AGENT_ENV


# --- Kubernetes semantics ----------------------------------------------------------------------

@pytest.mark.parametrize(("kind", "name", "path"), AGENT_WORKLOADS)
def test_agent_workload_loads_with_the_agents_config(kind: str, name: str, path: str) -> None:
    config, doc, container = loaded(kind, name, path)
    assert (config.min_nodes, config.max_nodes, config.nproc_per_node) == (2, 4, 8)
    assert config.job_id == "llama-ft"
    assert config.node_addr == FAKE_POD_IP, "--node-addr is the pod IP (ELASTIC_AGENT_NODE_ADDR from status.podIP)"
    assert config.node_id == "pod-0", "--node-id is the pod name (ELASTIC_AGENT_NODE_ID from metadata.name)"
    assert config.metrics_addr == "0.0.0.0", "a probe or a scrape cannot reach 127.0.0.1 in a pod"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["metrics"] == config.metrics_port == 29600
    etcd = resource("StatefulSet", "etcd")
    members = {f"etcd-{i}.etcd" for i in range(etcd["spec"]["replicas"])} | {"etcd-client"}
    assert {e.host for e in config.etcd_endpoints} <= members
    assert {e.port for e in config.etcd_endpoints} == {2379}
    if kind != "PyTorchJob":
        assert {e.host for e in config.etcd_endpoints} == members - {"etcd-client"}, "every member listed"


@pytest.mark.parametrize(("kind", "name", "path"), AGENT_WORKLOADS)
def test_termination_grace_outlasts_the_drain(kind: str, name: str, path: str) -> None:
    config, doc, _ = loaded(kind, name, path)
    grace = pod_spec(doc)["terminationGracePeriodSeconds"]
    needed = config.drain_timeout + config.shutdown_timeout + DRAIN_MARGIN
    assert grace > needed, f"terminationGracePeriodSeconds {grace} <= drain {needed:.0f}s"


@pytest.mark.parametrize(("kind", "name", "path"), AGENT_WORKLOADS)
def test_probes_hit_livez_and_readyz_on_the_metrics_port(kind: str, name: str, path: str) -> None:
    config, doc, container = loaded(kind, name, path)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe, path_ in (("livenessProbe", "/livez"), ("readinessProbe", "/readyz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path_
        assert ports.get(get["port"], get["port"]) == config.metrics_port
    live = container["livenessProbe"]
    # Generous: a liveness kill is a restart of the whole job's round.
    assert live["periodSeconds"] >= 10 and live["failureThreshold"] >= 6


def exit_action(rules: list[dict], container: str, code: int, conditions: tuple[str, ...] = ()) -> str:
    """What a Job does with a failed pod: the first matching podFailurePolicy rule's action,
    else "Count" (against backoffLimit). Conditions are (type) with status "True"."""
    for rule in rules:
        if "onExitCodes" in rule:
            on = rule["onExitCodes"]
            if on.get("containerName", container) != container:
                continue
            matched = code in on["values"]
            if matched == (on["operator"] == "In"):
                return rule["action"]
        for cond in rule.get("onPodConditions", []):
            if cond["type"] in conditions and cond["status"] == "True":
                return rule["action"]
    return "Count"


def test_indexed_job_exit_code_policy() -> None:
    config, job, container = loaded(*AGENT_WORKLOADS[0])
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == config.max_nodes
    assert pod_spec(job)["restartPolicy"] == "Never", "podFailurePolicy needs restartPolicy: Never"
    rules = spec["podFailurePolicy"]["rules"]
    name = container["name"]
    assert exit_action(rules, name, EXIT_USAGE) == "FailJob", "a usage error fails the Job at once"
    assert exit_action(rules, name, EXIT_FAILED) == "FailJob", "a failed job is job-wide: no retries"
    assert exit_action(rules, name, EXIT_PREEMPTED) == "Ignore", "a clean leave is not a failure"
    assert exit_action(rules, name, 137, ("DisruptionTarget",)) == "Ignore", "preemption is not counted"
    assert exit_action(rules, name, 137) == "Count", "an OOM kill counts against backoffLimit"
    for rule in rules:
        if "onExitCodes" in rule:
            assert EXIT_SUCCEEDED not in rule["onExitCodes"]["values"]
            assert rule["onExitCodes"]["containerName"] == name
        for cond in rule.get("onPodConditions", []):
            assert cond == {"type": "DisruptionTarget", "status": "True"}
    assert any(r.get("onPodConditions") for r in rules)


def test_agent_statefulset_starts_all_pods_at_once() -> None:
    config, sts, _ = loaded(*AGENT_WORKLOADS[1])
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    assert config.min_nodes <= sts["spec"]["replicas"] <= config.max_nodes
    assert sts["spec"]["serviceName"] == "elastic-agent"


def test_pytorchjob_runs_the_agent_through_pet_variables() -> None:
    config, job, container = loaded(*AGENT_WORKLOADS[2])
    args = container["args"][: container["args"].index("--")]
    # The size, restart budget, job id and etcd come from elasticPolicy, not from flags.
    for field in ("min_nodes", "max_nodes", "nnodes", "nproc_per_node", "max_restarts", "job_id", "etcd_endpoints"):
        assert options.flag(field) not in args
    policy = job["spec"]["elasticPolicy"]
    assert config.max_restarts == policy["maxRestarts"]
    assert container["name"] == "pytorch"
    assert job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == policy["maxReplicas"]
    assert resource("Service", "etcd-client")["spec"]["ports"][0]["port"] == policy["rdzvPort"]


def test_headless_service_and_podmonitor_reach_the_agent_pods() -> None:
    job = resource("Job", "elastic-agent")
    labels = pod_labels(job)
    svc = resource("Service", "elastic-agent")
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"].items() <= labels.items()
    assert pod_spec(job)["subdomain"] == svc["metadata"]["name"]
    monitor = resource("PodMonitor", "elastic-agent")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    ports = {p["name"] for p in agent_container(job)["ports"]}
    for endpoint in monitor["spec"]["podMetricsEndpoints"]:
        assert endpoint["port"] in ports and endpoint.get("path", "/metrics") == "/metrics"


def test_etcd_statefulset_is_a_v3_quorum_that_compacts_and_stays_off_spot() -> None:
    sts = resource("StatefulSet", "etcd")
    spec = sts["spec"]
    assert spec["replicas"] == 3 and spec["podManagementPolicy"] == "Parallel"
    svc = resource("Service", spec["serviceName"])
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    (etcd,) = pod_spec(sts)["containers"]
    args = dict(a.split("=", 1) for a in etcd["args"])
    assert args["--auto-compaction-mode"] == "periodic"
    assert args["--auto-compaction-retention"] == "10m"
    assert int(args["--quota-backend-bytes"]) > 2 * 1024**3
    assert not any("enable-v2" in a for a in etcd["args"])
    members = dict(m.split("=", 1) for m in args["--initial-cluster"].split(","))
    assert sorted(members) == [f"etcd-{i}" for i in range(spec["replicas"])]
    assert all(url == f"http://{name}.{spec['serviceName']}:2380" for name, url in members.items())
    affinity = pod_spec(sts)["affinity"]
    (anti,) = affinity["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert anti["topologyKey"] == "kubernetes.io/hostname"
    assert anti["labelSelector"]["matchLabels"].items() <= pod_labels(sts).items()
    (term,) = affinity["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    avoided = {(e["key"], v) for e in term["matchExpressions"] if e["operator"] == "NotIn" for v in e["values"]}
    assert avoided >= {("cloud.google.com/gke-spot", "true"), ("eks.amazonaws.com/capacityType", "SPOT"),
                       ("karpenter.sh/capacity-type", "spot"), ("kubernetes.azure.com/scalesetpriority", "spot")}
    metrics_port = int(args["--listen-metrics-urls"].rsplit(":", 1)[1])
    ports = {p["name"]: p["containerPort"] for p in etcd["ports"]}
    for probe, path in (("livenessProbe", "/livez"), ("readinessProbe", "/readyz")):
        assert etcd[probe]["httpGet"]["path"] == path
        assert ports[etcd[probe]["httpGet"]["port"]] == metrics_port
    pdb = resource("PodDisruptionBudget", "etcd")
    assert pdb["spec"]["minAvailable"] == 2
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels(sts).items()


def test_no_enable_v2_outside_comments_anywhere_in_deploy() -> None:
    for path in deploy_files():
        for line in path.read_text().splitlines():
            code = line.split("#", 1)[0]
            assert "enable-v2" not in code, f"{path.relative_to(REPO)}: {line.strip()}"


def test_kustomization_lists_existing_files_and_one_workload_per_job() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = kust["resources"]
    assert all((K8S / r).is_file() for r in listed), listed
    assert {"etcd/statefulset.yaml", "etcd/service.yaml", "etcd/pdb.yaml", "agent/job-indexed.yaml",
            "agent/service.yaml"} <= set(listed)
    # The Job and the StatefulSet run the same job id: applying both would double every node.
    assert "agent/statefulset.yaml" not in listed and "kubeflow/pytorchjob.yaml" not in listed


# --- systemd semantics -----------------------------------------------------------------------

def unit_settings(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in re.sub(r"\\\n", " ", text).splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def env_file(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))


def systemd_restarts(unit: dict[str, list[str]], code: int | None, sig: str | None = None) -> bool:
    """systemd.service(5) Restart=on-failure: restart unless the exit is clean (0, a
    SuccessExitStatus, SIGHUP/INT/TERM/PIPE) or listed in RestartPreventExitStatus."""
    assert unit["Restart"] == ["on-failure"]
    success = " ".join(unit.get("SuccessExitStatus", [])).split()
    prevent = " ".join(unit.get("RestartPreventExitStatus", [])).split()
    if sig is not None:
        return sig not in ("SIGHUP", "SIGINT", "SIGTERM", "SIGPIPE", *success) and sig not in prevent
    return code != 0 and str(code) not in success and str(code) not in prevent


def test_unit_restart_policy_follows_the_exit_codes() -> None:
    unit = unit_settings(UNIT.read_text())
    assert not systemd_restarts(unit, EXIT_SUCCEEDED)
    assert not systemd_restarts(unit, EXIT_FAILED), "exit 1 (job failed) would exit 1 again: no loop"
    assert not systemd_restarts(unit, EXIT_USAGE), "exit 2 (bad configuration) would fail again: no loop"
    assert not systemd_restarts(unit, EXIT_PREEMPTED)
    assert "3" in " ".join(unit["SuccessExitStatus"]).split(), "exit 3 (left cleanly) is a clean stop"
    assert systemd_restarts(unit, None, "SIGKILL") and systemd_restarts(unit, None, "SIGSEGV")
    assert systemd_restarts(unit, 137), "a crash is restarted"
    assert unit["KillMode"] == ["mixed"], "SIGTERM to the agent alone: it drains its workers itself"
    assert unit["EnvironmentFile"] == ["/etc/elastic-agent/%i.env"]


def test_unit_command_loads_with_the_example_environment_and_outlasts_the_drain() -> None:
    unit = unit_settings(UNIT.read_text())
    env = dict(v.split("=", 1) for v in unit["Environment"])
    env = {k: v.replace("%i", "llama-ft") for k, v in env.items()} | env_file(ENV_EXAMPLE.read_text())
    (exec_start,) = unit["ExecStart"]
    argv = exec_start.split()
    assert argv[1] == "start" and argv[2:] == ["--", "$TRAIN_COMMAND"]
    config = load_config([*argv[2:-1], *env["TRAIN_COMMAND"].split()], env,
                         hostname=lambda: "host", fqdn=lambda: "host.example")
    assert config.job_id == "llama-ft" and config.metrics_addr == "0.0.0.0"
    assert config.command[0].endswith("python")
    stop = float(unit["TimeoutStopSec"][0])
    assert stop > config.drain_timeout + config.shutdown_timeout + DRAIN_MARGIN
    assert PASSWORD_VAR not in env, "the example keeps the password commented out"
    assert f"#{PASSWORD_VAR}=" in ENV_EXAMPLE.read_text() and "0600" in ENV_EXAMPLE.read_text()


def test_credential_drop_in_gives_the_password_as_a_file() -> None:
    drop = unit_settings(DROP_IN.read_text())
    (cred,) = drop["LoadCredential"]
    name = cred.split(":", 1)[0]
    assert drop["Environment"] == [f"{options.env_var('etcd_password_file')}=%d/{name}"]


# --- Slurm: static checks, then the scripts run against fakes ----------------------------------

def sbatch_options(path: Path) -> list[str]:
    return [line.split(None, 1)[1].strip() for line in path.read_text().splitlines() if line.startswith("#SBATCH ")]


@pytest.mark.parametrize("script", ["elastic-agent.sbatch", "elastic-agent-array.sbatch"])
def test_agent_sbatch_requeues_and_signals_the_batch_shell_before_the_end(script: str) -> None:
    opts = sbatch_options(SLURM / script)
    assert "--requeue" in opts
    (sig,) = [o for o in opts if o.startswith("--signal=")]
    m = re.fullmatch(r"--signal=B:TERM@(\d+)", sig)
    assert m, f"{sig}: SIGTERM to the batch shell only (B:), which forwards it to the agents"
    drain = options.BY_FIELD["drain_timeout"].default + options.BY_FIELD["shutdown_timeout"].default
    assert int(m.group(1)) > drain + DRAIN_MARGIN


def test_allocation_sbatch_keeps_the_allocation_when_a_node_is_lost() -> None:
    # srun --no-kill keeps the step; without sbatch's own, slurmctld requeues the whole job
    # when one node fails (make deploy-check saw "requeue job JobId=5 due to failure of node n3").
    assert "--no-kill" in sbatch_options(SLURM / "elastic-agent.sbatch")


def test_etcd_sbatch_compacts_and_is_not_requeued() -> None:
    text = (SLURM / "etcd.sbatch").read_text()
    assert "--no-requeue" in sbatch_options(SLURM / "etcd.sbatch")
    for flag in ("--auto-compaction-mode=periodic", "--auto-compaction-retention=10m", "--quota-backend-bytes="):
        assert flag in text


FAKE_SRUN = r"""#!/bin/bash
# srun for tests: one task per host of $FAKE_HOSTS, signals forwarded, the highest exit code.
printf '%s\n' "$*" >> "$FAKE_LOG/srun.args"
while [ "$#" -gt 0 ] && [[ $1 == -* ]]; do shift; done
pids=()
i=0
for host in $FAKE_HOSTS; do
    SLURMD_NODENAME=$host SLURM_NODEID=$i SLURM_PROCID=$i "$@" &
    pids+=($!)
    i=$((i + 1))
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM
high=0
for pid in "${pids[@]}"; do
    while :; do
        rc=0; wait "$pid" || rc=$?
        kill -0 "$pid" 2>/dev/null || break
    done
    if [ "$rc" -gt "$high" ]; then high=$rc; fi
done
exit "$high"
"""

FAKE_SCONTROL = r"""#!/bin/bash
case "$1 ${2:-}" in
    "show hostnames") printf '%s\n' $FAKE_HOSTS ;;
    "requeue "*) printf '%s\n' "$2" >> "$FAKE_LOG/requeue" ;;
    *) echo "fake scontrol: $*" >&2; exit 1 ;;
esac
"""

# An agent (or etcd) for tests: records its argv and environment, then acts per $FAKE_AGENT:
# succeed (0), fail (1), usage (2), leave (3 at once), or wait (for SIGTERM, then exit 3).
FAKE_AGENT = textwrap.dedent(r"""
    import json, os, signal, sys, time
    log = os.environ["FAKE_LOG"]
    if len(sys.argv) > 1 and sys.argv[1] == "status":
        outcome = os.environ.get("FAKE_OUTCOME", "")
        if outcome == "unreachable":
            sys.exit(2)
        print(json.dumps({"job_id": "x", "outcome": outcome or None}))
        sys.exit(0)
    name = os.environ.get("SLURMD_NODENAME", "local")
    terms = []

    def on_term(*_):
        terms.append(time.monotonic())
        with open(os.path.join(log, f"{os.path.basename(sys.argv[0])}-{name}.sigterm"), "a") as f:
            f.write("TERM\n")

    signal.signal(signal.SIGTERM, on_term)
    record = {"argv": sys.argv[1:], "host": name,
              "env": {k: v for k, v in os.environ.items() if k.startswith(("ELASTIC_AGENT_", "SLURM"))}}
    path = os.path.join(log, f"{os.path.basename(sys.argv[0])}-{name}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(record, f)
    os.replace(path + ".tmp", path)
    mode = os.environ.get("FAKE_AGENT", "succeed")
    if mode == "wait":
        deadline = time.monotonic() + 20
        while not terms and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(1.0)   # a second SIGTERM would land here
        sys.exit(3 if terms else 9)
    sys.exit({"succeed": 0, "fail": 1, "usage": 2, "leave": 3}[mode])
""")


@pytest.fixture
def slurm_env(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    log = tmp_path / "log"
    bin_dir.mkdir()
    log.mkdir()
    for name, body in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL),
                       ("elastic-agent", f"#!{sys.executable}\n{FAKE_AGENT}"), ("etcd", f"#!{sys.executable}\n{FAKE_AGENT}")):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    return {
        "PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "FAKE_LOG": str(log),
        "AGENT_BIN": str(bin_dir / "elastic-agent"), "PYTHON": sys.executable,
        "ETCD_ENDPOINTS": "etcd-a:2379,etcd-b:2379", "SLURM_SUBMIT_DIR": str(tmp_path),
        "SLURM_JOB_ID": "77", "SLURM_CPUS_PER_TASK": "4", "SLURM_JOB_NODELIST": "n[1-2]",
    }


def start_script(script: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(["bash", str(SLURM / script), "python", "train.py", "--lr", "3e-4"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def records(env: dict[str, str], prefix: str = "elastic-agent") -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(Path(env["FAKE_LOG"]).glob(f"{prefix}-*.json"))]


def terms(env: dict[str, str], host: str, prog: str = "elastic-agent") -> int:
    """How many SIGTERMs the fake agent (or etcd) on ``host`` has received so far."""
    path = Path(env["FAKE_LOG"]) / f"{prog}-{host}.sigterm"
    return len(path.read_text().split()) if path.exists() else 0


def requeued(env: dict[str, str]) -> list[str]:
    path = Path(env["FAKE_LOG"]) / "requeue"
    return path.read_text().split() if path.exists() else []


AGENT_SCRIPTS = {
    "elastic-agent.sbatch": {"SLURM_JOB_NUM_NODES": "2", "FAKE_HOSTS": "n1 n2"},
    "elastic-agent-array.sbatch": {"SLURM_ARRAY_JOB_ID": "70", "SLURM_ARRAY_TASK_ID": "1",
                                   "SLURM_ARRAY_TASK_COUNT": "4", "FAKE_HOSTS": "n1", "SLURMD_NODENAME": "n1"},
}
# What each script asks `scontrol requeue` for: the one-allocation job is its own id; an array
# task is <array>_<task> (its SLURM_JOB_ID would name the whole array: a kill -9 of one task
# requeued, and so SIGTERMed, every task; found by make deploy-check under a real Slurm).
REQUEUED_ID = {"elastic-agent.sbatch": "77", "elastic-agent-array.sbatch": "70_1"}


@pytest.mark.parametrize("script", sorted(AGENT_SCRIPTS))
def test_sbatch_agent_flags_load_with_the_agents_config(script: str, slurm_env: dict[str, str]) -> None:
    env = slurm_env | AGENT_SCRIPTS[script] | {"FAKE_AGENT": "succeed"}
    proc = start_script(script, env)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    recs = records(env)
    assert len(recs) == len(env["FAKE_HOSTS"].split())
    for rec in recs:
        argv = rec["argv"]
        assert argv[0] == "start"
        config = load_config(argv[1:], {}, hostname=lambda: "h", fqdn=lambda: "h.example")
        assert config.command == ("python", "train.py", "--lr", "3e-4")
        assert config.metrics_addr == "0.0.0.0"
        assert [str(e) for e in config.etcd_endpoints] == ["etcd-a:2379", "etcd-b:2379"]
        if script == "elastic-agent.sbatch":
            assert (config.job_id, config.min_nodes, config.max_nodes) == ("slurm-77", 2, 2)
        else:
            assert (config.job_id, config.min_nodes, config.max_nodes) == ("slurm-70", 2, 4)
    if script == "elastic-agent.sbatch":
        (srun_args,) = (Path(env["FAKE_LOG"]) / "srun.args").read_text().splitlines()
        words = srun_args.split()
        assert {"--no-kill", "-K0", "--wait=0", "--ntasks-per-node=1"} <= set(words), words
    assert requeued(env) == []


# (agent mode, etcd outcome, script exit code, requeued?)
OUTCOMES = [
    ("succeed", "succeeded", 0, False),
    ("succeed", "unreachable", 0, False),       # every agent exited 0: the job succeeded
    ("leave", "succeeded", 0, False),           # a node left, the others finished the job
    ("fail", "failed", 1, False),
    ("fail", "unreachable", 1, False),
    ("usage", "unreachable", 2, False),
    ("leave", "", 0, True),                     # left, job unfinished: requeue
    ("leave", "unreachable", 0, True),
]


@pytest.mark.parametrize("script", sorted(AGENT_SCRIPTS))
@pytest.mark.parametrize(("mode", "outcome", "code", "requeue"), OUTCOMES)
def test_sbatch_requeues_only_an_unfinished_job(script: str, mode: str, outcome: str, code: int, requeue: bool,
                                                slurm_env: dict[str, str]) -> None:
    env = slurm_env | AGENT_SCRIPTS[script] | {"FAKE_AGENT": mode, "FAKE_OUTCOME": outcome}
    proc = start_script(script, env)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == code, out
    assert requeued(env) == ([REQUEUED_ID[script]] if requeue else []), out


@pytest.mark.parametrize("script", sorted(AGENT_SCRIPTS))
def test_sbatch_forwards_one_sigterm_waits_for_the_drain_and_requeues(script: str, slurm_env: dict[str, str]) -> None:
    env = slurm_env | AGENT_SCRIPTS[script] | {"FAKE_AGENT": "wait", "FAKE_OUTCOME": ""}
    hosts = env["FAKE_HOSTS"].split()
    proc = start_script(script, env)
    try:
        wait_until(lambda: len(records(env)) == len(hosts), timeout=15, what="agents started")
        proc.send_signal(signal.SIGTERM)   # what --signal=B:TERM@120 does
        wait_until(lambda: all(terms(env, h) for h in hosts), timeout=15, what="SIGTERM forwarded")
        proc.send_signal(signal.SIGTERM)   # a second one, while they drain: not forwarded
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert [terms(env, h) for h in hosts] == [1] * len(hosts), out
    # The script waited for the agents' own exit (3, not its interrupted wait's 143).
    assert proc.returncode == 0 and "exited 3" in out, out
    assert requeued(env) == [REQUEUED_ID[script]], out


def test_etcd_sbatch_runs_one_compacting_v3_member_per_node(slurm_env: dict[str, str]) -> None:
    env = slurm_env | {"FAKE_HOSTS": "s1 s2 s3", "FAKE_AGENT": "wait", "ETCD_BIN": str(Path(slurm_env["PATH"].split(":")[0]) / "etcd")}
    endpoints_file = Path(env["HOME"]) / ".elastic-agent" / "etcd-endpoints"
    proc = start_script("etcd.sbatch", env)
    try:
        wait_until(lambda: len(records(env, "etcd")) == 3 and endpoints_file.exists(), timeout=15, what="3 members")
        assert endpoints_file.read_text().strip() == "s1:2379,s2:2379,s3:2379"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 3, out   # the members' exit code (the fake exits 3 on SIGTERM)
    assert [terms(env, h, "etcd") for h in ("s1", "s2", "s3")] == [1, 1, 1]
    assert not endpoints_file.exists(), "a stopped cluster's endpoints are removed"
    cluster = "etcd-s1=http://s1:2380,etcd-s2=http://s2:2380,etcd-s3=http://s3:2380"
    for rec in records(env, "etcd"):
        args = dict(a.split("=", 1) for a in rec["argv"])
        assert args["--name"] == f"etcd-{rec['host']}"
        assert args["--initial-cluster"] == cluster
        assert args["--advertise-client-urls"] == f"http://{rec['host']}:2379"
        assert (args["--auto-compaction-mode"], args["--auto-compaction-retention"]) == ("periodic", "10m")
        assert int(args["--quota-backend-bytes"]) > 2 * 1024**3
        assert not any("enable-v2" in a for a in rec["argv"])
