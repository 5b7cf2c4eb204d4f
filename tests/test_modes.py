"""Each mode's policy, walked without processes or sockets: what the coordinator may send, what
finishes a step, and what each stage does and sends with each message."""

import numpy as np
import pytest

from dni_async.config import make_config
from dni_async.nn import network
from dni_async.nn.modes import MODES, Op, mode_of
from dni_async.nn.program import StageProgram

N = 3   # stages
SMALL = {"bits": 6, "n_train": 48, "n_test": 24, "hidden": [16, 12], "batch_size": 8,
         "micro_batches": 2, "epochs": 1}


def programs(mode_name, **extra):
    """Every stage's program for `mode_name`, each sending into its own list."""
    cfg = make_config({**SMALL, "mode": mode_name, **extra}, preset="tiny")
    ds, rng = network.load_data_and_rng(cfg)
    network.resolve_dims(cfg, ds)
    models = network.build(cfg, rng)
    sent = [[] for _ in models]
    progs = [StageProgram(m, mode_of(cfg), cfg, k,
                          send=lambda kind, step, arrays, meta, k=k: sent[k].append((kind, step)))
             for k, m in enumerate(models)]
    return cfg, ds, models, progs, sent


@pytest.mark.parametrize("name", list(MODES))
def test_every_stage_program_is_well_formed(name):
    mode = MODES[name]
    for rank in range(N):
        fwd, grad = mode.on_forward(rank, N), mode.on_gradient(rank, N)
        assert fwd[0] is Op.FORWARD
        assert (Op.SEND_GRAD in fwd + grad) == (rank > 0), "only stage 0 has no one upstream"
        assert (Op.SEND_FORWARD in fwd) == (rank < N - 1)
        if rank == N - 1:   # the loss lives here: the true gradient in every mode
            assert Op.LOSS_DELTA in fwd and Op.REPORT_LOSS in fwd and grad == ()
        if mode.decoupled and rank < N - 1:
            assert Op.HOLD not in fwd and grad == (Op.TRAIN_GENERATOR,)
            assert fwd.index(Op.SEND_FORWARD) < fwd.index(Op.SYNTHETIC_DELTA), \
                "the next stage gets its input before this one updates"
            assert fwd.index(Op.SYNTHETIC_DELTA) < fwd.index(Op.SYNTHETIC_UPDATE)
        if not mode.decoupled and rank < N - 1:
            assert Op.HOLD in fwd and grad[0] is Op.RELEASE
            assert (Op.REPORT_DONE in grad) == (rank == 0)
        ops = fwd + grad
        update = Op.ACCUMULATE if mode.micro_batched else Op.UPDATE
        update = Op.SYNTHETIC_UPDATE if Op.SYNTHETIC_UPDATE in ops else update
        if Op.SEND_GRAD in ops and update in ops:
            assert ops.index(Op.SEND_GRAD) < ops.index(update), "dL/dx leaves before the update"


@pytest.mark.parametrize("name,in_flight,finishes,pieces", [
    ("backprop", 1, {"loss", "done"}, 1), ("gpipe", 1, {"loss", "done"}, 2),
    ("dni", 3, {"loss"}, 1), ("cdni", 3, {"loss"}, 1)])
def test_what_the_coordinator_asks_of_each_mode(name, in_flight, finishes, pieces):
    cfg = make_config({**SMALL, "mode": name, "max_in_flight": 3}, preset="tiny")
    mode = mode_of(cfg)
    assert (mode.batches_in_flight(cfg), set(mode.finishes()), mode.pieces(cfg)) == \
        (in_flight, finishes, pieces)
    assert [mode.has_generator(k, N) for k in range(N)] == [mode.decoupled] * (N - 1) + [False]


def test_backprop_walk_sends_what_the_coordinator_waits_for():
    cfg, ds, models, progs, sent = programs("backprop")
    x, y = ds.x_train[:8], ds.y_train[:8]
    progs[0].on_forward(0, x, y)
    assert sent[0] == [("fwd", 0)] and 0 in progs[0].held
    assert not progs[0].admits_batch(1, 8), "a lockstep stage holds one batch"
    h0 = models[0].forward(x)
    progs[1].on_forward(0, h0, y)
    h1 = models[1].forward(h0)
    w_before = models[2].layer.W.copy()
    progs[2].on_forward(0, h1, y)
    assert sent[2] == [("grad", 0), ("loss", 0)]
    assert not np.array_equal(w_before, models[2].layer.W), "the last stage updated"
    w1 = models[1].layer.W.copy()
    progs[1].on_gradient(0, np.ones_like(h1) * 1e-3)
    assert sent[1] == [("fwd", 0), ("grad", 0)] and not progs[1].held
    assert not np.array_equal(w1, models[1].layer.W)
    progs[0].on_gradient(0, np.ones_like(h0) * 1e-3)
    assert sent[0] == [("fwd", 0), ("done", 0)]
    assert progs[0].admits_batch(1, 8)


def test_a_gradient_for_a_step_not_held_or_of_the_wrong_shape_is_refused():
    cfg, ds, models, progs, sent = programs("backprop")
    x, y = ds.x_train[:8], ds.y_train[:8]
    progs[1].on_forward(0, models[0].forward(x), y)
    assert not progs[1].admits_gradient(5, 8)
    with pytest.raises(ValueError):
        progs[1].on_gradient(0, np.zeros((8, 99)))
    assert 0 in progs[1].held, "a bad gradient leaves the held batch in place"


