"""Fuzzed flags, environment and config files (DESIGN.md invariant 5): ``elastic-agent start``
either gets a configuration that is sound all the way through, or one line naming the setting
and exit 2; never a traceback.

In process, hypothesis drives :func:`agent.daemon.config.layers.load_config` with command lines,
``ELASTIC_AGENT_*`` / ``PET_*`` variables and TOML files made of the flags the option table
knows and values chosen to sit on every parser's edges (huge, non-finite, non-ASCII digits,
control characters, wrong TOML types, undecodable bytes). A few of the failures it found are
then run through the real ``elastic-agent start`` to check the exit code and the one line.
Derandomized and bounded, so a run takes seconds and is the same every time.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from agent.daemon.config.layers import AgentConfig, load_config, prepare_directories
from agent.daemon.config.options import OPTIONS, PET_VARS, SWITCH, TOGGLE, flags
from agent.errors import ConfigError

FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
ROOT = Path(__file__).resolve().parents[2]
AGENT = Path(sys.executable).with_name("elastic-agent")
ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")
PATH_FIELDS = {o.field for o in OPTIONS if o.parse.__name__ == "path"}
SECONDS_FIELDS = {"shutdown_timeout", "lease_ttl", "presence_ttl", "etcd_wait", "last_call",
                  "scale_up_cooldown", "drain_timeout", "hang_timeout", "monitor_interval"}
VALUE_FLAGS = sorted(o.flag for o in OPTIONS if o.kind not in (SWITCH, TOGGLE) and o.field not in PATH_FIELDS)
PATH_FLAGS = sorted(o.flag for o in OPTIONS if o.field in PATH_FIELDS)
KEYS = sorted(o.field.replace("_", "-") for o in OPTIONS)

# Text on every parser's edge; none holds a NUL (argv and the environment cannot).
EDGES = [
    "", " ", "0", "1", "2", "-1", "3", "4", "65535", "65536", "1" + "0" * 30, "9" * 5000,
    "0.5", "1e308", "1e309", "-0.0", "nan", "inf", "-inf", "1_000", "0x10", " 7 ",
    "١", "٣", "²", "Ⅻ", "gpu", "GPU", "1:2", "2:1", "1:2:3", ":", "0:1,1:2", "0:4", "1,2", "0,",
    "true", "yes", "off", "aws", "none", "debug", "${rank}", "${nope}", "$", "job\n", "a b",
    "job\r", "\t", "etcd-0:2379", "http://e:1,https://e:2", "[::1]:2379", "e:0", "e:١٢", "https://e:1/",
    "[]:1", "e:2379,", ",", "héllo", "a" * 129, "-", "--", "--min-nodes", "=",
]
text_values = st.one_of(st.sampled_from(EDGES), st.text(st.characters(exclude_characters="\x00"), max_size=12))
# Paths stay relative (the test runs in a temporary directory) and short enough to create.
path_values = st.one_of(st.sampled_from(["ckpt", "a b", "logs/x", "~nope", ".", "é", "x" * 300, " ", ""]),
                        st.text(st.characters(exclude_characters="\x00/"), min_size=1, max_size=8))


@st.composite
def command_lines(draw) -> list[str]:
    argv: list[str] = []
    for _ in range(draw(st.integers(0, 7))):
        kind = draw(st.sampled_from(["value", "value", "path", "flag", "junk", "equals"]))
        if kind == "value":
            argv += [draw(st.sampled_from(VALUE_FLAGS)), draw(text_values)]
        elif kind == "path":
            argv += [draw(st.sampled_from(PATH_FLAGS)), draw(path_values)]
        elif kind == "flag":
            argv.append(draw(st.sampled_from(sorted(flags()) + ["--nope", "-x", "--etcd-password"])))
        elif kind == "equals":
            argv.append(f"{draw(st.sampled_from(VALUE_FLAGS))}={draw(text_values)}")
        else:
            argv.append(draw(text_values))
    base = draw(st.sampled_from([["--etcd-endpoints", "e:2379", "--job-id", "j"], ["--standalone"], []]))
    command = draw(st.sampled_from([["--", "true"], ["--"], []]))
    return base + argv + command


@st.composite
def environments(draw) -> dict[str, str]:
    names = [o.env_var for o in OPTIONS] + sorted(PET_VARS)
    chosen = draw(st.lists(st.sampled_from(names), max_size=4, unique=True))
    return {name: draw(path_values if name.removeprefix("ELASTIC_AGENT_").lower() in PATH_FIELDS else text_values)
            for name in chosen}


def toml_string(text: str) -> str:
    out = []
    for char in text:
        if char in '"\\' or ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_string(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    return value.isoformat()  # date, time, datetime


scalars = st.one_of(
    st.integers(), st.sampled_from([0, 1, -1, 65536, 2**63 - 1, -(2**63), 10**400]),
    st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
    st.text(max_size=10), st.sampled_from(EDGES + ["a\x00b", "\x00", "host\x07"]),
    st.dates(), st.datetimes(), st.times(),
)
toml_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=2)), max_leaves=4)


@st.composite
def config_files(draw) -> bytes:
    kind = draw(st.sampled_from(["toml", "toml", "toml", "bytes", "truncated"]))
    if kind == "bytes":
        return draw(st.sampled_from([b"\xff\xfe", b"min-nodes = \xc3", b"\x00", b"[[", b"= 1", b"a = 1\na = 2"])
                    | st.binary(max_size=40))
    keys = draw(st.lists(st.sampled_from(KEYS + ["etcd-password", "min_nodes", "nope"]), max_size=5, unique=True))
    lines = []
    for key in keys:
        field = key.replace("-", "_")
        value = draw(path_values if field in PATH_FIELDS and draw(st.booleans()) else toml_values)
        lines.append(f"{key} = {toml_value(value)}")
    text = "\n".join(lines).encode()
    if kind == "truncated" and text:
        text = text[: draw(st.integers(0, len(text) - 1))]
    return text


def sound(config: AgentConfig) -> None:
    """What a configuration that load_config accepted must be, for the agent to start on it."""
    assert ID.fullmatch(config.job_id) and ID.fullmatch(config.node_id), (config.job_id, config.node_id)
    for host in (config.node_addr, config.metrics_addr):
        assert host and not any(c.isspace() or ord(c) < 0x20 for c in host), host
    for field in SECONDS_FIELDS:
        value = getattr(config, field)
        # A wait the agent cannot do would be a traceback later (threading's OverflowError).
        assert math.isfinite(value) and 0 <= value <= threading.TIMEOUT_MAX, (field, value)
    for field in PATH_FIELDS | {"log_dir"}:
        value = getattr(config, field)
        assert value is None or "\x00" not in str(value), (field, value)
    assert 1 <= config.min_nodes <= config.max_nodes
    assert config.nproc_per_node == "gpu" or config.nproc_per_node >= 1
    assert 0 <= config.metrics_port <= 65535
    assert config.command and config.etcd_endpoints or config.standalone
    config.rendezvous_settings()  # the rendezvous takes it as it is


def one_line(exc: ConfigError) -> None:
    message = str(exc)
    assert message.strip() and "\n" not in message and "\r" not in message, message
    assert exc.exit_code == 2


def load(argv: list[str], environ: dict[str, str]) -> None:
    """load_config, then the directories start makes: a sound config or a ConfigError, nothing else."""
    try:
        config = load_config(argv, environ, hostname=lambda: "host", fqdn=lambda: "host.example",
                             random_hex=lambda: "abc123")
        sound(config)
        prepare_directories(config)
    except ConfigError as exc:
        one_line(exc)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)  # relative --log-dir and --checkpoint-dir land here
    return tmp_path


@FUZZ
@given(argv=command_lines(), environ=environments())
@example(argv=["--standalone", "--local-ranks-filter", "²", "--", "true"], environ={})
@example(argv=["--etcd-endpoints", "e:1", "--job-id", "job\n", "--", "true"], environ={})
@example(argv=["--standalone", "--monitor-interval", "1e300", "--", "true"], environ={})
def test_flags_and_environment_give_a_sound_config_or_one_line(in_tmp, argv, environ) -> None:
    load(argv, environ)


@FUZZ
@given(content=config_files(), argv=command_lines())
@example(content=b"\xff\xfe", argv=["--standalone", "--", "true"])
@example(content=b'etcd-endpoints = ["e:1", 2]\njob-id = "j"', argv=["--", "true"])
@example(content=b"lease-ttl = 1" + b"0" * 400, argv=["--standalone", "--", "true"])
@example(content=b'checkpoint-dir = "a\\u0000b"', argv=["--standalone", "--", "true"])
@example(content=b'node-addr = "a\\u0000b"', argv=["--standalone", "--", "true"])
@example(content=b'etcd-password-file = "p\\u0000"\netcd-user = "u"', argv=["--standalone", "--", "true"])
def test_config_files_give_a_sound_config_or_one_line(in_tmp, content, argv) -> None:
    path = in_tmp / "agent.toml"
    path.write_bytes(content)
    load(["--config", str(path)] + argv, {})


# The real command, for failures of each layer: exit 2 and one line on stderr, no traceback.
REAL_CASES = [
    (["--standalone", "--local-ranks-filter", "²"], None),
    (["--etcd-endpoints", "e:1", "--job-id", "job\n"], None),
    (["--standalone", "--monitor-interval", "1e300"], None),
    (["--standalone", "--min-nodes", "١", "--max-nodes", "0"], None),
    (["--standalone"], b"\xff\xfe"),
    (["--standalone"], b'etcd-endpoints = ["e:1", 2]'),
    (["--standalone"], b"lease-ttl = 1" + b"0" * 400),
    (["--standalone"], b'checkpoint-dir = "a\\u0000b"'),
    (["--standalone"], b'[min-nodes]\nx = 1'),
]


@pytest.mark.parametrize("flags_, content", REAL_CASES)
def test_the_real_start_exits_2_with_one_line(tmp_path, flags_, content) -> None:
    argv = list(flags_)
    if content is not None:
        (tmp_path / "agent.toml").write_bytes(content)
        argv = ["--config", str(tmp_path / "agent.toml")] + argv
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ELASTIC_AGENT_", "PET_"))}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run([str(AGENT), "start", *argv, "--", "true"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith("elastic-agent: error: "), done.stderr
    assert "Traceback" not in done.stderr
