"""Fuzzed etcd values (DESIGN.md invariant 5, STYLE.md lesson 5): every record the agent and
the rendezvous read back from etcd, decoded from garbage, a wrong or missing version, out-of-
range fields, or a real record cut short or flipped, either becomes a record that is sound
(the fields the agent uses are in range) or raises :class:`CorruptStateError` naming the key,
on one line. Never another exception. Derandomized and bounded: a few seconds, every run alike.

The records: ``nodes/<id>`` (NodeRecord), ``rounds/<n>/joined/<id>`` (JoinRecord), ``round``
(RoundState), ``rounds/<n>/members`` (a closed round's assignment), ``status`` (JobStatus), ``restarts`` (RestartCount), ``goodput/<id>`` (NodeReport).
The agent loop's handling of the same garbage in a live store is in
tests/integration/test_fuzz_agent_store.py.
"""

from __future__ import annotations

import json
import math

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from agent.observe.goodput import NodeReport, Totals
from rendezvous.errors import CorruptStateError
from rendezvous.settings import Settings
from rendezvous.state import (
    Assignment,
    JobStatus,
    JoinRecord,
    Member,
    NodeRecord,
    Outcome,
    RestartCount,
    RoundPhase,
    RoundState,
)

FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])
S = Settings(job_id="fuzz", min_nodes=1, max_nodes=4)

ASSIGNED = RoundState(3, RoundPhase.CLOSED, "node_lost: c", ("a", "b", "c"),
                      Assignment(3, (Member("a", "10.0.0.1", 8), Member("b", "10.0.0.2", 8)), "10.0.0.1", 29500,
                                 ("d",)), stop_at=120, grow_request="d")


class Members:
    """``rounds/3/members``, read as every member of closed round 3 reads it."""

    @staticmethod
    def decode(key: str, raw: bytes) -> RoundState:
        return RoundState(3, RoundPhase.CLOSED).with_members(key, raw)


# One real record of each kind, as an agent writes it, under its key.
RECORDS = {
    "node": (S.node_key("a"), NodeRecord, NodeRecord("a", "10.0.0.1", 8, "host-a", "0.1.0").encode()),
    "join": (S.joined_key(3, "a"), JoinRecord, JoinRecord("a", "10.0.0.1", 8, 29500).encode()),
    "open round": (S.round_key, RoundState, RoundState(4, RoundPhase.OPEN, "scale_up", ("a", "b")).encode()),
    "closed round": (S.round_key, RoundState, ASSIGNED.encode()),
    "members": (S.members_key(3), Members, ASSIGNED.encode_members()),
    "status": (S.status_key, JobStatus, JobStatus(Outcome.FAILED, "budget spent").encode()),
    "restarts": (S.restarts_key, RestartCount, RestartCount(2, "worker_failure: a").encode()),
    "goodput": (f"{S.root}goodput/a", NodeReport,
                NodeReport("a", Totals(100.0, 80.0, {"restart": 5.0}, 1200), "running", 1200, 10.0, 1100, 9.0, 3,
                           12.5).encode()),
}
NAMES = sorted(RECORDS)

# JSON values on every field's edge: wrong types, out of range, huge, non-finite, deep.
JSON_EDGES = [None, True, False, 0, 1, -1, 2, 65535, 65536, 2**63, -(2**63), 10**30, 10**400, 1.0, 1.5, -0.5,
              float("nan"), float("inf"), "", " ", "x", "1", "a\x00b", "10.0.0.1 ", "\n", [], [1], ["a", 1],
              {}, {"node_id": "a"}, [[[[[]]]]]]
json_values = st.recursive(
    st.one_of(st.sampled_from(JSON_EDGES), st.integers(), st.floats(), st.text(max_size=6)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)),
    max_leaves=6)


def fields_of(raw: bytes) -> list[str]:
    """Every field name of a record, and of its first member when it has members."""
    data = json.loads(raw)
    names = list(data)
    if data.get("members"):  # [node_id, addr, nproc]
        names += [f"members.0.{n}" for n in range(len(data["members"][0]))]
    return names + ["extra"]


