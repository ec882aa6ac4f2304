"""The Prometheus and Grafana scenarios: a real Prometheus with the shipped scrape config and
rules scrapes 3 agents of a running job; every target is up, goodput and world size have
values, a kill -9 of one node raises ElasticAgentNodeLost (read from the HTTP API), and every
query of the shipped Grafana dashboard returns data from that Prometheus."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import yaml

from tests.deploy_check.procs import CheckFailed, Procs, free_port, http_json, log, wait_for

REPO = Path(__file__).resolve().parents[2]
AGENT = [sys.executable, "-m", "agent"]
TRAIN = REPO / "docs" / "examples" / "train_ddp.py"
JOB = "deploy-check"
ALERT = "ElasticAgentNodeLost"
# Only the intervals change: a check cannot wait 15 s scrapes; the rules and relabelings are the
# shipped ones, unchanged.
INTERVAL = "1s"


def generated_config(deploy: Path, work: Path, targets: list[str]) -> Path:
    """A copy of deploy/prometheus/prometheus.yml pointing at this check's targets and rules."""
    config = yaml.safe_load((deploy / "prometheus" / "prometheus.yml").read_text())
    config["global"].update(scrape_interval=INTERVAL, evaluation_interval=INTERVAL)
    config["rule_files"] = [str(deploy / "prometheus" / f) for f in config["rule_files"]]
    (work / "targets").mkdir(exist_ok=True)
    (work / "targets" / f"{JOB}.json").write_text(json.dumps([{"targets": targets}]))
    for scrape in config["scrape_configs"]:
        scrape["scrape_timeout"] = INTERVAL
        for sd in scrape.get("file_sd_configs", []):
            sd["files"] = [str(work / f) for f in sd["files"]]
    out = work / "prometheus.yml"
    out.write_text(yaml.safe_dump(config))
    return out


def query(api: str, expr: str) -> list[dict]:
    reply = http_json(f"{api}/api/v1/query", {"query": expr})
    if reply.get("status") != "success":
        raise CheckFailed(f"query {expr!r}: {reply}")
    return reply["data"]["result"]


def alert_state(api: str, name: str) -> str:
    """inactive / pending / firing, from /api/v1/rules (which lists inactive rules too)."""
    for group in http_json(f"{api}/api/v1/rules", {"type": "alert"})["data"]["groups"]:
        for rule in group["rules"]:
            if rule["name"] == name:
                return str(rule["state"])
    raise CheckFailed(f"no alert rule {name} in the shipped rules")


def dashboard_queries(deploy: Path) -> list[tuple[str, str]]:
    """(panel title, expr) of every panel target of every dashboard in deploy/grafana/."""
    out = []
    for path in sorted((deploy / "grafana").glob("*.json")):
        def walk(panels: list[dict]) -> None:
            for panel in panels:
                walk(panel.get("panels", []))
                for target in panel.get("targets", []):
                    if target.get("expr"):
                        out.append((f"{path.name}: {panel.get('title', '?')}", target["expr"]))
        walk(json.loads(path.read_text()).get("panels", []))
    return out


def substitute(expr: str, nodes: list[str]) -> str:
    """Grafana's template variables as Grafana fills them: job_id the check's job, node 'All'
    (the regex of every value), $__rate_interval four scrape intervals (at least 1m here)."""
    expr = expr.replace("${job_id}", JOB).replace("$job_id", JOB)
    alln = "(" + "|".join(re.escape(n) for n in nodes) + ")"
    expr = expr.replace("${node}", alln).replace("$node", alln)
    return expr.replace("$__rate_interval", "1m").replace("$__range", "5m").replace("$__interval", "15s")


