"""rendezvous.state: wire records round-trip, and bad bytes give a one-line typed error."""

from __future__ import annotations

import json

import pytest

from rendezvous.errors import CorruptStateError, JobFinishedError, RendezvousError
from rendezvous.state import (
    Assignment,
    JobStatus,
    JoinRecord,
    Member,
    NodeRecord,
    RestartCount,
    RoundPhase,
    RoundState,
)

KEY = "/elastic-agent/j/round"


class Members:
    """The members record of closed round 2 (``rounds/2/members``), decoded as a node does."""

    @staticmethod
    def decode(key: str, raw: bytes) -> RoundState:
        return RoundState(2, RoundPhase.CLOSED).with_members(key, raw)


def test_records_round_trip() -> None:
    a = Assignment(3, (Member("a", "10.0.0.1", 8), Member("b", "10.0.0.2", 4)), "10.0.0.1", 29500, ("c",))
    closed = RoundState(3, RoundPhase.CLOSED, "node_lost: x", (), a, stop_at=7, grow_request="c", stop_asked=True)
    assert RoundState.decode(KEY, closed.encode()).with_members(KEY, closed.encode_members()) == closed
    opened = RoundState(4, RoundPhase.OPEN, "start")
    assert RoundState.decode(KEY, opened.encode()) == opened


def test_a_change_to_the_round_rewrites_o1_bytes_whatever_the_size() -> None:
    """Every node watches ``round``: its record must not grow with the job (issue 25)."""
    def closed(n: int) -> RoundState:
        members = tuple(Member(f"node-{i:05d}", f"10.0.{i // 256}.{i % 256}", 8) for i in range(n))
        return RoundState(2, RoundPhase.CLOSED, "node_lost: node-00007 went silent",
                          tuple(m.node_id for m in members), Assignment(2, members, "10.0.0.0", 29500), stop_at=12345)
    assert len(closed(4096).encode()) == len(closed(3).encode()) < 200
    assert len(closed(4096).encode_members()) > 100_000  # read once per round, not on every change
    for rec, cls in ((NodeRecord("a", "h:1", 8, "host", "0.1"), NodeRecord), (JoinRecord("a", "h", 2, 29501), JoinRecord),
                     (JobStatus("failed", "budget"), JobStatus), (RestartCount(2, "worker_failure: x"), RestartCount)):
        assert cls.decode(KEY, rec.encode()) == rec  # type: ignore[attr-defined]


def test_every_record_is_versioned() -> None:
    for rec in (RoundState(1, RoundPhase.OPEN), JoinRecord("a", "h", 1, 1), JobStatus("succeeded", "ok"), RestartCount(0),
                NodeRecord("a", "h", 1)):
        assert json.loads(rec.encode())["v"] == 1


def closed_json(**over: object) -> bytes:
    d: dict[str, object] = {"v": 1, "round": 2, "members": [["a", "h", 1]],
                            "master_addr": "h", "master_port": 1, "standbys": []}
    d.update(over)
    return json.dumps({k: v for k, v in d.items() if v is not ...}).encode()


# (decoder, raw bytes, fragments the message must contain)
CORRUPT = [
    (RoundState, b"{not json", ["expected a JSON round record", "found '{not json'"]),
    (RoundState, b"\xff\xfe", ["expected a JSON round record"]),
    (RoundState, b"", ["expected a JSON round record", "found ''"]),
    (RoundState, b"[1, 2]", ["expected a JSON object (round record)"]),
    (RoundState, b"null", ["expected a JSON object (round record)"]),
    (RoundState, b'{"number": 1, "state": "open"}', ['expected "v": 1 (round record)', 'found "v": None']),
    (RoundState, b'{"v": 2, "number": 1, "state": "open"}', ['expected "v": 1 (round record)', 'found "v": 2']),
    (RoundState, b'{"v": "1", "number": 1, "state": "open"}', ["found \"v\": '1'"]),
    (RoundState, b'{"v": 1, "number": "1", "state": "open"}', ["field 'number' of type int", "found '1'"]),
    (RoundState, b'{"v": 1, "number": true, "state": "open"}', ["field 'number' of type int", "found True"]),
    (RoundState, b'{"v": 1, "number": 1, "state": "ajar"}', ["'open' or 'closed'", "found 'ajar'"]),
    (Members, b"{", ["expected a JSON members record"]),
    (Members, closed_json(round=3), ["expected the members of round 2", "found 3"]),
    (Members, closed_json(members=...), ["field 'members' of type list", "found None"]),
    (Members, closed_json(members=["a"]), ["members as [node_id, addr, nproc]", "found 'a'"]),
    (Members, closed_json(members=[["a", "h"]]), ["members as [node_id, addr, nproc]"]),
    (Members, closed_json(members=[["a", "h", "8"]]), ["members as [node_id, addr, nproc]"]),
    (Members, closed_json(master_port="29500"), ["field 'master_port' of type int"]),
    (Members, closed_json(standbys=[1]), ["'standbys' as a list of strings"]),
    (JoinRecord, b"{", ["expected a JSON join record"]),
    (JoinRecord, b'{"v": 7, "node_id": "a"}', ['expected "v": 1 (join record)', 'found "v": 7']),
    (JoinRecord, b'{"v": 1, "node_id": "a", "addr": "h", "nproc": 1}', ["field 'master_port' of type int"]),
    (JobStatus, b"succeeded", ["expected a JSON status record", "found 'succeeded'"]),
    (JobStatus, b'{"v": 1, "outcome": "meh", "reason": ""}', ["'succeeded' or 'failed'", "found 'meh'"]),
    (JobStatus, b'{"v": 1, "outcome": "failed"}', ["field 'reason' of type str"]),
    (RestartCount, b'{"v": 1, "count": 1.5}', ["field 'count' of type int", "found 1.5"]),
    (NodeRecord, b'{"v": 0}', ['expected "v": 1 (node record)']),
]


