"""The bench's pictures (matplotlib, an optional extra): timeline, metric vs time, width sweep.

    STEM-gantt.png   a short steady-state window of backprop and cdni: one row per process,
                     a colour per kind of work, waiting in grey (from the bench's trace)
    STEM-metric.png  the held-out metric against training seconds, every mode and reference
    STEM-sweep.png   samples/s and the bound against the swept setting, and the speed-up
"""

from __future__ import annotations

import json
import os
import sys

COLORS = {"forward": "#1f77b4", "backward": "#8c564b", "update": "#ff7f0e", "generator": "#2ca02c",
          "send": "#d62728", "eval": "#9467bd", "wait": "#e0e0e0"}
MODE_COLORS = {"backprop": "#1f77b4", "gpipe": "#9467bd", "dni": "#2ca02c", "cdni": "#d62728",
               "reference": "#7f7f7f", "reference_all_cores": "#000000"}


def pyplot(who: str = "dni-async"):
    """matplotlib's pyplot drawing to files, or None (said once, on stderr) without the extra."""
    try:
        import matplotlib
    except ImportError:
        print(f"{who}: matplotlib is not installed, so no pictures "
              "(pip install 'dni-async[plot]')", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path


def write_all(out: dict, stem: str) -> dict:
    """Every picture the bench's results allow; returns {kind: path}."""
    paths = {}
    trace = out.get("trace")
    if trace and os.path.exists(trace["path"]):
        labels = [m for m in ("backprop", "cdni") if m in trace["overhead"]]
        if labels:
            bp = out.get("modes", {}).get("backprop", {})
            window_ms = 6 * bp["batch_ms"] if bp.get("batch_ms") else None
            paths["gantt"] = gantt(trace["path"], f"{stem}-gantt.png", labels, window_ms)
    if out.get("modes"):
        paths["metric"] = metric_vs_time(out, f"{stem}-metric.png")
    if out.get("sweep"):
        paths["sweep"] = sweep(out["sweep"], f"{stem}-sweep.png")
    return paths


def _window(tracks: list, window_ms: float | None):
    """A steady-state window: from the training forward span of the first stage 3/4 of the way
    through the run (the middle of the last epoch of a two-epoch traced run)."""
    stage0 = next((t for t in tracks if t["name"].endswith("stage-0")), tracks[0])
    fwd = sorted(s[1] for s in stage0["spans"] if s[0] == "forward")
    if not fwd:
        fwd = sorted(s[1] for t in tracks for s in t["spans"])
    start = fwd[(3 * len(fwd)) // 4]
    if window_ms is None:   # about six batches of this run
        window_ms = 6 * (fwd[-1] - fwd[0]) / max(1, len(fwd) - 1) / 1000
    return start, start + window_ms * 1000


def gantt(trace_path: str, out_path: str, labels: list, window_ms: float | None = None) -> str:
    from dni_async.measure import trace as trace_mod
    plt = pyplot("bench")
    with open(trace_path) as fh:
        tr = json.load(fh)
    all_tracks = list(trace_mod.tracks(tr).values())
    fig, axes = plt.subplots(len(labels), 1, figsize=(11, 1.0 + 0.55 * 6 * len(labels)),
                             squeeze=False)
    for ax, label in zip(axes[:, 0], labels):
        tracks = [t for t in all_tracks if (t["name"] or "").startswith(label + " ")]
        tracks.sort(key=lambda t: _track_order(t["name"]))
        if not tracks:
            ax.set_visible(False)
            continue
        t0, t1 = _window(tracks, window_ms)
        for row, t in enumerate(tracks):
            for cat in ("wait", *(c for c in COLORS if c != "wait")):   # grey underneath
                bars = [((max(ts, t0) - t0) / 1000, (min(ts + dur, t1) - max(ts, t0)) / 1000)
                        for c, ts, dur, _ in t["spans"]
                        if c == cat and ts < t1 and ts + dur > t0]
                if bars:
                    ax.broken_barh(bars, (row - 0.4, 0.8), facecolors=COLORS[cat])
        ax.set_yticks(range(len(tracks)))
        ax.set_yticklabels([t["name"][len(label) + 1:] for t in tracks])
        ax.invert_yaxis()
        ax.set_xlim(0, (t1 - t0) / 1000)
        ax.set_title(f"{label}: {(t1 - t0) / 1000:.0f} ms of the steady state", loc="left")
        ax.set_xlabel("ms")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in COLORS.values()]
    fig.legend(handles, list(COLORS), loc="upper right", ncol=len(COLORS), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    save(fig, out_path)
    return out_path


def _track_order(name: str) -> tuple:
    last = name.rsplit(" ", 1)[-1]
    if last.startswith("stage-") and last[6:].isdigit():
        return (1, int(last[6:]))
    return (0, 0)


def metric_vs_time(out: dict, out_path: str) -> str:
    plt = pyplot("bench")
    metric = (out.get("target") or {}).get("metric", "test_bit_acc")
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    series = [(m, r, "-") for m, r in out.get("modes", {}).items()]
    series += [(k, out[k], "--") for k in ("reference", "reference_all_cores") if k in out]
    for name, r, style in series:
        rows = r.get("curve") or r["history"]
        pts = [(h["seconds"], h[metric]) for h in rows if h.get(metric) is not None]
        if pts:
            xs, ys = zip(*pts)
            label = name.replace("reference_all_cores", "reference, all cores")
            ax.plot(xs, ys, style, marker="o", ms=3, label=label,
                    color=MODE_COLORS.get(name))
    tgt = out.get("target")
    if tgt and tgt.get("value") is not None:
        ax.axhline(tgt["value"], color="0.5", lw=0.8, ls=":")
        ax.annotate(f"target {tgt['value']:g}", (0, tgt["value"]), fontsize=8, color="0.4",
                    xytext=(2, 2), textcoords="offset points")
    ax.set_xlabel("training seconds (evaluation excluded)")
    ax.set_ylabel(metric)
    ax.set_title(out.get("verdict") or "held-out metric against training time", loc="left",
                 fontsize=8, wrap=True)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save(fig, out_path)
    return out_path


def sweep(sw: dict, out_path: str) -> str:
    """Throughput with its bound, speed-up, and the share of the bound reached, per value."""
    plt = pyplot("bench")
    fig, (ax, ax2, ax3) = plt.subplots(1, 3, figsize=(14, 4.2))
    xs = sw["values"]
    bp = ([p["modes"]["backprop"] for p in sw["points"]] if "backprop" in sw["modes"] else None)
    for m in sw["modes"]:
        rows = [p["modes"][m] for p in sw["points"]]
        c = MODE_COLORS.get(m)
        lockstep = m == "backprop"       # one batch in flight: its own, lower bound
        bound = [(r.get("alone") or r)["lockstep_bound_samples_per_s" if lockstep
                                       else "bound_samples_per_s"] for r in rows]
        ax.plot(xs, [r["samples_per_s"] for r in rows], "-o", color=c, label=f"{m} measured")
        ax.plot(xs, bound, "--", color=c, alpha=0.6,
                label=f"{m} bound{' (lockstep)' if lockstep else ''}")
        ax3.plot(xs, [r["samples_per_s"] / b if b else None for r, b in zip(rows, bound)], "-o",
                 color=c, label=m)
        if bp and m != "backprop":
            ax2.plot(xs, [r["samples_per_s"] / b["samples_per_s"] for r, b in zip(rows, bp)],
                     "-o", color=c, label=f"{m} measured")
            ax2.plot(xs, [(r.get("alone") or r)["bound_samples_per_s"]
                          / (b.get("alone") or b)["lockstep_bound_samples_per_s"]
                          for r, b in zip(rows, bp)], "--", color=c, alpha=0.6,
                     label=f"{m} if only compute counted")
    for a in (ax, ax2, ax3):
        a.set_xscale("log", base=2)
        a.set_xticks(xs)
        a.set_xticklabels([str(x) for x in xs])
        a.set_xlabel(sw["key"])
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("samples/s")
    ax.set_title("throughput and its bound (t_k timed alone)", loc="left", fontsize=10)
    ax2.axhline(1.0, color="0.5", lw=0.8)
    ax2.set_ylabel("speed-up over backprop")
    ax2.set_title("speed-up over lockstep backprop", loc="left", fontsize=10)
    ax3.set_ylim(0, 1.05)
    ax3.set_ylabel("measured / bound")
    ax3.set_title("share of its bound (low: communication-bound)", loc="left", fontsize=10)
    fig.tight_layout()
    save(fig, out_path)
    return out_path
