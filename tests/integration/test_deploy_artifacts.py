"""The Prometheus rules and the Grafana dashboard against the metrics the agent really serves.

promtool comes from Debian's ``prometheus`` package (tests/tools/install_promtool.sh extracts
it under .venv/); the promtool tests are skipped with a notice when it cannot be had.
A "real scrape" is AgentMetrics rendered by prometheus_client after every one of its methods
was called, so a metric that only appears after some event still counts.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agent.daemon.policy import Progress
from agent.observe.goodput import NodeReport, Totals, persist
from agent.observe.metrics import AgentMetrics
from rendezvous.memory_store import MemoryStore
from rendezvous.settings import Settings
from rendezvous.state import Assignment, Member
from rendezvous.store import RequestCounter

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "deploy" / "prometheus" / "elastic-agent-rules.yaml"
RULE_TESTS = REPO / "deploy" / "prometheus" / "elastic-agent-rules.test.yaml"
DASHBOARD = REPO / "deploy" / "grafana" / "elastic-agent.json"
METRICS_DOC = REPO / "docs" / "metrics.md"
RUNBOOKS = REPO / "docs" / "runbooks.md"
# A metric name, not part of a recording rule's name (``job_id:elastic_agent_x:rate5m``).
METRIC_RE = re.compile(r"(?<![:\w])elastic_agent_[a-z0-9_]+")


@pytest.fixture(scope="module")
def promtool() -> str:
    found = os.environ.get("PROMTOOL") or shutil.which("promtool")
    if found:
        return found
    script = REPO / "tests" / "tools" / "install_promtool.sh"
    try:
        proc = subprocess.run(["sh", str(script)], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"promtool unavailable: {exc}")
    if proc.returncode != 0:
        pytest.skip(f"promtool unavailable: {proc.stderr.strip()}")
    return proc.stdout.strip().splitlines()[-1]


def exercised_scrape(tmp_path: Path) -> str:
    """Every AgentMetrics method called at least once, then the exposition text."""
    from agent.daemon.straggler_watch import StragglerWatch  # noqa: PLC0415
    from agent.observe import goodput  # noqa: PLC0415
    from agent.observe.collectors import CheckpointCollector, RequestCountCollector  # noqa: PLC0415
    from agent.worker import checkpoint  # noqa: PLC0415
    from rendezvous.clock import FakeClock  # noqa: PLC0415

    checkpoint.save(tmp_path, 3, {"x": b"1"}, round_number=1)
    clock = [100.0]
    counter = RequestCounter()
    counter.add("range", 2)
    m = AgentMetrics("job", "n0", min_nodes=2, max_nodes=3, max_restarts=3, clock=lambda: clock[0])
    m.registry.register(RequestCountCollector(counter, m.labels))
    m.registry.register(CheckpointCollector(tmp_path, m.labels, clock=lambda: clock[0]))
    store = MemoryStore(reap_interval=None)
    settings = Settings(job_id="job", min_nodes=2, max_nodes=3)
    persist(store, settings, "n9", NodeReport("n9", Totals(10.0, 5.0)))
    earlier = goodput.resume(store, settings, "n0")
    if earlier is not None:
        m.rebase(earlier)
    a = Assignment(1, (Member("n0", "127.0.0.1", 2), Member("n1", "127.0.0.1", 2)), "127.0.0.1", 29500)
    m.state("rendezvous")
    clock[0] += 3
    m.nodes_alive(1)
    m.nodes_alive(2)
    m.rendezvous_done(3.0, a, "n0")
    m.workers_started(2)
    m.state("running")
    m.progress([Progress(1, 1.7e9), Progress(1, 1.7e9)])
    clock[0] += 1
    m.progress([Progress(2, 1.7e9 + 1), Progress(2, 1.7e9 + 1)])
    m.etcd_request("range", 0.002)
    m.etcd_request("lease_keepalive", 2.0, error=RuntimeError("timeout"))
    m.restart("worker_failure")
    m.state("restarting")
    m.workers_stopped()
    m.state("rendezvous")
    m.rendezvous_done(1.0, a, "n0")
    m.workers_started(2)
    m.state("running")
    used, others = goodput.sync(store, settings, m.node_report(), job_wide=True)
    m.restarts_used(used)
    assert others is not None
    m.job_others(others)
    m.restarts_used(1)
    watch = StragglerWatch(store, settings, "n0", m, FakeClock(), lambda: 0, evict=False, factor=2.0, window=8.0,
                           leave=lambda why: None)
    watch.compare([Progress(3, 1.7e9, 5.0, busy=0.5)], frozenset({"n0", "n1"}))
    m.preemption()
    m.state("stopping")
    m.workers_stopped()
    m.state("stopped")
    return generate_latest(m.registry).decode()


@pytest.fixture(scope="module")
def scrape(tmp_path_factory) -> str:
    return exercised_scrape(tmp_path_factory.mktemp("ckpt"))


def families(text: str) -> dict[str, set[str]]:
    """Family name -> the sample names it exposes (``_bucket``, ``_total``, ...)."""
    return {f.name: {s.name for s in f.samples} for f in text_string_to_metric_families(text)}


def sample_names(text: str) -> set[str]:
    return {name for names in families(text).values() for name in names}


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [a["expr"] for a in dash["annotations"]["list"] if "expr" in a]
    exprs += [v["query"]["query"] for v in dash["templating"]["list"] if isinstance(v.get("query"), dict)]
    return exprs


def concrete(expr: str) -> str:
    """A Grafana query with its variables filled in, so promtool can parse it."""
    return (expr.replace("$__rate_interval", "5m").replace('"$job_id"', '"job"').replace('"$node"', '".*"'))


# --- the dashboard --------------------------------------------------------------------------

def test_dashboard_is_valid_json_with_the_variables_and_rows() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert [v["name"] for v in dash["templating"]["list"]] == ["datasource", "job_id", "node"]
    rows = [p["title"] for p in dash["panels"] if p["type"] == "row"]
    assert rows == ["Status", "Timeline", "Badput", "Per node"]
    assert {a["name"] for a in dash["annotations"]["list"]} >= {"Restarts", "Preemption notices"}
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_every_metric_the_dashboard_uses_is_served_and_documented(scrape: str) -> None:
    served = sample_names(scrape)
    used = {name for expr in dashboard_exprs() for name in METRIC_RE.findall(expr)}
    assert used, "no metric found in the dashboard"
    assert sorted(used - served) == []
    documented = set(METRIC_RE.findall(METRICS_DOC.read_text()))
    histogram_part = re.compile(r"_(bucket|count|sum)$")
    assert sorted(n for n in used if n not in documented and histogram_part.sub("", n) not in documented) == []


def test_every_served_metric_is_documented(scrape: str) -> None:
    documented = set(METRIC_RE.findall(METRICS_DOC.read_text()))
    exposed = set()
    for family, names in families(scrape).items():
        # Histograms are documented by family name; counters by their _total name.
        exposed |= {family} if any(n.endswith("_bucket") for n in names) else names
    assert sorted(exposed - documented) == []


# --- the rules --------------------------------------------------------------------------------

def rules() -> list[dict]:
    """The rules file read by its fixed layout (no YAML library in the project's dependencies):
    ``- alert:``/``- record:`` items with ``expr`` (inline or a ``|`` block), labels and
    annotations as ``key: value`` lines. promtool checks the real YAML semantics."""
    out: list[dict] = []
    lines = RULES.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^(\s*)- (alert|record): (\S+)$", lines[i])
        if not m:
            i += 1
            continue
        indent = len(m.group(1)) + 2
        rule: dict = {m.group(2): m.group(3), "labels": {}, "annotations": {}}
        section = None
        i += 1
        while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) >= indent):
            line = lines[i]
            key, _, value = line.strip().partition(": ") if ": " in line else (line.strip().rstrip(":"), "", "")
            depth = len(line) - len(line.lstrip())
            if depth == indent and key == "expr":
                if value == "|":
                    body = []
                    while i + 1 < len(lines) and (len(lines[i + 1]) - len(lines[i + 1].lstrip()) > indent):
                        i += 1
                        body.append(lines[i].strip())
                    value = " ".join(body)
                rule["expr"] = value
            elif depth == indent and key in ("labels", "annotations"):
                section = key
            elif depth > indent and section and key:
                rule[section][key] = value.strip().strip("'")
            i += 1
        out.append(rule)
    return out


def test_every_alert_has_summary_description_severity_and_a_runbook_anchor_that_exists() -> None:
    runbooks = RUNBOOKS.read_text()
    anchors = {m.group(1).lower() for m in re.finditer(r"^##+ (\S+)", runbooks, re.MULTILINE)}
    alerts = [r for r in rules() if "alert" in r]
    assert {a["alert"] for a in alerts} >= {
        "ElasticAgentTrainingStalled", "ElasticAgentBelowMinNodes", "ElasticAgentRendezvousStuck",
        "ElasticAgentRestartStorm", "ElasticAgentCheckpointStale", "ElasticAgentLowGoodput",
        "ElasticAgentEtcdErrors", "ElasticAgentPreemptionNotice"}
    for alert in alerts:
        ann = alert["annotations"]
        assert ann["summary"] and ann["description"], alert["alert"]
        assert alert["labels"]["severity"] in ("critical", "warning", "info")
        assert ann["runbook_url"] == f"docs/runbooks.md#{alert['alert'].lower()}"
        assert alert["alert"].lower() in anchors, f"no '## {alert['alert']}' heading in docs/runbooks.md"


def test_every_metric_the_rules_use_is_served(scrape: str) -> None:
    served = sample_names(scrape)
    used = {name for r in rules() for name in METRIC_RE.findall(r["expr"])}
    assert sorted(used - served) == []


def test_promtool_check_rules(promtool: str) -> None:
    proc = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_test_rules(promtool: str) -> None:
    proc = subprocess.run([promtool, "test", "rules", str(RULE_TESTS)], capture_output=True, text=True,
                          timeout=120, cwd=RULE_TESTS.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_promtool_parses_every_dashboard_query(promtool: str, tmp_path: Path) -> None:
    exprs = [e for e in dashboard_exprs() if not e.startswith("label_values(")]
    group = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": concrete(e)} for i, e in enumerate(exprs)]}]}
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(json.dumps(group))  # JSON is YAML
    proc = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_check_metrics_reports_nothing(promtool: str, scrape: str) -> None:
    proc = subprocess.run([promtool, "check", "metrics"], input=scrape, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "" and proc.stderr.strip() == "", proc.stdout + proc.stderr
