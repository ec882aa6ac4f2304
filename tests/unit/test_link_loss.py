"""A lossy link is noticed (issue 24): a link that loses 30 % of its frames never gives the
probe verdict's 8 misses in a row, yet slows every collective with that node many times. The
agent measures each ring neighbour's share of unanswered probes over a window, shows the worst
as a gauge and names a lossy peer in a warning."""

from __future__ import annotations

import logging

import pytest

from agent.daemon.connection.reach_watch import LOSS_WINDOW, LinkLoss


class _Gauge:
    value = -1.0

    def set(self, value: float) -> None:
        self.value = value


def test_a_link_losing_30_percent_is_named_and_shown_and_a_healthy_one_is_not(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    totals = {"n1": (0, 0), "n2": (0, 0)}
    gauge = _Gauge()
    loss = LinkLoss(lambda: dict(totals), gauge, lambda: now[0])
    totals.update(n1=(100, 70), n2=(100, 99))  # 10 s of probes: n1 answered 70 %, n2 99 %
    now[0] += LOSS_WINDOW / 2
    loss.tick()
    assert gauge.value == -1.0  # not a whole window yet
    now[0] += LOSS_WINDOW / 2
    with caplog.at_level(logging.WARNING, logger="elastic_agent"):
        loss.tick()
    assert gauge.value == pytest.approx(0.3)
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "the link to n1 is lossy" in warned[0] and "30 %" in warned[0]

    caplog.clear()
    totals.update(n1=(200, 169), n2=(200, 198))  # the next window: n1 mended (99 %)
    now[0] += LOSS_WINDOW
    with caplog.at_level(logging.WARNING, logger="elastic_agent"):
        loss.tick()
    assert gauge.value == pytest.approx(0.01) and not caplog.records


def test_too_few_probes_say_nothing(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    totals = {"n1": (0, 0)}
    gauge = _Gauge()
    loss = LinkLoss(lambda: dict(totals), gauge, lambda: now[0])
    totals["n1"] = (10, 0)  # a peer probed for one second only (it just joined the ring)
    now[0] += LOSS_WINDOW
    with caplog.at_level(logging.WARNING, logger="elastic_agent"):
        loss.tick()
    assert gauge.value == 0.0 and not caplog.records


def test_a_node_whose_link_was_lossy_is_marked_until_a_clean_window() -> None:
    """The mark ``admit`` reads: a node removed over a lossy link rejoins only over a steady one."""
    now = [0.0]
    totals = {"n1": (0, 0)}
    loss = LinkLoss(lambda: dict(totals), _Gauge(), lambda: now[0])
    assert not loss.lossy
    totals["n1"] = (100, 20)  # 80 % lost
    now[0] += LOSS_WINDOW
    loss.tick()
    assert loss.lossy
    totals["n1"] = (200, 119)  # 99 % answered
    now[0] += LOSS_WINDOW
    loss.tick()
    assert not loss.lossy
