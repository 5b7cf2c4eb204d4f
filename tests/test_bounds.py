"""The bounds the bench measures against: what the stages' own work allows."""

import pytest

from dni_async.measure import bounds


def test_bound_is_the_slowest_stage_or_the_cores():
    # two stages of 10 ms and two of 1 ms on 2 cores: the slowest stage limits (10 ms)
    b = bounds.bounds([0.001, 0.010, 0.010, 0.001], batch_size=100, cores=2)
    assert b["bound_samples_per_s"] == pytest.approx(100 / 0.011)
    assert b["bound_samples_per_s"] == pytest.approx(100 / max(0.010, 0.022 / 2))
    assert b["lockstep_bound_samples_per_s"] == pytest.approx(100 / 0.022)
    # four equal stages on 2 cores: the cores limit
    b = bounds.bounds([0.005] * 4, batch_size=10, cores=2)
    assert b["bound_samples_per_s"] == pytest.approx(10 / 0.010)
    assert b["bound_limited_by"] == "cores"


def test_lockstep_period_lets_updates_run_beside_the_stages_upstream():
    # stage 0 is light, stages 1 and 2 heavy: (forward, backward, update) ms per stage
    f, b, u = [1, 4, 4, 1], [0.5, 4, 4, 1], [1, 4, 4, 1]
    # forward 10, backward 1 + 4 + 4 + 0.5, stage 0's update 1: 20.5 ms; but the next batch
    # reaches stage 1 (0.5 + 1 + 1 ms after stage 1's backward) before stage 1's update is
    # done (4 ms after it) and waits 1.5 ms: a period of 22 ms, against 29.5 one at a time
    assert bounds.lockstep_period(f, b, u) == pytest.approx(22)
    assert bounds.lockstep_period(f, b, [0] * 4) == pytest.approx(19.5)
    t = [(fk + bk + uk) / 1000 for fk, bk, uk in zip(f, b, u)]
    ms = tuple([x / 1000 for x in p] for p in (f, b, u))
    got = bounds.bounds(t, batch_size=100, cores=2, parts=ms)
    assert got["lockstep_chain_ms"] == pytest.approx(22)
    assert got["lockstep_bound_samples_per_s"] == pytest.approx(100 / 0.022)
    # no stage can update beside anything when every part is in one place: the period is the sum
    assert bounds.lockstep_period([1], [2], [3]) == pytest.approx(6)
    # the next batch also waits for the last stage's loss, sent after its (here long) update
    assert bounds.lockstep_period([1, 1], [0.1, 1], [0.1, 10]) == pytest.approx(13)
