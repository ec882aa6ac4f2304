"""docs/configuration.md is what the option table renders: every flag, variable and config key,
with its default and help; a new or changed option without its reference entry fails here."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from agent.daemon.config import reference
from agent.daemon.config.layers import load_config
from agent.daemon.config.options import OPTIONS, PET_VARS, TOGGLE

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "configuration.md"
FIX = "run `python -m agent.daemon.config.reference --write` and commit docs/configuration.md"


def table_rows(text: str) -> dict[str, list[str]]:
    """The settings table: config key -> the row's cells."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) == 5 and cells[2].startswith("`") and cells[0].startswith("`--"):
            rows[cells[2].strip("`")] = cells
    return rows


def test_the_committed_reference_is_what_the_table_renders() -> None:
    assert DOC.read_text() == reference.render(), f"docs/configuration.md is out of date: {FIX}"


def test_every_option_has_its_flag_variable_key_default_and_help() -> None:
    rows = table_rows(reference.render())
    for option in OPTIONS:
        key = option.field.replace("_", "-")
        assert key in rows, f"{option.flag} is missing from the reference"
        flag_cell, var_cell, _, default_cell, meaning = rows[key]
        assert flag_cell.startswith(f"`{option.flag}")
        if option.kind == TOGGLE:
            assert f"--no-{option.flag[2:]}" in flag_cell
        assert var_cell == f"`{option.env_var}`"
        assert default_cell and meaning.replace("\\|", "|") == option.help
    assert len(rows) == len(OPTIONS)
    assert "| `--config PATH` | `ELASTIC_AGENT_CONFIG` |" in reference.render()


def test_every_fallback_variable_is_listed() -> None:
    text = reference.render()
    for name in PET_VARS:
        assert f"| `{name}` |" in text
    assert "ELASTIC_AGENT_ETCD_PASSWORD" in text


def test_the_config_file_example_in_the_reference_loads(tmp_path: Path) -> None:
    text = reference.render()
    example = text.split("    # agent.toml\n", 1)[1].split("\n\n", 1)[0]
    path = tmp_path / "agent.toml"
    path.write_text("\n".join(line.removeprefix("    ") for line in example.splitlines()) + "\n")
    config = load_config(["--config", str(path), "--", "python", "train.py"], {})
    assert (config.min_nodes, config.max_nodes, config.job_id, config.prewarm) == (2, 4, "llama-ft", False)
    assert config.local_ranks_filter == frozenset({0}) and str(config.redirects) == "0:0,1:3"


def test_a_default_without_words_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reference, "DERIVED", {})
    with pytest.raises(KeyError):
        reference.render()


def test_check_exits_1_on_a_stale_file_and_write_fixes_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stale = tmp_path / "configuration.md"
    stale.write_text(DOC.read_text().replace("fewest nodes", "least nodes"))
    monkeypatch.setattr(reference, "DOC", stale)
    assert reference.main(["--check"]) == 1
    assert reference.main(["--write"]) == 0
    assert reference.main(["--check"]) == 0 and stale.read_text() == reference.render()


def test_the_module_prints_the_reference() -> None:
    proc = subprocess.run([sys.executable, "-m", "agent.daemon.config.reference"], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == reference.render()
