"""The option table is the one source of the flags: --help, the parser and the README agree."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from agent.daemon.config.options import OPTIONS, flags, start_parser

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_flags() -> set[str]:
    """Every flag named in the first column of the README's flag table."""
    found: set[str] = set()
    for line in README.read_text().splitlines():
        if line.startswith("| `--"):
            found |= set(re.findall(r"--[a-z][a-z-]*", line.split("|")[1]))
    return found


def test_every_option_has_a_one_line_help() -> None:
    for option in OPTIONS:
        assert option.help.strip() and "\n" not in option.help, option.field


def test_the_readme_table_and_the_parser_name_the_same_flags() -> None:
    documented = readme_flags()
    assert documented, "no flag table found in README.md"
    assert documented - flags() == set(), "README names flags the parser does not know"
    assert flags() - documented == set(), "flags missing from the README table"


def test_help_describes_every_flag() -> None:
    text = start_parser().format_help()
    for option in OPTIONS:
        entry = re.search(rf"^\s+{re.escape(option.flag)}\b.*?(?=^\s+--|\Z)", text, re.M | re.S)
        assert entry, option.flag
        described = " ".join(entry.group(0).split()[1:])
        assert option.help.split()[0] in described, (option.flag, described)


def test_the_command_prints_the_help_and_exits_0() -> None:
    proc = subprocess.run([sys.executable, "-m", "agent", "start", "--help"], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "--min-nodes N" in proc.stdout and "fewest nodes the job trains with" in proc.stdout
    assert "--config PATH" in proc.stdout