def test_gpipe_holds_every_piece_and_updates_once_per_batch():
    cfg, ds, models, progs, sent = programs("gpipe")
    x, y = ds.x_train[:8], ds.y_train[:8]
    assert not progs[0].admits_batch(0, 8), "gpipe takes micro-batches, not whole batches"
    xs, ys = np.array_split(x, 2), np.array_split(y, 2)
    h = [models[0].forward(xm) for xm in xs]
    for j in range(2):
        assert progs[1].admits_batch(j, 4)
        progs[1].on_forward(j, h[j], ys[j])
    assert not progs[1].admits_batch(2, 4), "one batch's pieces at most"
    w = models[1].layer.W.copy()
    progs[1].on_gradient(0, np.full((4, 12), 1e-3))
    assert np.array_equal(w, models[1].layer.W), "no update before the last piece"
    progs[1].on_gradient(1, np.full((4, 12), 1e-3))
    assert not np.array_equal(w, models[1].layer.W)
    assert [k for k, _ in sent[1]] == ["fwd", "fwd", "grad", "grad"]


@pytest.mark.parametrize("name", ["dni", "cdni"])
def test_decoupled_stage_updates_at_once_and_trains_its_generator_later(name):
    cfg, ds, models, progs, sent = programs(name, generator_lr=0.01)
    x, y = ds.x_train[:8], ds.y_train[:8]
    h0 = models[0].forward(x)
    for step in range(3):        # never waits: every batch is admitted and run at once
        assert progs[1].admits_batch(step, 8)
        progs[1].on_forward(step, h0, y)
    assert [k for k, _ in sent[1]] == ["fwd", "grad"] * 3, "its target goes upstream at once"
    assert models[1].counters["targets_applied"] == 0
    g_before = [p.copy() for p in models[1].generator.params()]
    progs[1].on_gradient(0, np.ones((8, 12)))
    assert models[1].counters["targets_applied"] == 1
    assert models[1].counters["target_lag_sum"] == 2, "two own updates since step 0's guess"
    assert any(not np.array_equal(a, b) for a, b in zip(g_before, models[1].generator.params()))
    assert progs[0].admits_batch(0, 8) and not progs[0].admits_batch(0, 7)


def test_a_true_boundary_makes_its_stage_wait_as_lockstep_does():
    """cdni with boundary 1 on the true gradient: stage 1 holds its batch until stage 2's
    dL/dx comes back, takes no other batch meanwhile, and has no generator; stage 0 stays
    decoupled."""
    cfg, ds, models, progs, sent = programs("cdni", true_boundaries=[1])
    assert models[1].generator is None and models[0].generator is not None
    assert progs[1].forward_ops == (Op.FORWARD, Op.SEND_FORWARD, Op.HOLD)
    assert progs[1].gradient_ops == (Op.RELEASE, Op.TRUE_DELTA, Op.SEND_GRAD, Op.UPDATE)
    x, y = ds.x_train[:8], ds.y_train[:8]
    h0 = models[0].forward(x)
    progs[1].on_forward(0, h0, y)
    assert not progs[1].ready_for_batch(), "it leaves the next batch queued"
    w = models[1].layer.W.copy()
    progs[1].on_gradient(0, np.full((8, 12), 1e-3))
    assert progs[1].ready_for_batch() and not np.array_equal(w, models[1].layer.W)
    assert [k for k, _ in sent[1]] == ["fwd", "grad"]
    assert progs[0].ready_for_batch() and progs[0].gradient_ops == (Op.TRAIN_GENERATOR,)


def test_true_boundaries_name_real_boundaries_and_change_nothing_in_lockstep():
    from dni_async.config import ConfigError
    with pytest.raises(ConfigError, match="outside"):
        make_config({**SMALL, "mode": "cdni", "true_boundaries": [2]}, preset="tiny")
    cfg = make_config({**SMALL, "mode": "backprop", "true_boundaries": [0]}, preset="tiny")
    mode = mode_of(cfg)     # lockstep: every boundary carries the true gradient already
    assert [mode.on_forward(k, N, [0]) for k in range(N)] == \
        [mode.on_forward(k, N) for k in range(N)]


def test_true_boundaries_count_from_the_output_when_negative_and_read_brackets():
    """-1 names the boundary next to the output whatever the depth, so a preset can couple
    it at any `--layers`; `--set true_boundaries=[1]` reads as TOML writes it."""
    cfg = make_config({**SMALL, "mode": "cdni", "true_boundaries": "[-1]"}, preset="tiny")
    assert cfg.true_boundaries == [cfg.n_stages - 2]
    deep = make_config({**SMALL, "mode": "cdni", "layers": 5, "true_boundaries": [-1, 0]},
                       preset="tiny")
    assert deep.true_boundaries == [0, 3]


def test_every_boundary_true_is_backprop_in_one_process():
    """cdni with every boundary on the true gradient does what lockstep backprop does, to
    the bit, in the one-process reference."""
    from dni_async.oneprocess import reference
    base = {**SMALL, "epochs": 2}
    bp = reference.train(make_config({**base, "mode": "backprop"}, preset="tiny"), log=None)
    tb = reference.train(make_config({**base, "mode": "cdni", "true_boundaries": [0, 1]},
                                     preset="tiny"), log=None)
    assert tb["weights_sha256"] == bp["weights_sha256"]
