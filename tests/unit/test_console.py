"""agent.daemon.config.console: --redirects, --tee, --local-ranks-filter and the line prefix mean what
they mean to torchrun 2.13 (checked against torch's own DefaultLogsSpecs), and bad values are
one line naming the flag and the form."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from agent.daemon.config.console import (
    DEFAULT_TEMPLATE,
    ConsoleSettings,
    PerRank,
    Route,
    Streams,
    local_ranks,
    per_rank_streams,
    prefix_template,
)
from agent.daemon.config.layers import AgentConfig, load_config
from agent.daemon.config.values import Invalid
from agent.daemon.workers.spawn import for_rank, with_local_rank_arg
from agent.errors import ConfigError

CMD = ["--", "python", "train.py"]
CLUSTER = ["--etcd-endpoints", "etcd-0:2379", "--job-id", "job1"]
SPECS = ["0", "1", "2", "3", "0:1", "1:2", "0:3,1:0", "0:2,1:1,2:3"]
FILTERS = ["", "0", "1", "0,2"]


def load(argv: list[str], environ: dict[str, str] | None = None) -> AgentConfig:
    return load_config(argv + CLUSTER + CMD, environ or {}, hostname=lambda: "h", fqdn=lambda: "h",
                       random_hex=lambda: "000000")


def error_of(argv: list[str], environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        load(argv, environ)
    assert caught.value.exit_code == 2 and "\n" not in str(caught.value)
    return str(caught.value)


def torchrun_console(redirects: str, tee: str, ranks_filter: str, nproc: int, tmp_path: Path) -> dict:
    """Which (local rank, stream) torchrun's own DefaultLogsSpecs puts on the console."""
    from torch.distributed.elastic.multiprocessing.api import DefaultLogsSpecs, Std  # noqa: PLC0415

    specs = DefaultLogsSpecs(log_dir=str(tmp_path), redirects=Std.from_str(redirects), tee=Std.from_str(tee),
                             local_ranks_filter={int(r) for r in ranks_filter.split(",")} if ranks_filter else None)
    envs = {r: {"TORCHELASTIC_RUN_ID": "run"} for r in range(nproc)}
    dest = specs.reify(envs)  # type: ignore[arg-type]
    shown = {}
    for r in range(nproc):
        # "" is torchrun's SYS_STREAM (the worker writes to the console itself); a tee'd file is tailed to it.
        shown[r, "out"] = dest.stdouts[r] == "" or r in dest.tee_stdouts
        shown[r, "err"] = dest.stderrs[r] == "" or r in dest.tee_stderrs
    return shown


def test_console_streams_match_torchrun_for_every_combination(tmp_path: Path) -> None:
    nproc = 3
    for n, (redirects, tee, ranks_filter) in enumerate(itertools.product(SPECS, SPECS, FILTERS)):
        theirs = torchrun_console(redirects, tee, ranks_filter, nproc, tmp_path / str(n))
        settings = ConsoleSettings(per_rank_streams(redirects), per_rank_streams(tee),
                                   local_ranks(ranks_filter) if ranks_filter else None)
        ours = {}
        for r in range(nproc):
            route = settings.route(local_rank=r, rank=r, node_id="n")
            ours[r, "out"], ours[r, "err"] = route.stdout, route.stderr
        assert ours == theirs, (redirects, tee, ranks_filter)


def test_the_default_shows_everything_with_todays_prefix() -> None:
    config = load([])
    settings = ConsoleSettings.of(config)
    assert settings.route(local_rank=1, rank=5, node_id="node-a") == Route("[node-a/5] ", True, True)
    assert Route.labelled("node-a/5") == Route("[node-a/5] ")


def test_every_form_from_flags_env_and_config_file(tmp_path: Path) -> None:
    config = load(["--redirects", "3", "--tee", "0:1,1:2", "--local-ranks-filter", "0,1",
                   "--log-line-prefix-template", "${role_name}${local_rank}|", "--local-rank-arg"])
    assert config.redirects == PerRank(Streams.BOTH)
    assert config.tee == PerRank(Streams.NONE, ((0, Streams.OUT), (1, Streams.ERR)))
    assert config.local_ranks_filter == frozenset({0, 1})
    assert config.local_rank_arg is True
    route = ConsoleSettings.of(config).route(local_rank=1, rank=9, node_id="n", role_name="trainer")
    assert route == Route("trainer1|", stdout=False, stderr=True)

    environ = {"ELASTIC_AGENT_REDIRECTS": "2", "ELASTIC_AGENT_LOCAL_RANKS_FILTER": "1",
               "ELASTIC_AGENT_LOG_LINE_PREFIX": "0", "ELASTIC_AGENT_LOCAL_RANK_ARG": "yes"}
    config = load([], environ)
    assert (config.redirects, config.local_ranks_filter) == (PerRank(Streams.ERR), frozenset({1}))
    assert config.local_rank_arg is True and ConsoleSettings.of(config).template == ""

    path = tmp_path / "agent.toml"
    path.write_text('redirects = 1\ntee = "0:1"\nlocal-ranks-filter = [0, 2]\n'
                    'log-line-prefix-template = ""\nlocal-rank-arg = true\n')
    config = load(["--config", str(path)])
    assert (config.redirects, config.tee) == (PerRank(Streams.OUT), PerRank(Streams.NONE, ((0, Streams.OUT),)))
    assert config.local_ranks_filter == frozenset({0, 2}) and config.local_rank_arg is True
    assert ConsoleSettings.of(config).route(local_rank=0, rank=0, node_id="n").prefix == ""