@pytest.mark.parametrize("cls,raw,fragments", CORRUPT)
def test_corrupt_records_name_the_key_and_what_was_expected(cls: type, raw: bytes, fragments: list[str]) -> None:
    with pytest.raises(CorruptStateError) as info:
        cls.decode(KEY, raw)  # type: ignore[attr-defined]
    message = str(info.value)
    assert message.startswith(f"etcd key {KEY!r}: expected ")
    for fragment in fragments:
        assert fragment in message
    assert "\n" not in message
    assert info.value.key == KEY
    assert info.value.__cause__ is None  # no chained traceback from the JSON parser


def test_long_garbage_is_previewed_not_dumped() -> None:
    with pytest.raises(CorruptStateError) as info:
        RoundState.decode(KEY, b"x" * 5000)
    assert len(str(info.value)) < 200
    assert str(info.value).endswith("...")


def test_error_hierarchy() -> None:
    assert issubclass(CorruptStateError, RendezvousError)
    err = JobFinishedError("failed", "budget spent")
    assert isinstance(err, RendezvousError)
    assert (err.outcome, err.reason, str(err)) == ("failed", "budget spent", "job already failed: budget spent")


def test_assignment_helpers() -> None:
    a = Assignment(1, (Member("a", "h", 2), Member("b", "h", 3)), "h", 1)
    assert a.node_ids == ("a", "b")
    assert a.world_size == 5
    assert (a.rank_offset("a"), a.rank_offset("b")) == (0, 2)
    with pytest.raises(KeyError):
        a.rank_offset("z")


def _round(**over: object) -> bytes:
    record = {"v": 1, "round": 2, "members": [["a", "10.0.0.1", 8]], "master_addr": "10.0.0.1",
              "master_port": 29500, "standbys": []}
    record.update(over)
    return json.dumps(record).encode()


@pytest.mark.parametrize("cls, raw, fragment", [
    (NodeRecord, b'{"v":1,"node_id":"a","addr":"h","nproc":0}', "field 'nproc' in >= 1"),
    (NodeRecord, b'{"v":1,"node_id":"","addr":"h","nproc":1}', "field 'node_id' non-empty"),
    (JoinRecord, b'{"v":1,"node_id":"a","addr":"h","nproc":1,"master_port":70000}', "field 'master_port' in 1..65535"),
    (JoinRecord, b'{"v":1,"node_id":"a","addr":"h","nproc":-2,"master_port":1}', "field 'nproc' in >= 1"),
    (RoundState, b'{"v":1,"number":0,"state":"open"}', "field 'number' in >= 1"),
    (Members, _round(round=0), "field 'round' in >= 1"),
    (Members, _round(master_port=0), "field 'master_port' in 1..65535"),
    (Members, _round(master_addr=" "), "field 'master_addr' non-empty"),
    (Members, _round(members=[["a", "h", 0]]), "nproc >= 1"),
    (Members, _round(members=[]), "a closed round with members"),
    (Members, _round(members=[["a", "h", 1]] * 2), "each node once"),
    (RestartCount, b'{"v":1,"count":-1}', "field 'count' in >= 0"),
])
def test_values_out_of_range_are_typed_errors_naming_the_key(cls: type, raw: bytes, fragment: str) -> None:
    with pytest.raises(CorruptStateError) as info:
        cls.decode("/elastic-agent/j/some-key", raw)
    assert "'/elastic-agent/j/some-key'" in str(info.value) and fragment in str(info.value)


def test_a_node_record_carries_its_probe_port_and_a_bad_one_is_refused():
    from rendezvous.state import NodeRecord  # noqa: PLC0415

    rec = NodeRecord("n1", "10.0.0.1", 2, probe_port=40000)
    assert NodeRecord.decode("nodes/n1", rec.encode()).probe_port == 40000
    assert b"probe_port" not in NodeRecord("n1", "10.0.0.1", 2).encode()  # as an older agent wrote it
    assert NodeRecord.decode("nodes/n1", NodeRecord("n1", "10.0.0.1", 2).encode()).probe_port == 0
    with pytest.raises(CorruptStateError, match="probe_port"):
        NodeRecord.decode("nodes/n1", rec.encode().replace(b"40000", b"70000"))
