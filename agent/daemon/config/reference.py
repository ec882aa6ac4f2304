"""docs/configuration.md, rendered from the option table (agent.daemon.config.options).

    python -m agent.daemon.config.reference           # print it
    python -m agent.daemon.config.reference --write   # write docs/configuration.md
    python -m agent.daemon.config.reference --check   # exit 1 when the committed file differs

tests/unit/test_config_reference.py fails when the committed file is not what this renders,
so a new or changed option cannot ship without its reference entry.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from agent.daemon.config.layers import PASSWORD_VAR
from agent.daemon.config.options import (
    CONFIG_HELP,
    CONNECTION_FIELDS,
    NO_DEFAULT,
    OPTIONS,
    PET_VARS,
    SWITCH,
    TOGGLE,
    Option,
    env_var,
    flag,
)

DOC = Path(__file__).resolve().parents[3] / "docs" / "configuration.md"

# What a setting without a fixed default is, in words (agent.daemon.config.layers derives these).
DERIVED = {
    "max_nodes": "= `--min-nodes`",
    "nnodes": "none",
    "etcd_endpoints": "required (none with `--standalone`)",
    "job_id": "required (`standalone` with `--standalone`)",
    "node_id": "host name + `-` + 6 random hex digits",
    "node_addr": "the host's FQDN (`127.0.0.1` with `--standalone`)",
}
SPECIAL_DEFAULTS = {"local_ranks_filter": "every local rank"}

HEADER = """\
# Configuration reference

<!-- Generated from agent/daemon/config/options.py by `python -m agent.daemon.config.reference --write`.
     Do not edit by hand: tests/unit/test_config_reference.py fails when the two differ. -->

Every setting of `elastic-agent start` is a flag, an environment variable and a key of the
TOML file given with `--config` (or `ELASTIC_AGENT_CONFIG`): the setting `min_nodes` is
`--min-nodes 2`, `ELASTIC_AGENT_MIN_NODES=2` and `min-nodes = 2`. Layers, highest first:
flags, `ELASTIC_AGENT_*` variables, the torchrun variables below, the config file, the
defaults. Every value goes through the same parser whatever its source; a bad one stops the
agent before it does anything, with one line naming the flag, the value, where it came from
and the form expected, and exit code 2:

    elastic-agent: error: --redirects ('both') must be 0 (none), 1 (stdout), 2 (stderr) or 3 (both), or per local rank LOCAL_RANK:N[,LOCAL_RANK:N...] (e.g. 0:1,1:2) (from ELASTIC_AGENT_REDIRECTS)

An environment variable set to the empty string counts as unset. Switches take `1`, `0`,
`true`, `false`, `yes`, `no` as variables and `true` / `false` in the file.
"""

OUTPUT = """\
## Worker output on the console

The agent always writes every worker's stdout and stderr to
`<log-dir>/<job-id>/<node-id>/<attempt>/<local rank>/{stdout,stderr}.log`. What the agent's
own console shows follows torchrun's meaning of its flags (the agent's console plays the part
of torchrun's: worker stdout goes to the agent's stdout, worker stderr to its stderr):

| you want | torchrun | elastic-agent |
|---|---|---|
| every line on the console, prefixed | `--tee 3` | the default |
| a quiet console, everything in the files | `--redirects 3` | `--redirects 3` |
| only stderr on the console | `--redirects 1` | `--redirects 1` |
| stderr of every rank, stdout of local rank 0 only | `--redirects 3 --tee 0:3,1:2,2:2,3:2` | the same, or `--redirects 1:1,2:1,3:1` |
| only local rank 0 on the console | `--local-ranks-filter 0` | `--local-ranks-filter 0` |
| lines as the worker wrote them | the default (no prefix) | `--no-log-line-prefix` |
| `[3]:line` | `TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE='[${rank}]:'` | the same variable, or `--log-line-prefix-template '[${rank}]:'` |

- A stream reaches the console unless `--redirects` names it for that local rank and
  `--tee` does not (a stream in both is shown, as torchrun tees a redirected stream back).
  A per-rank map (`0:1,1:2`) leaves the ranks it does not name at `0`.
