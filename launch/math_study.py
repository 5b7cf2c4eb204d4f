"""The single-process study behind the mnist1d and digits presets (issue 12, math half).

    OPENBLAS_NUM_THREADS=1 python launch/math_study.py PHASE OUT.jsonl

Phases: `pick` (settings tried on MNIST-1D, 6 layers, seed 1), `table` (the presets: backprop,
cdni and the frozen-hidden control, 3 and 6 layers, MNIST-1D and digits, seeds 1-3), `delay`
(cdni on MNIST-1D, 6 layers, generator targets applied D = 0, 1, 2, 4 steps late, with and
without recomputing the generator's guess; seeds 1-3), `norm` (cdni on MNIST-1D, 3 and 6
layers, the generator's context normalised over the batch or per example; seeds 1-3),
`longer` (MNIST-1D, 6 layers: 120 epochs instead of 60; batch-normalised context with
targets 2 steps late), `deep` (MNIST-1D, 4 and 6 layers, the presets against what might close
cdni's gap: a second true boundary, `synthetic_lr`, `lr_decay`, `sg_trust`; seeds 1-3), `wide`
(launch/wide.toml: updates until held-out bit accuracy 0.8 and 0.9, evaluated every 2, with
targets on time or 2 steps late and the decoupled layers' learning rate lowered; seeds 1-3),
`per_label` (MNIST-1D, 3-6 layers, seeds 1-6: generators with one map of h per label, with
and without `sg_trust` or `lr_decay`; digits, 3 and 6 layers, seeds 1-3, with and without),
`generator_lr` (MNIST-1D, 3-6 layers, seeds 1-6: the per-label generators' learning rate),
`per_label_lr` (the same, with only the per-label maps' rate changed), `middle` (MNIST-1D, 4
and 5 layers, seeds 1-6: the preset against a second true boundary, `lr_decay`, a faster
`sg_trust`, a lower `synthetic_lr`, and targets one step late).
Every run is the reference trainer; each finished run appends one JSON line to OUT.
`summary OUT.jsonl` prints the tables.
"""

import json
import sys
import time
from collections import defaultdict

from dni_async.config import make_config
from dni_async.oneprocess import reference


# The first five phases ran before the presets kept the true gradient at the boundary next to
# the output: they pin every boundary synthetic, as studied. `deep` ran before MNIST-1D's preset
# took per-label generators and `sg_trust`: it pins them off (a row may set sg_trust itself).
BEFORE_PER_LABEL = {"generator_per_label": False, "sg_trust": 0.0}
AS_STUDIED = {"true_boundaries": [], **BEFORE_PER_LABEL}
# `per_label` ran with the generators' learning rate of the time; `generator_lr` chose today's.
# Both ran before the per-label maps had a rate of their own (`per_label_lr` chose it).
PER_LABEL_AS_STUDIED = {"generator_lr": 0.001, "generator_per_label_lr": 0.0}


def append(out, row):
    """One finished run, one JSON line: a phase cut short keeps what it finished."""
    with open(out, "a") as fh:
        fh.write(json.dumps(row) + "\n")


def run(out, label, preset, **settings):
    cfg = make_config({"eval_every": 1000, "log_every": 1000, **settings}, preset=preset)
    t0 = time.process_time()
    s = reference.train(cfg, log=None)
    row = {"label": label, "preset": preset, "settings": settings,
           "test_acc": s["final"]["test_bit_acc"], "train_acc": s["final"]["train_bit_acc"],
           "cpu_s": time.process_time() - t0, "generators": s["generators"]}
    append(out, row)
    print(f"{label:60s} {row['test_acc']:.3f} (train {row['train_acc']:.3f}) "
          f"{row['cpu_s']:.1f} s", flush=True)


