"""What of a worker's output reaches the agent's console, with torchrun's meaning.

The agent always writes every worker's stdout and stderr to its log files
(``<attempt>/<local rank>/{stdout,stderr}.log``). The console gets a copy of each line unless:

- ``--redirects`` names the stream for that local rank (torchrun's ``--redirects``: 0 none,
  1 stdout, 2 stderr, 3 both, or per local rank ``0:1,1:2``; a rank a map leaves out is 0),
  and ``--tee`` does not name it too (torchrun tees a redirected stream back to the console);
- ``--local-ranks-filter`` is given and does not list that local rank.

Each console line starts with ``--log-line-prefix-template`` (torchrun's
``TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE``: the whole header, the line follows it directly),
with ``${node_id}``, ``${rank}`` (global), ``${local_rank}`` and ``${role_name}``; an empty
template or ``--no-log-line-prefix`` writes lines as the worker wrote them.

Pure: value parsers (in ``agent.daemon.config.values``'s style, raising :class:`Invalid` with the
expected form) and the per-worker :class:`Route`. Streams on the console are written by
``agent.daemon.workers.output.Sink``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import IntFlag
from string import Template
from typing import Any

from agent.daemon.config.values import Invalid

DEFAULT_TEMPLATE = "[${node_id}/${rank}] "  # today's "[node-id/global-rank] line"
PLACEHOLDERS = ("node_id", "rank", "local_rank", "role_name")
STREAMS_FORM = ("must be 0 (none), 1 (stdout), 2 (stderr) or 3 (both), or per local rank "
                "LOCAL_RANK:N[,LOCAL_RANK:N...] (e.g. 0:1,1:2)")
RANKS_FORM = "must be local ranks (integers >= 0) separated by commas, e.g. 0 or 0,1"
TEMPLATE_FORM = ("must be text whose only placeholders are " + ", ".join("${%s}" % p for p in PLACEHOLDERS)
                 + " (write $$ for a literal $)")
_MAP_ITEM = re.compile(r"^(\d+):([0-3])$")


class Streams(IntFlag):
    """torchrun's ``Std``: which of a worker's streams a setting names."""

    NONE = 0
    OUT = 1
    ERR = 2
    BOTH = 3


@dataclass(frozen=True)
class PerRank:
    """A ``--redirects`` / ``--tee`` value: one :class:`Streams` for every local rank
    (``3``), or a map of local rank to streams (``0:1,1:2``; ranks it leaves out: none)."""

    every: Streams = Streams.NONE
    ranks: tuple[tuple[int, Streams], ...] = ()

    def of(self, local_rank: int) -> Streams:
        return dict(self.ranks).get(local_rank, self.every)

    def __str__(self) -> str:
        if not self.ranks:
            return str(int(self.every))
        return ",".join(f"{rank}:{int(streams)}" for rank, streams in self.ranks)


def per_rank_streams(raw: object) -> PerRank:
    """``3``, ``"3"`` or ``"0:1,1:2"`` (torchrun's ``Std.from_str``; any number of digits
    for a local rank, spaces around commas allowed). A rank given twice keeps the last."""
    if isinstance(raw, int) and not isinstance(raw, bool):
        raw = str(raw)
    if not isinstance(raw, str) or not raw.strip():
        raise Invalid(STREAMS_FORM)
    text = raw.strip()
    if text in ("0", "1", "2", "3"):
        return PerRank(Streams(int(text)))
    mapping: dict[int, Streams] = {}
    for item in text.split(","):
        match = _MAP_ITEM.match(item.strip())
        if match is None:
            raise Invalid(STREAMS_FORM)
        mapping[int(match.group(1))] = Streams(int(match.group(2)))
    return PerRank(Streams.NONE, tuple(sorted(mapping.items())))


def local_ranks(raw: object) -> frozenset[int]:
    """``"0,1"``, ``0`` or (config file) ``[0, 1]``: a non-empty set of local ranks."""
    if isinstance(raw, int) and not isinstance(raw, bool):
        items: list[object] = [raw]
    elif isinstance(raw, str):
        items = [part.strip() for part in raw.split(",")]
    elif isinstance(raw, list):
        items = list(raw)
    else:
        raise Invalid(RANKS_FORM)
    ranks = set()
    for item in items:
        if isinstance(item, bool):
            raise Invalid(RANKS_FORM)
        if isinstance(item, str) and item.isascii() and item.isdigit():  # "²" is a digit int() refuses
            item = int(item)
        if not isinstance(item, int) or item < 0:
            raise Invalid(RANKS_FORM)
        ranks.add(item)
    if not ranks:
        raise Invalid(RANKS_FORM)
    return frozenset(ranks)


def prefix_template(raw: object) -> str:
    """A :class:`string.Template` naming only :data:`PLACEHOLDERS`; empty is allowed (no prefix)."""
    if not isinstance(raw, str):
        raise Invalid(TEMPLATE_FORM)
    template = Template(raw)
    if not template.is_valid() or not set(template.get_identifiers()) <= set(PLACEHOLDERS):
        raise Invalid(TEMPLATE_FORM)
    return raw


@dataclass(frozen=True)
class Route:
    """Where one worker's lines go besides its log files: ``prefix`` starts each console
    line; ``stdout`` / ``stderr`` say whether that stream reaches the console at all."""

    prefix: str = ""
    stdout: bool = True
    stderr: bool = True

    @classmethod
    def labelled(cls, label: str) -> Route:
        """Every line on the console as ``[label] line`` (the default look)."""
        return cls(f"[{label}] ")


@dataclass(frozen=True)
class ConsoleSettings:
    """The console part of the ``start`` settings (see the module docstring)."""

    redirects: PerRank = field(default_factory=PerRank)
    tee: PerRank = field(default_factory=PerRank)
    local_ranks_filter: frozenset[int] | None = None  # None: every local rank
    template: str = DEFAULT_TEMPLATE  # "" : no prefix

    @classmethod
    def of(cls, config: Any) -> ConsoleSettings:
        """From an ``AgentConfig`` (duck-typed: this module must not import the config)."""
        return cls(config.redirects, config.tee, config.local_ranks_filter,
                   config.log_line_prefix_template if config.log_line_prefix else "")

    def shown(self, local_rank: int) -> Streams:
        """The streams of ``local_rank`` that reach the console."""
        if self.local_ranks_filter is not None and local_rank not in self.local_ranks_filter:
            return Streams.NONE
        return (Streams.BOTH & ~self.redirects.of(local_rank)) | self.tee.of(local_rank)

    def route(self, *, local_rank: int, rank: int, node_id: str, role_name: str = "default") -> Route:
        prefix = Template(self.template).substitute(
            node_id=node_id, rank=rank, local_rank=local_rank, role_name=role_name)
        shown = self.shown(local_rank)
        return Route(prefix, bool(shown & Streams.OUT), bool(shown & Streams.ERR))
