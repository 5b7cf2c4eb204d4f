"""Gradient fidelity: how close synthetic gradients, and the targets they learn from, come to
the true ones, over training."""

from __future__ import annotations

import numpy as np

from dni_async.config import ConfigError
from dni_async.measure.plots import pyplot, save


def train_with_fidelity(cfg, every: int = 1, log=None) -> dict:
    """The reference trainer with its gradient-fidelity measurement on (`fidelity_every`).

    Training is exactly `reference.train`'s (the same weights, bit for bit); beside it, every
    `every` steps each stage's synthetic gradient, and the bootstrapped target its generator
    learns from, are compared with the true dL/dh carried back from the loss.
    """
    from dni_async.oneprocess import reference
    from dni_async.nn.modes import mode_of
    if not mode_of(cfg).has_generator(0, cfg.n_stages):
        raise ConfigError("gradient fidelity compares synthetic gradients: mode dni or cdni")
    cfg.fidelity_every = every
    s = reference.train(cfg, log=None)
    bpe = cfg.batches_per_epoch()
    epochs = [{"epoch": h["epoch"], "train_acc": h["train_bit_acc"], "test_acc": h["test_bit_acc"],
               "loss": h["loss"]} for h in s["history"]]
    if log:
        for h in s["history"]:
            log(f"{cfg.mode} epoch {h['epoch']}/{cfg.epochs}: train acc "
                f"{h['train_bit_acc']:.4f} held-out {h['test_bit_acc']:.4f}  cos(synthetic, true) "
                "per stage " + " ".join(f"{c:+.3f}" for c in h.get("fidelity_cos", [])), flush=True)
    return {"config": s["config"], "rows": [{**r, "epoch": r["step"] / bpe} for r in s["fidelity"]],
            "epochs": epochs, "weights_sha256": s["weights_sha256"]}


def fidelity_by_epoch(result: dict) -> dict:
    """Per epoch and stage: mean cos, rel and target cos of the measured steps."""
    out = {}
    for key in ("cos", "rel", "target_cos"):
        by = {}
        for r in result["rows"]:
            by.setdefault(int(r["epoch"]), []).append(r[key])
        out[key] = {e: np.mean(v, axis=0).tolist() for e, v in sorted(by.items())}
    return out


def plot_fidelity(results: list, path: str, title: str) -> str | None:
    """Cosine and relative error of the synthetic gradient per stage over training."""
    plt = pyplot("experiment")
    if plt is None:
        return None
    fig, axes = plt.subplots(2, len(results), figsize=(5 * len(results), 6.2), squeeze=False,
                             sharex=True)
    for j, res in enumerate(results):
        mode = res["config"]["mode"]
        rows = res["rows"]
        n = len(rows[0]["cos"])
        xs = np.array([r["epoch"] for r in rows])
        span = max(1, len(rows) // 60)   # smooth over about 1/60 of the run
        cmap = plt.get_cmap("viridis")
        for k in range(n):
            color = cmap(k / max(1, n - 1))
            cos = _smooth([r["cos"][k] for r in rows], span)
            rel = _smooth([r["rel"][k] for r in rows], span)
            axes[0][j].plot(xs, cos, color=color, label=f"stage {k}")
            axes[1][j].plot(xs, rel, color=color, label=f"stage {k}")
        axes[0][j].set_title(f"{mode}: synthetic vs true dL/dh", fontsize=10)
        axes[0][j].set_ylabel("cosine similarity")
        axes[0][j].set_ylim(-0.2, 1.0)
        axes[0][j].axhline(0, color="#999999", lw=0.8)
        axes[1][j].set_ylabel("relative error ||g_hat - g|| / ||g||")
        axes[1][j].set_ylim(0, 2.0)
        axes[1][j].axhline(1, color="#999999", lw=0.8)
        axes[1][j].set_xlabel("epoch")
        for ax in axes[:, j]:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save(fig, path)
    return path


def _smooth(values, span: int):
    v = np.asarray(values, dtype=float)
    if span <= 1:
        return v
    kernel = np.ones(span) / span
    padded = np.concatenate([np.full(span - 1, v[0]), v])
    return np.convolve(padded, kernel, mode="valid")


def fidelity_markdown(results: list) -> str:
    n = len(results[0]["rows"][0]["cos"])
    head = ["mode", "epoch"] + [f"stage {k} cos" for k in range(n)] + \
           [f"stage {k} rel err" for k in range(n)] + ["held-out acc"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for res in results:
        fe = fidelity_by_epoch(res)
        last = max(fe["cos"])
        marks = sorted({0, last // 2, last})
        for e in marks:
            cells = [res["config"]["mode"], str(e + 1)]
            cells += [f"{c:+.3f}" for c in fe["cos"][e]] + [f"{r:.3f}" for r in fe["rel"][e]]
            cells.append(f"{res['epochs'][e]['test_acc']:.4f}")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
