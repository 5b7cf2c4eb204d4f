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


# -- one run's timeline (`train --trace`) and pictures of finished runs (`plot`) ---------------

PREEMPTED_CPU_SHARE = 0.5   # a span whose thread ran less than half its wall time was preempted
GAP_COLOR = "#ffffff"


def run_gantt(trace_path: str, out_path: str, window_ms: float | None = None,
              batches: int = 8) -> str | None:
    """One run's timeline: a row per process over a steady-state window of about `batches`
    batches; each span in its category's colour with its batch number on it where it fits;
    work whose thread got less than half its wall time on a core hatched as preempted; time
    inside no span left white (a gap). Returns the path, or None without matplotlib."""
    from dni_async.measure import trace as trace_mod
    plt = pyplot("train")
    if plt is None:
        return None
    from matplotlib.patches import Patch
    with open(trace_path) as fh:
        tr = json.load(fh)
    tracks = sorted(trace_mod.tracks(tr, cpu=True).values(),
                    key=lambda t: _track_order(t["name"] or ""))
    tracks = [t for t in tracks if t["spans"]]
    if not tracks:
        return None
    if window_ms is None:
        stage0 = next((t for t in tracks if (t["name"] or "").endswith("stage-0")), tracks[0])
        fwd = sorted(s[1] for s in stage0["spans"] if s[0] == "forward")
        if len(fwd) >= 2:
            window_ms = batches * (fwd[-1] - fwd[0]) / (len(fwd) - 1) / 1000
    t0, t1 = _window(tracks, window_ms)
    fig, ax = plt.subplots(figsize=(13, 1.6 + 0.6 * len(tracks)))
    preempted = False
    for row, t in enumerate(tracks):
        for cat in ("wait", *(c for c in COLORS if c != "wait")):   # grey underneath
            for c, ts, dur, step, cpu in t["spans"]:
                if c != cat or ts >= t1 or ts + dur <= t0:
                    continue
                a, b = (max(ts, t0) - t0) / 1000, (min(ts + dur, t1) - t0) / 1000
                pre = (cat != "wait" and cpu is not None and dur > 20
                       and cpu < PREEMPTED_CPU_SHARE * dur)
                preempted |= pre
                ax.broken_barh([(a, b - a)], (row - 0.4, 0.8), facecolors=COLORS[cat],
                               edgecolor="black" if pre else "none", linewidth=0.4,
                               hatch="////" if pre else None, alpha=0.45 if pre else 1.0)
                width_ms = (t1 - t0) / 1000
                if cat not in ("wait", "send") and step >= 0 and (b - a) > width_ms / 90:
                    ax.text((a + b) / 2, row, str(step), ha="center", va="center",
                            fontsize=6.5, color="white" if cat != "update" else "black",
                            clip_on=True)
    ax.set_yticks(range(len(tracks)))
    ax.set_yticklabels([t["name"] for t in tracks])
    ax.invert_yaxis()
    ax.set_xlim(0, (t1 - t0) / 1000)
    ax.set_xlabel("ms")
    ax.set_title(f"{(t1 - t0) / 1000:.1f} ms of the steady state; numbers on spans: the batch "
                 "(step) each one worked on", loc="left", fontsize=10)
    handles = [Patch(facecolor=c, edgecolor="0.6" if k == "wait" else c, label=k)
               for k, c in COLORS.items()]
    handles.append(Patch(facecolor="0.85", edgecolor="black", hatch="////", alpha=0.6,
                         label="preempted (CPU < half of wall)"))
    handles.append(Patch(facecolor=GAP_COLOR, edgecolor="0.6", label="gap (in no span)"))
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.22 - 0.05 / max(1, len(tracks) / 4)),
              ncol=len(handles), fontsize=8, frameon=False)
    fig.tight_layout()
    save(fig, out_path)
    return out_path


def _read_summary(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "summary.json")) as fh:
        return json.load(fh)


def _label(run_dir: str, s: dict, all_summaries: list) -> str:
    """The mode, and what sets this run apart from the others (or its folder's name)."""
    cfg = s.get("config", {})
    label = cfg.get("mode", "?")
    same = [o for o in all_summaries if o.get("config", {}).get("mode") == cfg.get("mode")]
    if cfg.get("slow_stage"):
        label += f" slow {cfg['slow_stage']}"
    if len(same) > 1:
        label += f" ({os.path.basename(os.path.normpath(run_dir))})"
    return label


def curve_points(s: dict, metric: str) -> list:
    """(epoch, seconds, value) of a run's held-out or training metric: its "curve" (held-out
    points {batches, epoch, seconds, test_*}) when it has one, else its history."""
    if metric.startswith("test_") and s.get("curve"):
        return [(p.get("epoch"), p.get("seconds"), p[metric]) for p in s["curve"]
                if p.get(metric) is not None]
    return [(h["epoch"], h["seconds"], h[metric]) for h in s.get("history", [])
            if h.get(metric) is not None]