@st.composite
def garbled(draw) -> tuple[str, type, bytes]:
    """A record of some kind with one of: a field set to an edge value or removed (the version
    included), bytes cut short or flipped, random bytes, or JSON nested past any stack."""
    name = draw(st.sampled_from(NAMES))
    key, kind, raw = RECORDS[name]
    how = draw(st.sampled_from(["field", "field", "field", "drop", "truncate", "flip", "bytes", "deep", "version"]))
    if how in ("field", "drop", "version"):
        data = json.loads(raw)
        path = "v" if how == "version" else draw(st.sampled_from(fields_of(raw)))
        target, leaf = data, path
        if path.startswith("members.0."):
            target, leaf = data["members"][0], int(path.removeprefix("members.0."))
        if how == "drop":
            target.pop(leaf) if isinstance(target, list) else target.pop(leaf, None)
        else:
            target[leaf] = draw(json_values if how == "field" else st.sampled_from(
                [0, 2, -1, "1", True, 1.0, None, [1], {"v": 1}, 10**30]))
        return key, kind, json.dumps(data).encode()
    if how == "truncate":
        return key, kind, raw[: draw(st.integers(0, len(raw) - 1))]
    if how == "flip":
        at = draw(st.integers(0, len(raw) - 1))
        return key, kind, raw[:at] + bytes([raw[at] ^ (1 << draw(st.integers(0, 7)))]) + raw[at + 1:]
    if how == "deep":
        depth = draw(st.sampled_from([10, 5_000, 200_000]))
        opener = draw(st.sampled_from([b"[", b'{"v":']))
        return key, kind, opener * depth
    return key, kind, draw(st.binary(max_size=64))


def _is_int(value: object) -> bool:
    return type(value) is int


def _address(text: str) -> bool:
    return bool(text) and all(c.isprintable() and not c.isspace() for c in text)


def sound(record: object, raw: bytes) -> None:
    """What a decoded record must be for the code that uses it."""
    assert type(json.loads(raw)["v"]) is int, "a version that is not the integer 1 was accepted"
    if isinstance(record, (NodeRecord, JoinRecord)):
        assert record.node_id.strip() and _address(record.addr), record
        assert _is_int(record.nproc) and record.nproc >= 1
        assert isinstance(record.host, str) if isinstance(record, NodeRecord) else 1 <= record.master_port <= 65535
    elif isinstance(record, RoundState):
        assert _is_int(record.number) and record.number >= 1
        assert isinstance(record.reason, str) and isinstance(record.grow_request, str)
        assert all(isinstance(p, str) for p in record.previous)
        assert record.stop_at is None or (_is_int(record.stop_at) and record.stop_at >= 0)
        a = record.assignment
        assert a is None or not record.is_open  # the assignment is read from the members key
        if a is not None:
            assert a.round == record.number and a.members and len(set(a.node_ids)) == len(a.members)
            for m in a.members:
                assert isinstance(m.node_id, str) and m.node_id and _address(m.addr), m
                assert _is_int(m.nproc) and m.nproc >= 1, m
            # The address goes into every worker's MASTER_ADDR: no NUL, no space, no newline.
            assert _address(a.master_addr) and 1 <= a.master_port <= 65535, a
            assert all(isinstance(s, str) for s in a.standbys)
    elif isinstance(record, JobStatus):
        assert record.outcome in tuple(Outcome) and isinstance(record.reason, str)
    elif isinstance(record, RestartCount):
        assert _is_int(record.count) and record.count >= 0 and isinstance(record.last_reason, str)
    else:
        assert isinstance(record, NodeReport)
        t = record.totals
        assert isinstance(record.node_id, str) and _is_int(t.highest_step)
        # Goodput is a ratio of these: a NaN or an infinity would make every figure NaN.
        for value in (t.elapsed, t.productive, record.time, *t.badput.values()):
            assert math.isfinite(value) and value >= 0, record
        for value in (record.last_step_time, record.checkpoint_time):
            assert value is None or math.isfinite(value), record


def decode_or_named_error(key: str, kind: type, raw: bytes) -> None:
    try:
        record = kind.decode(key, raw)
    except CorruptStateError as exc:
        assert exc.key == key and repr(key) in str(exc), str(exc)
        assert "\n" not in str(exc), str(exc)
        return
    sound(record, raw)


def test_the_real_records_decode() -> None:
    for key, kind, raw in RECORDS.values():
        sound(kind.decode(key, raw), raw)


@FUZZ
@given(garbled())
@example((S.round_key, RoundState, b"[" * 200_000))
@example((S.node_key("a"), NodeRecord, b'{"v": true, "node_id": "a", "addr": "h", "nproc": 1}'))
@example((S.members_key(3), Members, ASSIGNED.encode_members().replace(b'"10.0.0.1",', b'"10.0.0.1\\u0000",', 1)))
@example((f"{S.root}goodput/a", NodeReport, RECORDS["goodput"][2].replace(b'"elapsed":100.0', b'"elapsed":NaN')))
@example((f"{S.root}goodput/a", NodeReport, RECORDS["goodput"][2].replace(b'"time":12.5', b'"time":1' + b"0" * 400)))
@example((f"{S.root}goodput/a", NodeReport, RECORDS["goodput"][2].replace(b'"v":1', b'"v":true')))
def test_every_record_decodes_soundly_or_names_its_key(case) -> None:
    decode_or_named_error(*case)


@FUZZ
@given(st.sampled_from(NAMES), st.binary(max_size=200))
def test_random_bytes_in_every_key_name_the_key(name, raw) -> None:
    key, kind, _ = RECORDS[name]
    decode_or_named_error(key, kind, raw)