- `--local-ranks-filter` keeps every other local rank off the console entirely.
- The prefix template is the whole start of the line (the line follows it directly, so the
  default `[${node_id}/${rank}] ` ends in a space). Placeholders: `${node_id}`, `${rank}`
  (global rank), `${local_rank}`, `${role_name}` (`default`); `$$` is a literal `$`; any
  other placeholder is refused at start. `--no-log-line-prefix` or an empty template (on the
  command line or in the file; an empty variable means unset) turns the prefix off.
- `--local-rank-arg` adds `--local-rank=N` right after the script (`python [OPTIONS] SCRIPT`,
  `python -m MODULE`; for any other program, right after the program), as
  `torch.distributed.launch` did. Any argument containing `${local_rank}` gets the local rank,
  as under torchrun, so other programs can place it themselves:
  `-- bash run.sh --local-rank=${local_rank}` (quote it from your shell).
"""


def default_text(option: Option) -> str:
    if option.field in SPECIAL_DEFAULTS:
        return SPECIAL_DEFAULTS[option.field]
    value: Any = option.default
    if value is NO_DEFAULT:
        return DERIVED[option.field]  # a KeyError here: say what the derived default is
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None:
        return "none"
    if isinstance(value, float):
        return f"`{value:g}`"
    return f"`{value}`"


def flag_text(option: Option) -> str:
    metavar = f" {option.metavar}" if option.metavar else ""
    if option.kind == TOGGLE:
        return f"`{option.flag}` / `--no-{option.flag[2:]}`"
    if option.kind == SWITCH:
        return f"`{option.flag}`"
    return f"`{option.flag}{metavar}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def settings_table() -> str:
    rows = ["| flag | variable | config key | default | meaning |", "|---|---|---|---|---|"]
    for option in OPTIONS:
        key = option.field.replace("_", "-")
        rows.append(f"| {_cell(flag_text(option))} | `{option.env_var}` | `{key}` | {_cell(default_text(option))} | "
                    f"{_cell(option.help)} |")
    rows.append(f"| `--config PATH` | `{env_var('config')}` | (none) | none | {_cell(CONFIG_HELP)} |")
    return "\n".join(rows)


def other_variables() -> str:
    lines = [
        "## Variables that are not flags",
        "",
        f"- `{PASSWORD_VAR}`: the password of `--etcd-user` (or `--etcd-password-file`). Never a flag",
        "  (a command line is visible to every user of the machine) and never a config key; the",
        "  agent removes it from the environment its workers inherit.",
        "- torchrun's and Kubeflow PyTorchJob's variables, read below the `ELASTIC_AGENT_*` ones:",
        "",
        "| variable | setting |",
        "|---|---|",
    ]
    lines += [f"| `{name}` | `{flag(field)}` |" for name, field in PET_VARS.items()]
    return "\n".join(lines)


def status_section() -> str:
    connection = ", ".join(f"`{flag(field)}`" for field in CONNECTION_FIELDS)
    return (
        "## `elastic-agent status`\n\n"
        "`elastic-agent status --etcd-endpoints HOST:PORT[,...] --job-id ID` shows the job as etcd sees it;\n"
        "`--json` prints one JSON object, `--timeout SECONDS` (default 3) bounds how long it tries an\n"
        f"unreachable etcd. It reaches a secured etcd with the same flags as `start`: {connection}\n"
        f"(and `{PASSWORD_VAR}`); these are flags only, not variables or a config file.\n"
    )


def render() -> str:
    example = "\n".join(["    # agent.toml", "    min-nodes = 2", "    max-nodes = 4",
                         '    etcd-endpoints = "etcd-0:2379,etcd-1:2379,etcd-2:2379"', '    job-id = "llama-ft"',
                         '    redirects = "0:0,1:3"', "    local-ranks-filter = [0]", "    prewarm = false"])
    parts = [HEADER, "## Settings of `elastic-agent start`\n", settings_table(), "",
             "A config file uses the same keys; lists may be TOML arrays:\n", example, "", OUTPUT,
             other_variables(), "", status_section()]
    return "\n".join(parts)


def main(argv: list[str]) -> int:
    text = render()
    if "--write" in argv:
        DOC.write_text(text)
    elif "--check" in argv:
        if not DOC.exists() or DOC.read_text() != text:
            print(f"{DOC} is out of date: run python -m agent.daemon.config.reference --write", file=sys.stderr)
            return 1
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
