"""docs/migrating.md runs as written: every block after a `<!-- migrating-path: NAME ROLE -->`
comment is taken from the doc's text, not from a copy in the tests, so a doc edit that breaks a
path fails here. Roles: `writes FILE` (the block is FILE's text, blocks of one file joined in
order), `runs [FILE=examples/X.py ...]` (its commands are run in a fresh directory holding the
files; `before` commands are skipped), `is-in examples/X.py` (a fragment that file must hold
verbatim). Only what differs on a test host changes, as the doc's intro says: the etcd
endpoints, --nproc-per-node capped at 2, and each agent's --node-id/--node-addr/--metrics-port."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from rendezvous.net import free_port
from tests.e2e.harness import ELASTIC_AGENT, PYTHON, REPO, AgentProc, Cluster

DOC = REPO / "docs" / "migrating.md"
MARK = re.compile(r"^<!-- migrating-path: (\S+) (writes|runs|is-in)\s*(.*?)\s*-->$")
NPROC_CAP = 2  # a CPU host stands in for a GPU node

pytestmark = pytest.mark.e2e


@dataclass
class DocPath:
    files: dict[str, str] = field(default_factory=dict)  # name in the run directory -> text
    copies: dict[str, str] = field(default_factory=dict)  # name in the run directory -> docs/ path
    commands: list[str] = field(default_factory=list)
    fragments: list[tuple[str, str]] = field(default_factory=list)  # (docs/ path, text)


def code_block(lines: list[str], start: int) -> str:
    """The indented code block that begins at or after ``start`` (blank lines skipped), dedented."""
    i = start
    while i < len(lines) and not lines[i].strip():
        i += 1
    assert i < len(lines) and lines[i].startswith("    "), f"docs/migrating.md:{i + 1}: a code block expected"
    block = []
    while i < len(lines) and (lines[i].startswith("    ") or not lines[i].strip()):
        block.append(lines[i])
        i += 1
    return textwrap.dedent("\n".join(block).rstrip("\n")) + "\n"


def doc_paths(text: str) -> dict[str, DocPath]:
    lines = text.splitlines()
    paths: dict[str, DocPath] = {}
    for n, line in enumerate(lines):
        m = MARK.match(line.strip())
        if not m:
            continue
        name, role, rest = m.groups()
        path, block = paths.setdefault(name, DocPath()), code_block(lines, n + 1)
        if role == "writes":
            path.files[rest] = path.files.get(rest, "") + block
        elif role == "is-in":
            path.fragments.append((rest, block))
        else:
            path.copies.update(item.split("=", 1) for item in rest.split())
            path.commands += commands(block)
    return paths


def commands(block: str) -> list[str]:
    """The logical command lines of a shell block, skipping those under a `# before` comment."""
    out, skipping = [], False
    for line in block.replace("\\\n", " ").splitlines():
        if line.strip().startswith("#"):
            skipping = line.strip().lstrip("# ").startswith("before")
        elif line.strip() and not skipping:
            out.append(line.strip())
    return out


PATHS = doc_paths(DOC.read_text())


def test_every_section_of_the_guide_has_a_path_that_runs() -> None:
    """A new `## From ...` section without a tested path fails here, not in a user's hands."""
    parts = re.split(r"^## (From .*)$", DOC.read_text(), flags=re.M)[1:]
    for title, text in zip(parts[::2], parts[1::2]):
        assert re.search(r"<!-- migrating-path: \S+ runs", text), \
            f"docs/migrating.md section {title!r} has no `<!-- migrating-path: NAME runs -->` block"


@pytest.mark.parametrize("name", [n for n, p in PATHS.items() if p.fragments])
def test_the_guides_fragment_is_in_its_example(name: str) -> None:
    for source, fragment in PATHS[name].fragments:
        # Line by line without the indent: the example holds it inside a function.
        lines = "\n".join(line.strip() for line in (DOC.parent / source).read_text().splitlines())
        if "\n".join(line.strip() for line in fragment.strip().splitlines()) not in lines:
            pytest.fail(f"docs/migrating.md's {name} block is not in docs/{source} as written:\n{fragment}")


def prepare(path: DocPath, where: Path) -> None:
    for name, text in path.files.items():
        (where / name).write_text(text)
    for name, source in path.copies.items():
        shutil.copy(DOC.parent / source, where / name)
    if path.copies:
        shutil.copy(DOC.parent / "examples" / "_toy.py", where / "_toy.py")  # what the examples share


def agent_argv(words: list[str], endpoints: str, node: int) -> tuple[list[str], int]:
    """The doc's `elastic-agent start` with the test host's differences; and how many agents it takes."""
    cut = words.index("--")
    flags, command = words[2:cut], words[cut:]
    for i, flag in enumerate(flags[:-1]):
        if flag == "--etcd-endpoints":
            flags[i + 1] = endpoints
        elif flag == "--nproc-per-node" and flags[i + 1].isdigit():
            flags[i + 1] = str(min(int(flags[i + 1]), NPROC_CAP))
    nnodes = flags[flags.index("--nnodes") + 1] if "--nnodes" in flags else "1"
    host = ["--node-id", f"node-{node}", "--node-addr", "127.0.0.1", "--metrics-port", str(free_port())]
    return [*ELASTIC_AGENT, "start", *flags, *host, *command], int(nnodes.split(":")[0])