def pick(out):
    sgd = {"optimizer": "sgd", "lr": 0.002, "batch_norm": False, "generator_optimizer": "sgd",
           "generator_lr": 0.0001}
    for name, s in [
        ("backprop, SGD (old preset), no BN", {"mode": "backprop", **sgd}),
        ("backprop, Adam 1e-3, BN", {"mode": "backprop", "lr": 0.001}),
        ("backprop, Adam 1e-2, no BN", {"mode": "backprop", "batch_norm": False}),
        ("backprop, Adam 1e-2, BN (preset)", {"mode": "backprop"}),
        ("backprop, Adam 3e-3, BN", {"mode": "backprop", "lr": 0.003}),
        ("cdni, SGD layers + SGD generators (old preset)", {"mode": "cdni", **sgd}),
        ("cdni, Adam layers + SGD generators 1e-4", {"mode": "cdni", "generator_optimizer": "sgd",
                                                     "generator_lr": 0.0001}),
        ("cdni, SGD layers + Adam generators", {"mode": "cdni", "optimizer": "sgd",
                                                "lr": 0.002}),
        ("cdni, Adam generators 1e-4", {"mode": "cdni", "generator_lr": 0.0001}),
        ("cdni, Adam generators 1e-3 (preset)", {"mode": "cdni"}),
        ("cdni, Adam generators 3e-3", {"mode": "cdni", "generator_lr": 0.003}),
        ("cdni, context normalised per example", {"mode": "cdni",
                                                  "generator_normalize": "example"}),
        ("cdni, context normalised over the batch", {"mode": "cdni",
                                                     "generator_normalize": "batch"}),
        ("cdni, generator hidden 64 + BN", {"mode": "cdni", "generator_hidden": 64,
                                            "generator_batch_norm": True}),
        ("cdni, sg_scale 0.5", {"mode": "cdni", "sg_scale": 0.5}),
        ("cdni, no batch norm", {"mode": "cdni", "batch_norm": False}),
        ("dni (context h), preset otherwise", {"mode": "dni"}),
    ]:
        run(out, name, "mnist1d", layers=6, seed=1, **AS_STUDIED, **s)


def table(out):
    for preset in ("mnist1d", "digits"):
        for layers in (3, 6):
            for seed in (1, 2, 3):
                for mode, extra in (("backprop", {}), ("cdni", {}),
                                    ("frozen", {"mode": "backprop", "freeze_hidden": True})):
                    s = {"mode": mode, **extra}
                    run(out, f"{preset} {layers} layers {mode} seed {seed}", preset,
                        layers=layers, seed=seed, **AS_STUDIED, **s)


def delay(out):
    for d in (0, 1, 2, 4):
        for recompute in ((True,) if d == 0 else (True, False)):
            for seed in (1, 2, 3):
                run(out, f"delay {d} recompute {recompute} seed {seed}", "mnist1d", layers=6,
                    mode="cdni", seed=seed, target_delay=d, generator_recompute=recompute,
                    **AS_STUDIED)


def context_norm(out):
    for layers in (6, 3):
        for norm in ("batch", "example"):     # "none" is the preset: see `table`
            for seed in (1, 2, 3):
                run(out, f"mnist1d {layers} layers cdni, context normalisation {norm} seed {seed}",
                    "mnist1d", layers=layers, mode="cdni", seed=seed, generator_normalize=norm,
                    **AS_STUDIED)


def longer(out):
    for seed in (1, 2, 3):
        for mode in ("backprop", "cdni"):
            run(out, f"mnist1d 6 layers {mode}, 120 epochs seed {seed}", "mnist1d", layers=6,
                mode=mode, seed=seed, epochs=120, **AS_STUDIED)
    for seed in (1, 2, 3):
        run(out, f"mnist1d 6 layers cdni, context normalisation batch, delay 2 seed {seed}",
            "mnist1d", layers=6, mode="cdni", seed=seed, generator_normalize="batch",
            target_delay=2, **AS_STUDIED)


def deep(out):
    for name, s in [
        ("backprop", {"mode": "backprop"}),
        ("cdni (preset)", {"mode": "cdni"}),
        ("cdni, true_boundaries [-1, -2]", {"mode": "cdni", "true_boundaries": [-1, -2]}),
        ("cdni, synthetic_lr 3e-3", {"mode": "cdni", "synthetic_lr": 0.003}),
        ("cdni, synthetic_lr 1e-3", {"mode": "cdni", "synthetic_lr": 0.001}),
        ("cdni, context normalised over the batch", {"mode": "cdni",
                                                     "generator_normalize": "batch"}),
        ("backprop, lr_decay linear", {"mode": "backprop", "lr_decay": "linear"}),
        ("cdni, lr_decay linear", {"mode": "cdni", "lr_decay": "linear"}),
        ("cdni, lr_decay linear, generator_lr 3e-3", {"mode": "cdni", "lr_decay": "linear",
                                                      "generator_lr": 0.003}),
        ("cdni, lr_decay linear, context normalised over the batch",
         {"mode": "cdni", "lr_decay": "linear", "generator_normalize": "batch"}),
        ("cdni, lr_decay linear, true_boundaries [-1, -2]",
         {"mode": "cdni", "lr_decay": "linear", "true_boundaries": [-1, -2]}),
        ("cdni, sg_trust 0.1", {"mode": "cdni", "sg_trust": 0.1}),
        ("cdni, sg_trust 0.02", {"mode": "cdni", "sg_trust": 0.02}),
        ("cdni, sg_trust 0.1, synthetic_lr 2e-2", {"mode": "cdni", "sg_trust": 0.1,
                                                  "synthetic_lr": 0.02}),
    ]:
        for layers in (4, 6):
            for seed in (1, 2, 3):
                run(out, f"mnist1d {layers} layers {name} seed {seed}", "mnist1d",
                    layers=layers, seed=seed, **{**BEFORE_PER_LABEL, **s})