def plot_runs(run_dirs: list, out: str | None = None) -> list | None:
    """Learning curves (held-out and training metric against epoch and against seconds), busy
    shares per stage and the target-lag histogram of finished runs, overlaid. Writes one PNG:
    `out`, else RUN_DIR/plot.png for one run, else compare-<runs>.png beside the first."""
    plt = pyplot("plot")
    if plt is None:
        return None
    from dni_async.config import ConfigError
    summaries = []
    for d in run_dirs:
        try:
            summaries.append(_read_summary(d))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{d}: no finished run here (summary.json: {exc})") from None
    labels = [_label(d, s, summaries) for d, s in zip(run_dirs, summaries)]
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#7f7f7f"]
    colors = []
    for i, s in enumerate(summaries):
        mode = s.get("config", {}).get("mode")
        c = MODE_COLORS.get(mode)
        colors.append(c if c and c not in colors else palette[i % len(palette)])
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    (ax_ep, ax_s), (ax_busy, ax_lag) = axes
    metric = "bit_acc"
    for s, label, c in zip(summaries, labels, colors):
        for kind, style in (("test", "-"), ("train", "--")):
            pts = curve_points(s, f"{kind}_{metric}")
            if not pts:
                continue
            ep, sec, val = zip(*pts)
            name = f"{label}, {'held-out' if kind == 'test' else 'training (running)'}"
            ax_ep.plot(ep, val, style, color=c, lw=1.3, label=name)
            ax_s.plot(sec, val, style, color=c, lw=1.3, label=name)
    ax_ep.set_xlabel("epoch")
    ax_s.set_xlabel("training seconds (evaluation excluded)")
    for ax in (ax_ep, ax_s):
        ax.set_ylabel("bit accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax_ep.set_title("learning curves against epochs", loc="left", fontsize=10)
    ax_s.set_title("... and against wall-clock training time", loc="left", fontsize=10)

    # busy shares: a stacked bar per stage per run, in the Gantt colours
    n_runs = len(summaries)
    bar_w = 0.8 / n_runs
    ticks, ticklabels = [], []
    for i, (s, label) in enumerate(zip(summaries, labels)):
        for st in s.get("stages", []):
            x = st["rank"] + (i - (n_runs - 1) / 2) * bar_w
            bottom = 0.0
            for cat, col in COLORS.items():
                share = st.get("times", {}).get(cat, 0.0) / st["wall"] if st.get("wall") else 0.0
                if share > 0:
                    ax_busy.bar(x, share, bar_w * 0.95, bottom=bottom, color=col,
                                edgecolor="white", linewidth=0.3)
                    bottom += share
            ticks.append(x)
            ticklabels.append(f"stage {st['rank']}" + (f"\n{s['config']['mode']}"
                                                       if n_runs > 1 else ""))
    ax_busy.set_xticks(ticks)
    ax_busy.set_xticklabels(ticklabels, fontsize=7 if n_runs > 1 else 9)
    ax_busy.set_ylim(0, 1.22)
    ax_busy.set_ylabel("share of the stage's wall time")
    ax_busy.set_title("where each stage's time went (white above: in no span)", loc="left",
                      fontsize=10)
    from matplotlib.patches import Patch
    ax_busy.legend(handles=[Patch(color=c, label=k) for k, c in COLORS.items()], fontsize=7,
                   ncol=len(COLORS), loc="upper center", columnspacing=0.8, handlelength=1.2)

    # target lag: own updates before a generator target arrives, per stage and run
    drew = False
    styles = ["-", "--", ":", "-."]
    for s, label, c in zip(summaries, labels, colors):
        for st in s.get("stages", []):
            h = st.get("lag_histogram") or {}
            if not h:
                continue
            lags = sorted(int(k) for k in h)
            total = sum(h.values())
            ax_lag.step(lags, [h[str(k)] / total for k in lags], where="mid", color=c,
                        ls=styles[st["rank"] % len(styles)], label=f"{label}, stage {st['rank']}")
            drew = True
    if drew:
        ax_lag.legend(fontsize=7)
        ax_lag.set_xlabel("target lag (own updates before the generator's target arrived)")
        ax_lag.set_ylabel("share of targets")
    else:
        ax_lag.text(0.5, 0.5, "no generator targets in these runs\n(lockstep modes have none)",
                    ha="center", va="center", transform=ax_lag.transAxes, color="0.4")
        ax_lag.set_xticks([])
        ax_lag.set_yticks([])
    ax_lag.set_title("target lag histogram", loc="left", fontsize=10)
    ax_lag.grid(alpha=0.3)
    fig.suptitle("  vs  ".join(labels), fontsize=11)
    fig.tight_layout()
    if out is None:
        if len(run_dirs) == 1:
            out = os.path.join(run_dirs[0], "plot.png")
        else:
            names = "-".join(os.path.basename(os.path.normpath(d)) for d in run_dirs)[:120]
            out = os.path.join(os.path.dirname(os.path.abspath(run_dirs[0])),
                               f"compare-{names}.png")
    save(fig, out)
    return [out]