# A process torch starts itself (mp.spawn's, no launcher) may abort in gloo's teardown after
# its work is done: std::terminate on a gloo thread still joinable as the group dies, the race
# docs/migrating.md describes ("A worker that trained but never exits"; the agent's workers are
# guarded, these are not). Seen once in 7 CI runs, 0 in 30 runs here under load.
TORCH_EXIT_ABORT = "terminate called without an active exception"


def run_command(line: str, where: Path, cluster: Cluster, *, again: bool = True) -> str:
    """Runs one command line of the doc as a shell would (VAR=value prefixes, quoting, `python`
    from PATH); returns what it printed. Every process must exit 0. A command without the
    agent that did its work and then hit torch's exit abort (``TORCH_EXIT_ABORT``) runs once more."""
    words = shlex.split(line)
    env = {key: value for key, value in os.environ.items()  # a user's shell: no launcher's variables
           if not key.startswith(("TORCHELASTIC_", "ELASTIC_AGENT_", "PET_"))}
    env.update(PATH=f"{Path(PYTHON).parent}{os.pathsep}{os.environ['PATH']}", PYTHONUNBUFFERED="1")
    while "=" in words[0] and not words[0].startswith("-"):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    if words[:2] == ["elastic-agent", "start"]:
        first, count = agent_argv(words, cluster.endpoints, 0)  # as many agents as --nnodes' minimum
        argvs = [first, *(agent_argv(words, cluster.endpoints, node)[0] for node in range(1, count))]
    else:
        env["MASTER_PORT"] = str(free_port())  # the user's environment: another run may hold 29500
        argvs = [words]
    procs = []
    for n, argv in enumerate(argvs):
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                cwd=where, start_new_session=True)
        agent = AgentProc(f"node-{n}", proc, 0, where)
        agent.start_reader()
        cluster.agents[f"{line[:20]}-{n}"] = agent  # the cluster stops it by pid if the test fails
        procs.append(agent)
    codes = [agent.wait(timeout=120) for agent in procs]
    text = "\n".join(agent.text() for agent in procs)
    if again and words[0] != "elastic-agent" and codes != [0] and TORCH_EXIT_ABORT in text and "saved" in text:
        print(f"`{line}`: torch's gloo exit abort after the work was done; once more:\n{text[-2000:]}")
        return run_command(line, where, cluster, again=False)
    assert codes == [0] * len(procs), f"`{line}` exited {codes}:\n{text[-4000:]}"
    assert "Traceback" not in text, text[-4000:]
    return text


def world_size(line: str) -> int:
    words = shlex.split(line)
    if "elastic-agent" not in words:
        return 2  # the mp.spawn path alone on a machine without GPUs
    flags = words[:words.index("--")]
    nnodes = int(flags[flags.index("--nnodes") + 1].split(":")[0]) if "--nnodes" in flags else 1
    return nnodes * min(int(flags[flags.index("--nproc-per-node") + 1]), NPROC_CAP)


@pytest.mark.parametrize("name", [n for n, p in PATHS.items() if p.commands])
def test_the_path_runs_as_written(name: str, tmp_path: Path) -> None:
    """Each command exits 0 everywhere and does what the doc says: the job trains over the
    whole world (an example's global rank 0 says so), and the mp.spawn script's checkpoint is
    written by one process of the job, not one per node."""
    path = PATHS[name]
    rundir = tmp_path
    prepare(path, rundir)
    with Cluster(job_id=name, workdir=str(rundir)) as cluster:  # its etcd; the agents run in rundir
        for line in path.commands:
            (rundir / "checkpoint.pt").unlink(missing_ok=True)
            text = run_command(line, rundir, cluster)
            size = world_size(line)
            if path.files:  # the doc's own script
                saves = re.findall(r"rank (\d+) of (\d+) saved checkpoint.pt", text)
                assert saves == [("0", str(size))], \
                    f"`{line}`: one save by rank 0 expected, got {saves}:\n{text[-4000:]}"
                assert set(torch.load(rundir / "checkpoint.pt")) == {"weight", "bias"}
            else:
                assert re.search(rf"\btrained \d+ steps, world size {size}, loss ", text), text[-4000:]
            words = shlex.split(line)
            if "--checkpoint-dir" in words:  # the helper saved through DCP: every rank's part and .metadata
                where = rundir / words[words.index("--checkpoint-dir") + 1]
                assert list(where.rglob(".metadata")), f"`{line}` left no DCP checkpoint in {where}:\n{text[-4000:]}"