def test_the_prefix_switch_the_empty_template_and_torchruns_variable() -> None:
    assert ConsoleSettings.of(load(["--no-log-line-prefix"])).template == ""
    assert ConsoleSettings.of(load(["--log-line-prefix-template", ""])).template == ""
    torchrun_var = {"TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE": "[${rank}]:"}
    assert load([], torchrun_var).log_line_prefix_template == "[${rank}]:"
    both = {**torchrun_var, "ELASTIC_AGENT_LOG_LINE_PREFIX_TEMPLATE": "${node_id}> "}
    assert load([], both).log_line_prefix_template == "${node_id}> "  # ours over torchrun's
    assert load([]).log_line_prefix_template == DEFAULT_TEMPLATE == "[${node_id}/${rank}] "
    assert str(PerRank()) == "0" and str(per_rank_streams("1:2,0:3")) == "0:3,1:2"


@pytest.mark.parametrize(("argv", "environ", "message"), [
    (["--redirects", "4"], {}, "--redirects ('4') must be 0 (none), 1 (stdout), 2 (stderr) or 3 (both), or per "
                               "local rank LOCAL_RANK:N[,LOCAL_RANK:N...] (e.g. 0:1,1:2)"),
    (["--tee", "0:1,"], {}, "--tee ('0:1,') must be 0 (none), 1 (stdout)"),
    (["--tee", "a:1"], {}, "--tee ('a:1') must be 0 (none)"),
    ([], {"ELASTIC_AGENT_REDIRECTS": "both"}, "--redirects ('both') must be 0 (none), 1 (stdout), 2 (stderr) or "
                                              "3 (both), or per local rank LOCAL_RANK:N[,LOCAL_RANK:N...] "
                                              "(e.g. 0:1,1:2) (from ELASTIC_AGENT_REDIRECTS)"),
    (["--local-ranks-filter", "0,-1"], {}, "--local-ranks-filter ('0,-1') must be local ranks (integers >= 0) "
                                           "separated by commas, e.g. 0 or 0,1"),
    (["--local-ranks-filter", ","], {}, "--local-ranks-filter (',') must be local ranks"),
    (["--log-line-prefix-template", "[${host}]"], {}, "--log-line-prefix-template ('[${host}]') must be text "
     "whose only placeholders are ${node_id}, ${rank}, ${local_rank}, ${role_name} (write $$ for a literal $)"),
    (["--log-line-prefix-template", "cost $5"], {}, "--log-line-prefix-template ('cost $5') must be text"),
    ([], {"TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE": "${hostname}"},
     "(from TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE)"),
    ([], {"ELASTIC_AGENT_LOCAL_RANK_ARG": "maybe"}, "--local-rank-arg ('maybe') must be one of 1, 0, true"),
])
def test_bad_values_are_one_line_naming_the_flag_and_the_form(argv, environ, message) -> None:
    assert message in error_of(argv, environ)


def test_config_file_forms_that_are_wrong(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text("local-ranks-filter = [true]\nredirects = 7\n")
    assert "--local-ranks-filter ([True]) must be local ranks" in error_of(["--config", str(path)])


@pytest.mark.parametrize("raw", [True, None, 1.5, "", " "])
def test_parsers_refuse_other_types(raw) -> None:
    for parse in (per_rank_streams, local_ranks):
        with pytest.raises(Invalid):
            parse(raw)
    if raw is not None and not isinstance(raw, str):
        with pytest.raises(Invalid):
            prefix_template(raw)


@pytest.mark.parametrize(("command", "expected"), [
    (["python", "train.py", "--lr", "3"], ["python", "train.py", "--local-rank=1", "--lr", "3"]),
    (["/usr/bin/python3.11", "-u", "-X", "dev", "train.py"], ["/usr/bin/python3.11", "-u", "-X", "dev", "train.py",
                                                              "--local-rank=1"]),
    (["python", "-m", "pkg.train", "a"], ["python", "-m", "pkg.train", "--local-rank=1", "a"]),
    (["./train.sh", "a"], ["./train.sh", "--local-rank=1", "a"]),
])
def test_local_rank_arg_goes_where_torch_distributed_launch_put_it(command, expected) -> None:
    assert for_rank(with_local_rank_arg(command), 1) == expected


def test_the_local_rank_macro_is_substituted_in_arguments_only() -> None:
    assert for_rank(["${local_rank}", "--out=/o/${local_rank}", "$$x"], 2) == ["${local_rank}", "--out=/o/2", "$$x"]
