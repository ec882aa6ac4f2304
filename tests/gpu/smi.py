"""What ``nvidia-smi`` says: the GPUs, and which processes hold memory on them.

The check never imports torch in its own process (a CUDA context there would hold memory
and hide a leak); it asks ``nvidia-smi``. The parsers are pure, for the unit tests.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass

SMI_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class Gpu:
    index: int
    uuid: str
    name: str
    used_mib: int
    total_mib: int


@dataclass(frozen=True)
class App:
    pid: int
    gpu_uuid: str
    used_mib: int


def _rows(text: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.split(",")] for line in text.splitlines() if line.strip()]


def _mib(cell: str) -> int:
    try:
        return int(float(cell))
    except ValueError:  # "[N/A]", "[Insufficient Permissions]"
        return -1


def parse_gpus(text: str) -> list[Gpu]:
    """``--query-gpu=index,uuid,name,memory.used,memory.total --format=csv,noheader,nounits``."""
    return [Gpu(int(r[0]), r[1], r[2], _mib(r[3]), _mib(r[4])) for r in _rows(text) if len(r) >= 5 and r[0].isdigit()]


def parse_apps(text: str) -> list[App]:
    """``--query-compute-apps=pid,gpu_uuid,used_memory --format=csv,noheader,nounits``."""
    return [App(int(r[0]), r[1], _mib(r[2])) for r in _rows(text) if len(r) >= 3 and r[0].isdigit()]


def normal_uuid(uuid: str | None) -> str | None:
    """``GPU-5b6b1e5c-7d...`` (nvidia-smi) and ``5b6b1e5c-7d...`` (torch) name the same GPU."""
    return None if not uuid else uuid.strip().lower().removeprefix("gpu-").replace("-", "")


class Smi:
    """``nvidia-smi`` on PATH, or nothing (``present`` False; every query answers empty)."""

    def __init__(self, binary: str | None = None, run=subprocess.run) -> None:
        self.binary = binary if binary is not None else shutil.which("nvidia-smi")
        self._run = run

    @property
    def present(self) -> bool:
        return self.binary is not None

    def _query(self, *args: str) -> tuple[int, str]:
        if self.binary is None:
            return 127, "nvidia-smi not on PATH"
        try:
            done = self._run([self.binary, *args], capture_output=True, text=True, timeout=SMI_TIMEOUT_S)
        except (OSError, subprocess.SubprocessError) as exc:
            return 126, f"{type(exc).__name__}: {exc}"
        return done.returncode, done.stdout if done.returncode == 0 else (done.stderr or done.stdout)

    def detect(self) -> tuple[list[Gpu], str]:
        """The GPUs, and how that was found out (for the no-GPU message)."""
        if self.binary is None:
            return [], "nvidia-smi not on PATH"
        code, text = self._query("--query-gpu=index,uuid,name,memory.used,memory.total",
                                 "--format=csv,noheader,nounits")
        if code != 0:
            first = text.strip().splitlines()[0] if text.strip() else ""
            return [], f"nvidia-smi exited with code {code}" + (f": {first}" if first else "")
        gpus = parse_gpus(text)
        return gpus, f"nvidia-smi lists {len(gpus)}"

    def gpus(self) -> list[Gpu]:
        return self.detect()[0]

    def apps(self) -> list[App]:
        code, text = self._query("--query-compute-apps=pid,gpu_uuid,used_memory", "--format=csv,noheader,nounits")
        return parse_apps(text) if code == 0 else []

    def driver(self) -> str:
        code, text = self._query("--query-gpu=driver_version", "--format=csv,noheader")
        return text.splitlines()[0].strip() if code == 0 and text.strip() else "?"
