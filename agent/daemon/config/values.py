"""Value parsers for settings: a raw value (text from argv or the environment, any TOML type
from a config file) in, a typed value out, or :class:`Invalid` with the expected form
(``must be a positive integer``). Pure; the option table in ``agent.daemon.config.options`` names
which parser each setting uses.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from rendezvous.net import Endpoint, parse_endpoints, uses_tls
from rendezvous.settings import ID_FORM, valid_id

_BOOL_WORDS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


class Invalid(Exception):
    """A parser's complaint: the expected form, e.g. ``must be a positive integer``."""


def _int(raw: object) -> int:
    if isinstance(raw, bool):
        raise Invalid("not a bool")
    if isinstance(raw, int):
        return raw
    if isinstance(raw, str):
        try:
            return int(raw.strip())
        except ValueError:
            pass
    raise Invalid("not an int")


def _float(raw: object) -> float:
    if isinstance(raw, bool):
        raise Invalid("not a bool")
    value: float | None = None
    if isinstance(raw, (int, float)):
        try:
            value = float(raw)
        except OverflowError:  # a TOML integer past a float's range
            value = None
    elif isinstance(raw, str):
        try:
            value = float(raw.strip())
        except ValueError:
            value = None
    if value is None or not math.isfinite(value):
        raise Invalid("not a number")
    return value


def number_above(low: float, form: str) -> Callable[[object], float]:
    def parse(raw: object) -> float:
        try:
            value = _float(raw)
        except Invalid:
            raise Invalid(form) from None
        if value <= low:
            raise Invalid(form)
        return value

    return parse


def int_at_least(low: int, form: str) -> Callable[[object], int]:
    def parse(raw: object) -> int:
        try:
            value = _int(raw)
        except Invalid:
            raise Invalid(form) from None
        if value < low:
            raise Invalid(form)
        return value

    return parse


def port(raw: object) -> int:
    form = "must be an integer in 0..65535 (0 = pick a free port)"
    try:
        value = _int(raw)
    except Invalid:
        raise Invalid(form) from None
    if not 0 <= value <= 65535:
        raise Invalid(form)
    return value


# A longer wait is surely a mistake, and past threading.TIMEOUT_MAX (~292 years) the agent's
# first wait on it would raise OverflowError: a traceback long after start accepted it.
MAX_SECONDS = 365 * 24 * 3600


def seconds(low: float, *, strict: bool) -> Callable[[object], float]:
    form = f"must be a number of seconds {'>' if strict else '>='} {low:g}"

    def parse(raw: object) -> float:
        try:
            value = _float(raw)
        except Invalid:
            raise Invalid(form) from None
        if value < low or (strict and value == low):
            raise Invalid(form)
        if value > MAX_SECONDS:
            raise Invalid(f"must be at most {MAX_SECONDS} seconds (a year)")
        return value

    return parse


def boolean(raw: object) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, (str, int)) and str(raw).strip().lower() in _BOOL_WORDS:
        return _BOOL_WORDS[str(raw).strip().lower()]
    raise Invalid("must be one of 1, 0, true, false, yes, no")


def choice(choices: tuple[str, ...]) -> Callable[[object], str]:
    def parse(raw: object) -> str:
        if isinstance(raw, str) and raw.strip().lower() in choices:
            return raw.strip().lower()
        raise Invalid(f"must be one of {'|'.join(choices)}")

    return parse


def identifier(raw: object) -> str:
    if isinstance(raw, str) and valid_id(raw):
        return raw
    raise Invalid(ID_FORM)


def word(form: str) -> Callable[[object], str]:
    """Non-empty text without spaces (a host name or address)."""

    def parse(raw: object) -> str:
        # No control characters either: a TOML string can hold a NUL, which no address may.
        if isinstance(raw, str) and raw.strip() and not any(c.isspace() or not c.isprintable() for c in raw.strip()):
            return raw.strip()
        raise Invalid(form)

    return parse


def path(raw: object) -> Path:
    if isinstance(raw, str) and raw.strip() and "\0" not in raw:  # a TOML string can hold a NUL
        return Path(raw.strip())
    raise Invalid("must be a non-empty path")


def nproc(raw: object) -> int | str:
    if isinstance(raw, str) and raw.strip().lower() == "gpu":
        return "gpu"
    try:
        value = _int(raw)
    except Invalid:
        value = 0
    if value < 1:
        raise Invalid("must be a positive integer or 'gpu'")
    return value


def node_range(raw: object) -> tuple[int, int]:
    """torchrun's ``--nnodes``: ``N`` or ``MIN:MAX``."""
    form = "must be N or MIN:MAX with 1 <= MIN <= MAX"
    text = str(raw).strip() if isinstance(raw, (str, int)) and not isinstance(raw, bool) else ""
    parts = text.split(":")
    try:
        low, high = (_int(parts[0]), _int(parts[-1])) if len(parts) in (1, 2) else (0, 0)
    except Invalid:
        raise Invalid(form) from None
    if not 1 <= low <= high:
        raise Invalid(form)
    return low, high


class TlsEndpoints(tuple):  # type: ignore[type-arg]
    """Endpoints given as ``https://``: the connection must use TLS. A tuple of Endpoint that
    compares equal to the plain tuple."""


def endpoints(raw: object) -> tuple[Endpoint, ...]:
    form = "must be host:port[,host:port...]"
    if not isinstance(raw, (str, list)) or (isinstance(raw, list) and not all(isinstance(i, str) for i in raw)):
        raise Invalid(form)
    try:
        tls = uses_tls(raw)  # type: ignore[arg-type]
    except ValueError:
        raise Invalid("must use one scheme for every member: all http:// or all https://") from None
    try:
        parsed = parse_endpoints(raw)  # type: ignore[arg-type]
    except ValueError:
        raise Invalid(form) from None
    return TlsEndpoints(parsed) if tls else parsed