def per_label(out):
    """MNIST-1D over six seeds (three left the means too loose to choose by): generators that
    keep one map of h per label, with and without `sg_trust` or `lr_decay`; then digits."""
    for depths, name, s in [
        ((3, 4, 5, 6), "backprop", {"mode": "backprop"}),
        ((3, 4, 5, 6), "cdni, per label, sg_trust 0.1 (preset)", {"mode": "cdni"}),
        ((4, 6), "cdni, [h, y] (the preset before)", {"mode": "cdni", **BEFORE_PER_LABEL}),
        ((4, 6), "cdni, [h, y], sg_trust 0.1", {"mode": "cdni", "generator_per_label": False}),
        ((4, 6), "cdni, per label", {"mode": "cdni", "sg_trust": 0.0}),
        ((4, 6), "cdni, per label, lr_decay linear", {"mode": "cdni", "sg_trust": 0.0,
                                                      "lr_decay": "linear"}),
    ]:
        for layers in depths:
            for seed in range(1, 7):
                run(out, f"mnist1d {layers} layers {name} seed {seed}", "mnist1d",
                    layers=layers, seed=seed, **{**PER_LABEL_AS_STUDIED, **s})
    for name, s in [("cdni (preset)", {}), ("cdni, per label", {"generator_per_label": True})]:
        for layers in (3, 6):
            for seed in (1, 2, 3):
                run(out, f"digits {layers} layers {name} seed {seed}", "digits",
                    layers=layers, seed=seed, mode="cdni", **s)


def generator_lr(out):
    """MNIST-1D over six seeds: the per-label generators' own Adam rate. Each of a generator's
    maps learns from one class's rows, a tenth of the batch."""
    for depths, rate in [((3, 4, 5, 6), 0.001), ((3, 4, 5, 6), 0.0003), ((6,), 0.0002),
                         ((3, 4, 5, 6), 0.0001)]:
        for layers in depths:
            for seed in range(1, 7):
                run(out, f"mnist1d {layers} layers cdni, generator_lr {rate:g} seed {seed}",
                    "mnist1d", layers=layers, seed=seed, mode="cdni", generator_lr=rate,
                    generator_per_label_lr=0.0)


def per_label_lr(out):
    """MNIST-1D over six seeds: the per-label maps at their own Adam rate, the shared map at
    the preset's 1e-3. The per-label maps hold ten times its weights and each learns from a
    tenth of the batch."""
    for layers in (3, 4, 5, 6):          # backprop on the same machine, for the comparison
        for seed in range(1, 7):
            run(out, f"mnist1d {layers} layers backprop seed {seed}", "mnist1d",
                layers=layers, seed=seed, mode="backprop")
    for depths, rate in [((3, 4, 5, 6), 0.0), ((3, 6), 3e-4), ((3, 4, 5, 6), 1e-4),
                         ((3, 4, 5, 6), 3e-5), ((3, 4, 5, 6), 1e-5)]:
        name = f"per-label maps at {rate:g}" if rate else "per-label maps at generator_lr"
        for layers in depths:
            for seed in range(1, 7):
                run(out, f"mnist1d {layers} layers cdni, {name} seed {seed}", "mnist1d",
                    layers=layers, seed=seed, mode="cdni", generator_per_label_lr=rate)


