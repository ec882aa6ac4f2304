"""The layout's promises: rooms by concern (small folders, dependencies pointing down), small
modules, classes split where the design divides, and torch only in the worker helper."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted(p for pkg in ("agent", "rendezvous") for p in (ROOT / pkg).rglob("*.py"))
MAX_FILE_LINES = 400
MAX_CLASS_LINES = 200
MAX_FOLDER_MODULES = 15
# A class this close to the cap was trimmed to fit unless its docstring says why it is one piece.
NEAR_CAP = MAX_CLASS_LINES - 10
ONE_PIECE = "One piece:"


def _module(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def _imported(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_and_classes_stay_small(path: Path) -> None:
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_FILE_LINES
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ClassDef):
            assert node.end_lineno - node.lineno + 1 <= MAX_CLASS_LINES, node.name


def test_the_daemon_and_observability_never_import_torch() -> None:
    modules = sorted(
        ".".join(p.relative_to(ROOT).with_suffix("").parts)
        for p in SOURCES if p.parts[-2] != "worker" or p.name in ("checkpoint.py", "protocol.py", "__init__.py")
    )
    modules = [m.removesuffix(".__init__") for m in modules if not m.endswith("__main__")]
    code = f"import sys\nfor m in {modules!r}: __import__(m)\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_training_scripts_import_stays_short() -> None:
    code = "from agent.worker import Elastic, DRAINED_EXIT_CODE; print(Elastic.__module__, DRAINED_EXIT_CODE)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.stdout.split() == ["agent.worker.helper", "75"], out.stderr


def test_no_folder_holds_more_than_about_15_modules() -> None:
    folders: dict[Path, list[str]] = {}
    for path in SOURCES:
        if path.name != "__init__.py":
            folders.setdefault(path.parent, []).append(path.name)
    crowded = {str(d.relative_to(ROOT)): len(names) for d, names in folders.items() if len(names) > MAX_FOLDER_MODULES}
    assert not crowded, f"split these folders by concern: {crowded}"


@pytest.mark.parametrize("room,below", [
    ("agent/observe", ("agent.daemon",)),  # observability never depends on the daemon it observes
    ("agent/common", ("agent.daemon", "agent.observe")),  # the shared vocabulary is below both
])
def test_dependencies_point_down(room: str, below: tuple[str, ...]) -> None:
    upward = {
        _module(path): sorted(name for name in _imported(path) if name.startswith(below))
        for path in SOURCES if path.is_relative_to(ROOT / room)
    }
    assert not {m: names for m, names in upward.items() if names}


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_class_sits_just_under_the_cap_without_saying_why(path: Path) -> None:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > NEAR_CAP:
            assert ONE_PIECE in (ast.get_docstring(node) or ""), (
                f"{node.name} is {node.end_lineno - node.lineno + 1} lines: split it where the design divides, "
                f"or say in its docstring why it is one piece ({ONE_PIECE!r})")


def test_the_torchrun_entry_point_of_older_installs_still_loads() -> None:
    """Installs made before the plug-in moved (issue 27) name rendezvous.torchrun_plugin."""
    code = ("import warnings; warnings.simplefilter('error', DeprecationWarning)\n"
            "try:\n    import rendezvous.torchrun_plugin\nexcept DeprecationWarning as w: print(w)\n"
            "warnings.simplefilter('ignore')\nimport importlib, rendezvous.torchrun.plugin as new\n"
            "old = importlib.import_module('rendezvous.torchrun_plugin')\n"
            "print(old.create_handler is new.create_handler)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.stdout.splitlines() == [
        "rendezvous.torchrun_plugin is deprecated: import rendezvous.torchrun.plugin", "True"], out.stderr
