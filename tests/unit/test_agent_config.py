"""agent.config: layering (flag > env > PET_ > file > default) and one-line errors naming the flag."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.daemon.config.layers import AgentConfig, load_config
from agent.errors import ConfigError
from rendezvous.settings import Settings

CMD = ["--", "python", "train.py", "--lr", "3e-4"]
CLUSTER = ["--etcd-endpoints", "etcd-0:2379", "--job-id", "job1"]


def load(argv: list[str], environ: dict[str, str] | None = None) -> AgentConfig:
    return load_config(
        argv,
        environ or {},
        hostname=lambda: "host-a",
        fqdn=lambda: "host-a.example.com",
        random_hex=lambda: "abc123",
    )


def error_of(argv: list[str], environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        load(argv, environ)
    message = str(caught.value)
    assert "\n" not in message
    assert caught.value.exit_code == 2
    return message


def test_defaults() -> None:
    config = load(CLUSTER + CMD)
    assert config.min_nodes == 1 and config.max_nodes == 1
    assert config.nproc_per_node == 1
    assert config.etcd_endpoints == (("etcd-0", 2379),)
    assert config.job_id == "job1"
    assert config.node_id == "host-a-abc123"
    assert config.node_addr == "host-a.example.com"
    assert config.checkpoint_dir is None
    assert config.max_restarts == 3
    assert (config.metrics_addr, config.metrics_port) == ("127.0.0.1", 29600)
    assert config.standalone is False
    assert config.log_dir == Path.cwd() / "elastic-agent-logs"  # absolute: workers may chdir
    assert config.shutdown_timeout == 10.0
    assert config.lease_ttl == 10.0
    assert config.last_call == Settings.last_call == 0.5
    assert config.scale_up_cooldown == Settings.scale_up_cooldown == 1.0
    assert config.drain_timeout == 60.0
    assert config.hang_timeout == 0.0
    assert config.preemption_source == "none"
    assert config.monitor_interval == 0.1
    assert config.log_level == "info"
    assert config.config_file is None
    assert config.command == ("python", "train.py", "--lr", "3e-4")


def test_standalone_defaults() -> None:
    config = load(["--standalone"] + CMD)
    assert config.standalone is True
    assert config.job_id == "standalone"
    assert config.node_addr == "127.0.0.1"
    assert config.etcd_endpoints == ()


def test_every_flag_parses() -> None:
    config = load(
        [
            "--min-nodes", "2", "--max-nodes", "4", "--nproc-per-node", "gpu",
            "--etcd-endpoints", "http://e0:2379,e1:2380/,[::1]:2381", "--job-id", "llama-ft.v2",
            "--node-id", "n_1", "--node-addr", "10.0.0.7", "--checkpoint-dir", "/ckpt",
            "--max-restarts", "0", "--metrics-addr", "0.0.0.0", "--metrics-port", "0",
            "--log-dir", "/logs", "--shutdown-timeout", "2.5", "--lease-ttl", "2",
            "--last-call", "0", "--scale-up-cooldown", "0", "--drain-timeout", "5",
            "--hang-timeout", "30", "--preemption-source", "AWS", "--monitor-interval", "0.05",
            "--log-level", "debug",
        ]
        + CMD
    )
    assert (config.min_nodes, config.max_nodes, config.nproc_per_node) == (2, 4, "gpu")
    assert config.etcd_endpoints == (("e0", 2379), ("e1", 2380), ("::1", 2381))
    assert config.endpoints_text == "e0:2379,e1:2380,[::1]:2381"
    assert (config.job_id, config.node_id, config.node_addr) == ("llama-ft.v2", "n_1", "10.0.0.7")
    assert config.checkpoint_dir == Path("/ckpt") and config.log_dir == Path("/logs")
    assert (config.max_restarts, config.metrics_addr, config.metrics_port) == (0, "0.0.0.0", 0)
    assert (config.shutdown_timeout, config.lease_ttl, config.last_call) == (2.5, 2.0, 0.0)
    assert (config.scale_up_cooldown, config.drain_timeout, config.hang_timeout) == (0.0, 5.0, 30.0)
    assert (config.preemption_source, config.monitor_interval, config.log_level) == ("aws", 0.05, "debug")


def test_nnodes_forms() -> None:
    config = load(["--nnodes", "3"] + CLUSTER + CMD)
    assert (config.min_nodes, config.max_nodes) == (3, 3)
    config = load(["--nnodes", "2:5"] + CLUSTER + CMD)
    assert (config.min_nodes, config.max_nodes) == (2, 5)
    # Agreeing with min/max in the same layer is fine.
    config = load(["--nnodes", "2:5", "--min-nodes", "2"] + CLUSTER + CMD)
    assert (config.min_nodes, config.max_nodes) == (2, 5)


def test_precedence_flag_over_env_over_pet_over_file_over_default(tmp_path: Path) -> None:
    config_file = tmp_path / "agent.toml"
    config_file.write_text(
        'max-restarts = 5\nmax_nodes = 8\njob-id = "from-file"\netcd-endpoints = ["f:1"]\n'
        "lease-ttl = 20\nhang-timeout = 7\n"
    )
    environ = {
        "PET_MAX_RESTARTS": "6",
        "PET_RDZV_ID": "from-pet",
        "PET_RDZV_ENDPOINT": "p:2",
        "PET_NPROC_PER_NODE": "4",
        "ELASTIC_AGENT_MAX_RESTARTS": "7",
        "ELASTIC_AGENT_JOB_ID": "from-env",
        "ELASTIC_AGENT_LEASE_TTL": "30",
    }
    config = load(["--config", str(config_file), "--max-restarts", "9"] + CMD, environ)
    assert config.max_restarts == 9  # flag
    assert config.job_id == "from-env"  # env over PET over file
    assert config.lease_ttl == 30.0  # env over file
    assert config.etcd_endpoints == (("p", 2),)  # PET over file
    assert config.nproc_per_node == 4  # PET over default
    assert config.max_nodes == 8  # file over default
    assert config.hang_timeout == 7.0  # file
    assert config.shutdown_timeout == 10.0  # default
    assert config.config_file == config_file


def test_pet_nnodes_and_env_min_combine() -> None:
    environ = {"PET_NNODES": "1:4", "ELASTIC_AGENT_MIN_NODES": "2"}
    config = load(CLUSTER + CMD, environ)
    assert (config.min_nodes, config.max_nodes) == (2, 4)


def test_config_path_from_env(tmp_path: Path) -> None:
    config_file = tmp_path / "agent.toml"
    config_file.write_text("min-nodes = 2\nmax-nodes = 3\n")
    config = load(CLUSTER + CMD, {"ELASTIC_AGENT_CONFIG": str(config_file)})
    assert (config.min_nodes, config.max_nodes) == (2, 3)


@pytest.mark.parametrize("word,expected", [("1", True), ("yes", True), ("TRUE", True), ("0", False), ("no", False), ("false", False)])
def test_env_booleans(word: str, expected: bool) -> None:
    argv = CMD if expected else CLUSTER + CMD  # standalone needs no cluster flags
    assert load(argv, {"ELASTIC_AGENT_STANDALONE": word}).standalone is expected


def test_default_node_id_is_sanitised() -> None:
    config = load_config(CLUSTER + CMD, {}, hostname=lambda: "my host!", random_hex=lambda: "0f0f0f")
    assert config.node_id == "my-host-0f0f0f"


@pytest.mark.parametrize(
    "argv,environ,message",
    [
        (["--min-nodes", "5", "--max-nodes", "4"] + CLUSTER + CMD, {}, "--min-nodes (5) must be <= --max-nodes (4)"),
        (["--min-nodes", "3"] + CLUSTER + CMD, {"PET_NNODES": "2"}, "--min-nodes (3) must be <= --max-nodes (2, from PET_NNODES)"),
        (["--min-nodes", "0"] + CLUSTER + CMD, {}, "--min-nodes ('0') must be a positive integer"),
        (["--max-nodes", "x"] + CLUSTER + CMD, {}, "--max-nodes ('x') must be a positive integer"),
        (["--nproc-per-node", "x"] + CLUSTER + CMD, {}, "--nproc-per-node ('x') must be a positive integer or 'gpu'"),
        (["--nproc-per-node", "0"] + CLUSTER + CMD, {}, "--nproc-per-node ('0') must be a positive integer or 'gpu'"),
        (["--etcd-endpoints", "a:b", "--job-id", "j"] + CMD, {}, "--etcd-endpoints ('a:b') must be host:port[,host:port...]"),
        (["--etcd-endpoints", "a:1,", "--job-id", "j"] + CMD, {}, "--etcd-endpoints ('a:1,') must be host:port[,host:port...]"),
        (["--etcd-endpoints", "https://a:1,http://b:1", "--job-id", "j"] + CMD, {}, "--etcd-endpoints ('https://a:1,http://b:1') must use one scheme for every member: all http:// or all https://"),
        (["--etcd-endpoints", "a:70000", "--job-id", "j"] + CMD, {}, "--etcd-endpoints ('a:70000') must be host:port[,host:port...]"),
        (CLUSTER, {}, "missing command: put the training command after '--'"),
        (CLUSTER + ["--"], {}, "missing command: put the training command after '--'"),
        (CLUSTER + ["python", "train.py"], {}, "unexpected argument 'python': put the training command after '--'"),
        (["--min-node", "2"] + CLUSTER + CMD, {}, "unknown flag '--min-node' (see elastic-agent start --help)"),
        (["--job-id"], {}, "--job-id: expected a value"),
        (["--job-id", "j"] + CMD, {}, "--etcd-endpoints is required (or set ELASTIC_AGENT_ETCD_ENDPOINTS, or use --standalone)"),
        (["--etcd-endpoints", "e:1"] + CMD, {}, "--job-id is required (or set ELASTIC_AGENT_JOB_ID, or use --standalone)"),
        (["--etcd-endpoints", "e:1", "--job-id", "a b"] + CMD, {}, "--job-id ('a b') must be 1-128 characters of letters, digits, '_', '.', '-', starting with a letter or digit"),
        (["--job-id", "x" * 129, "--etcd-endpoints", "e:1"] + CMD, {}, f"--job-id ({'x' * 129!r}) must be 1-128 characters of letters, digits, '_', '.', '-', starting with a letter or digit"),
        (["--node-id", "n/1"] + CLUSTER + CMD, {}, "--node-id ('n/1') must be 1-128 characters of letters, digits, '_', '.', '-', starting with a letter or digit"),
        (["--max-restarts", "-1"] + CLUSTER + CMD, {}, "--max-restarts ('-1') must be an integer >= 0"),
        (["--metrics-port", "65536"] + CLUSTER + CMD, {}, "--metrics-port ('65536') must be an integer in 0..65535 (0 = pick a free port)"),
        (["--shutdown-timeout", "0"] + CLUSTER + CMD, {}, "--shutdown-timeout ('0') must be a number of seconds > 0"),
        (["--lease-ttl", "1.5"] + CLUSTER + CMD, {}, "--lease-ttl ('1.5') must be a number of seconds >= 2"),
        (["--last-call", "-1"] + CLUSTER + CMD, {}, "--last-call ('-1') must be a number of seconds >= 0"),
        (["--scale-up-cooldown", "soon"] + CLUSTER + CMD, {}, "--scale-up-cooldown ('soon') must be a number of seconds >= 0"),
        (["--drain-timeout", "nan"] + CLUSTER + CMD, {}, "--drain-timeout ('nan') must be a number of seconds > 0"),
        (["--hang-timeout", "-0.5"] + CLUSTER + CMD, {}, "--hang-timeout ('-0.5') must be a number of seconds >= 0"),
        (["--monitor-interval", "0"] + CLUSTER + CMD, {}, "--monitor-interval ('0') must be a number of seconds > 0"),
        (["--preemption-source", "ibm"] + CLUSTER + CMD, {}, "--preemption-source ('ibm') must be one of none|aws|gcp|azure|auto"),
        (["--log-level", "trace"] + CLUSTER + CMD, {}, "--log-level ('trace') must be one of debug|info|warning|error"),
        (["--nnodes", "4:2"] + CLUSTER + CMD, {}, "--nnodes ('4:2') must be N or MIN:MAX with 1 <= MIN <= MAX"),
        (["--nnodes", "2:4", "--max-nodes", "3"] + CLUSTER + CMD, {}, "--nnodes (2:4) conflicts with --max-nodes (3): give one or the other"),
        (["--standalone", "--etcd-endpoints", "e:1"] + CMD, {}, "--etcd-endpoints ('e:1') cannot be used with --standalone, which starts its own etcd: drop one of them"),
        (CLUSTER + CMD, {"ELASTIC_AGENT_MIN_NODES": "two"}, "--min-nodes ('two') must be a positive integer (from ELASTIC_AGENT_MIN_NODES)"),
        (CLUSTER + CMD, {"ELASTIC_AGENT_STANDALONE": "maybe"}, "--standalone ('maybe') must be one of 1, 0, true, false, yes, no (from ELASTIC_AGENT_STANDALONE)"),
        (CLUSTER + CMD, {"PET_NNODES": "1:x"}, "--nnodes ('1:x') must be N or MIN:MAX with 1 <= MIN <= MAX (from PET_NNODES)"),
        (["--config", "/nonexistent/agent.toml"] + CLUSTER + CMD, {}, "--config ('/nonexistent/agent.toml'): cannot read: No such file or directory"),
    ],
)
def test_errors_are_one_line_naming_the_flag(argv: list[str], environ: dict[str, str], message: str) -> None:
    assert error_of(argv, environ) == message


def test_config_file_unknown_key(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text("min-node = 2\n")
    assert error_of(["--config", str(path)] + CLUSTER + CMD) == (
        f"config file {path}: unknown key 'min-node' "
        "(keys are the start flags without '--', e.g. 'min-nodes'); did you mean 'min-nodes'?"
    )


def test_config_file_syntax_error(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text("min-nodes = = 2\n")
    message = error_of(["--config", str(path)] + CLUSTER + CMD)
    assert message.startswith(f"config file {path}: invalid TOML: ")
    assert "line 1" in message


def test_config_file_bad_value_names_file_and_flag(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text("lease-ttl = true\n")
    assert error_of(["--config", str(path)] + CLUSTER + CMD) == (
        f"--lease-ttl (True) must be a number of seconds >= 2 (from config file {path})"
    )


def test_help_exits_zero_without_raising_config_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        load(["--help"])
    assert caught.value.code == 0
    assert "--min-nodes" in capsys.readouterr().out