def middle(out):
    """MNIST-1D at 4 and 5 layers over six seeds, where the pipeline left cdni 1 to 3 points
    under backprop: the preset against what might close it, and the preset with its targets
    one step late, as the pipeline's are at times."""
    for name, s in [
        ("backprop", {"mode": "backprop"}),
        ("backprop, lr_decay linear", {"mode": "backprop", "lr_decay": "linear"}),
        ("cdni (preset)", {"mode": "cdni"}),
        ("cdni, targets 1 late", {"mode": "cdni", "target_delay": 1}),
        ("cdni, true_boundaries [-1, -2]", {"mode": "cdni", "true_boundaries": [-1, -2]}),
        ("cdni, lr_decay linear", {"mode": "cdni", "lr_decay": "linear"}),
        ("cdni, sg_trust 0.3", {"mode": "cdni", "sg_trust": 0.3}),
        ("cdni, synthetic_lr 5e-3", {"mode": "cdni", "synthetic_lr": 0.005}),
    ]:
        for layers in (4, 5):
            for seed in range(1, 7):
                run(out, f"mnist1d {layers} layers {name} seed {seed}", "mnist1d",
                    layers=layers, seed=seed, **s)


def _first_stages_at(lr, stages=2):
    """Patch the model builder so that the first `stages` layers learn at `lr`: lockstep has
    no setting for it (`synthetic_lr` is for layers trained on a guess)."""
    from dni_async.nn import network
    build = network.build

    def patched(cfg, rng, ranks=None):
        models = build(cfg, rng, ranks)
        for m in models[:stages]:
            m.optimizer.lr = lr
        return models
    network.build = patched
    return lambda: setattr(network, "build", build)


def wide(out):
    from dni_async.config import load_toml
    base = load_toml("launch/wide.toml")
    base = {**base, "mode": "cdni", "sg_trust": 0.0}       # each variant names what it adds
    for target in ("0.8", "0.9", "end"):     # end: the whole 4 epochs, for the final accuracy
        for name, s in [
            ("backprop", {"mode": "backprop"}),
            ("cdni, targets on time", {"mode": "cdni"}),
            ("cdni, targets 2 late", {"mode": "cdni", "target_delay": 2}),
            ("cdni, targets 2 late, synthetic_lr 1e-4", {"mode": "cdni", "target_delay": 2,
                                                         "synthetic_lr": 0.0001}),
            ("cdni, targets 2 late, stages 0 and 1 still (synthetic_lr 1e-12)",
             {"mode": "cdni", "target_delay": 2, "synthetic_lr": 1e-12}),
            ("cdni, targets 2 late, sg_trust 0.1", {"mode": "cdni", "target_delay": 2,
                                                    "sg_trust": 0.1}),
            ("cdni, targets 2 late, sg_trust 0.02 (wide.toml)", {"target_delay": 2,
                                                                  "sg_trust": 0.02}),
            ("backprop, stages 0 and 1 at lr 1e-4", {"mode": "backprop", "first_lr": 1e-4}),
        ]:
            s = dict(s)
            restore = _first_stages_at(s.pop("first_lr")) if "first_lr" in s else (lambda: None)
            for seed in (1, 2, 3):
                stop = ({"eval_batches": 64} if target == "end" else
                        {"eval_batches": 2, "stop_at": f"test_bit_acc={target}"})
                cfg = make_config({**base, **s, "seed": seed, **stop})
                r = reference.train(cfg, log=None)
                row = {"label": f"wide, to {target}, {name} seed {seed}", "updates": r["batches"],
                       "reached": r["stopped"] == "target", "test_acc": r["final"]["test_bit_acc"]}
                append(out, row)
                print(f"{row['label']:70s} {row['updates']} updates, held-out "
                      f"{row['test_acc']:.3f}", flush=True)
            restore()


def summary(path):
    rows = [json.loads(line) for line in open(path)]
    groups = defaultdict(list)
    for r in rows:
        groups[r["label"].rsplit(" seed ", 1)[0]].append(r)
    for name, rs in groups.items():
        if "updates" in rs[0]:
            updates = " / ".join(str(r["updates"]) for r in rs)
            accs = " / ".join(f"{r['test_acc']:.3f}" for r in rs)
            print(f"| {name} | {updates} | {accs} |")
            continue
        accs = [r["test_acc"] for r in rs]
        mean = sum(accs) / len(accs)
        cpu = sum(r["cpu_s"] for r in rs) / len(rs)
        print(f"| {name} | {mean:.3f} | {' / '.join(f'{a:.3f}' for a in accs)} | {cpu:.0f} |")


if __name__ == "__main__":
    phase, path = sys.argv[1], sys.argv[2]
    {"pick": pick, "table": table, "delay": delay, "norm": context_norm, "longer": longer,
     "deep": deep, "wide": wide, "per_label": per_label,
     "generator_lr": generator_lr, "per_label_lr": per_label_lr, "middle": middle,
     "summary": summary}[phase](path)