def run(deploy: Path, work: Path, procs: Procs, etcd_endpoint: str) -> None:
    ports = {f"node{i}": free_port() for i in range(3)}
    agents = {}

    def start(node: str) -> None:
        agents[node] = procs.start(f"agent {node}", [
            *AGENT, "start", "--min-nodes", "2", "--max-nodes", "3", "--nproc-per-node", "1",
            "--etcd-endpoints", etcd_endpoint, "--job-id", JOB, "--checkpoint-dir", str(work / "ckpt"),
            "--log-dir", str(work / "agent-logs"), "--node-id", node, "--node-addr", "127.0.0.1",
            "--metrics-port", str(ports[node]), "--", sys.executable, str(TRAIN), "--steps", "1000000",
            "--step-time", "0.5", "--checkpoint-every", "5"], work / f"agent-{node}.log", cwd=REPO)

    # node0 first, alone below --min-nodes: as on a cluster where nodes start one by one. Its
    # long rendezvous is what makes elastic_agent_nodes_alive (a dashboard panel) appear.
    start("node0")
    wait_for("node0 to report elastic_agent_nodes_alive", lambda: b"elastic_agent_nodes_alive{" in _scrape(ports["node0"]), 60)
    log("node0 waits alone below --min-nodes 2 (elastic_agent_nodes_alive reported)")
    start("node1")
    start("node2")
    log(f"started 3 agents of job {JOB} (metrics ports {sorted(ports.values())})")
    prom_port = free_port()
    config = generated_config(deploy, work, [f"127.0.0.1:{p}" for p in ports.values()])
    procs.start("prometheus", [
        "prometheus", f"--config.file={config}", f"--storage.tsdb.path={work / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"], work / "prometheus.log")
    api = f"http://127.0.0.1:{prom_port}"

    def ready() -> bool:
        try:
            return http_json(f"{api}/api/v1/query", {"query": "1"})["status"] == "success"
        except Exception:  # noqa: BLE001
            return False

    def all_up() -> list[dict] | None:
        if not ready():
            return None
        active = http_json(f"{api}/api/v1/targets")["data"]["activeTargets"]
        return active if len(active) == 3 and all(t["health"] == "up" for t in active) else None

    targets = wait_for("Prometheus to report 3 targets up", all_up, 120)
    for t in targets:
        log(f"target {t['scrapeUrl']} job={t['labels']['job']} host={t['labels'].get('host')} health={t['health']}")
    world = wait_for("world size 3 in job_id:elastic_agent_world_size_nodes:max",
                     lambda: [r for r in query(api, f'job_id:elastic_agent_world_size_nodes:max{{job_id="{JOB}"}}')
                              if float(r["value"][1]) == 3], 180)
    log(f"world size series: {world[0]['metric']} = {world[0]['value'][1]}")
    goodput = wait_for("a goodput value above 0",
                       lambda: query(api, f'job_id:elastic_agent_goodput:ratio_rate1h{{job_id="{JOB}"}} > 0'), 120)
    log(f"goodput series: {goodput[0]['metric']} = {goodput[0]['value'][1]}")
    state = alert_state(api, ALERT)
    log(f"alert {ALERT}: {state}")
    if state != "inactive":
        raise CheckFailed(f"{ALERT} is {state} before any node was lost")
    procs.kill_group(agents["node2"])
    killed_at = time.time()
    log("kill -9 of node2's agent (its process group)")
    seen = state
    deadline = time.monotonic() + 180
    while seen != "firing":
        if time.monotonic() > deadline:
            raise CheckFailed(f"{ALERT} still {seen} 180 s after the kill")
        now = alert_state(api, ALERT)
        if now != seen:
            log(f"alert {ALERT}: {seen} -> {now} ({time.time() - killed_at:.1f} s after the kill)")
            seen = now
        time.sleep(0.5)
    for a in http_json(f"{api}/api/v1/alerts")["data"]["alerts"]:
        log(f"/api/v1/alerts: {a['labels']['alertname']} {a['state']} activeAt={a.get('activeAt')} value={a['value']}")
    ckpt = wait_for("a checkpoint", lambda: query(api, f'max(elastic_agent_last_checkpoint_step{{job_id="{JOB}"}}) >= 0'), 120)
    log(f"checkpoint step {ckpt[0]['value'][1]}")
    grafana(deploy, api)


def _scrape(port: int) -> bytes:
    import urllib.request
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:  # noqa: S310
            return resp.read()
    except OSError:
        return b""


def grafana(deploy: Path, api: str) -> None:
    nodes = http_json(f"{api}/api/v1/label/node/values", {"match[]": f'elastic_agent_info{{job_id="{JOB}"}}'})["data"]
    queries = dashboard_queries(deploy)
    if not queries:
        raise CheckFailed("no dashboard queries found in deploy/grafana/")
    empty = []
    for title, expr in queries:
        result = query(api, substitute(expr, nodes))
        if not result:
            empty.append(title)
        log(f"grafana {title}: {len(result)} series" + ("  <- NO DATA" if not result else ""))
    if empty:
        raise CheckFailed(f"{len(empty)} of {len(queries)} dashboard queries returned no data: {empty}")
    log(f"grafana: all {len(queries)} dashboard queries returned data (job_id={JOB}, node=All {nodes})")
