"""`dni-async train`: start the coordinator and one process per stage, watch them, end them all.

The supervisor owns every process it starts. It returns only when all of them have exited:
on success, when one fails (the rest are stopped and the failed one is named), and on Ctrl-C
or SIGTERM (everyone is asked to stop, then killed after a grace period). Children also die
with the supervisor (PR_SET_PDEATHSIG), so not even a SIGKILL of `train` leaves orphans.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from dni_async.nn import network
from dni_async import report
from dni_async.measure import float_warnings
from dni_async.config import Config, ConfigError
from dni_async.runtime import checkpoint
from dni_async.runtime.runspec import (RunSpec, all_endpoints, check_ports_free, plan_endpoints,
                                       release_ipc, remove_ipc_files)
from dni_async.runtime.stage import account_path as stage_account

BLAS_ENV = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
            "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")
EXIT_FAILED = 1
EXIT_REFUSED = 2      # a process's own check of the settings failed (a stage's preflight)
REFUSAL_GRACE_S = 1.0  # after a stage fails, how long the others may take to show a refusal
EXIT_INTERRUPTED = 130
GRACE_S = 1.5


def child_env(blas_threads: int = 1) -> dict:
    """One BLAS thread per process: N stages on few cores must not oversubscribe them."""
    env = dict(os.environ)
    for k in BLAS_ENV:
        env[k] = str(blas_threads)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def verdict_wait_s(cfg: Config) -> float:
    """How long `train` waits, once a stage has failed, for the coordinator to end by itself:
    its next heartbeat finds a dead stage unreachable, and a second more lets it write its
    account (or the summary, if the stage failed after its final report)."""
    return cfg.heartbeat_s + 1.0


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except OSError:
        pass


def default_run_dir(cfg: Config) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return os.path.join("runs", f"{stamp}-{cfg.mode}-{os.getpid()}")


def prepare(cfg: Config, run_dir: str | None, trace: bool = False,
            resume_from: str | None = None):
    """Check what can be checked before any process starts; write the run's config.json."""
    ds, _ = network.load_data_and_rng(cfg)
    network.resolve_dims(cfg, ds)
    run_dir = os.path.abspath(run_dir or default_run_dir(cfg))
    try:
        os.makedirs(run_dir, exist_ok=True)
        probe = os.path.join(run_dir, ".write-test")
        with open(probe, "w"):
            pass
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(f"cannot write the run folder {run_dir}: {exc.strerror}") from None
    stale = ["failure.json", "stopped.json", "summary.json",          # from an earlier attempt
             *(os.path.basename(stage_account(run_dir, k)) for k in range(cfg.n_stages))]
    for name in stale:
        if os.path.exists(os.path.join(run_dir, name)):
            os.unlink(os.path.join(run_dir, name))
    ipc_dir = tempfile.mkdtemp(prefix="dni-") if cfg.transport == "ipc" else None
    try:
        endpoints = plan_endpoints(cfg, ipc_dir)
    except (OSError, ValueError) as exc:
        if ipc_dir:
            shutil.rmtree(ipc_dir, ignore_errors=True)
        raise ConfigError(f"cannot plan endpoints: {exc}") from None
    try:
        check_ports_free(endpoints)
    except ConfigError:
        if ipc_dir:
            shutil.rmtree(ipc_dir, ignore_errors=True)
        raise
    spec = RunSpec(config=cfg, run_dir=run_dir, endpoints=endpoints, trace=trace,
                   resume_from=resume_from)
    spec.save(os.path.join(run_dir, "config.json"))
    return spec, ipc_dir


class Supervisor:
    def __init__(self, spec: RunSpec, quiet: bool = False):
        self.spec = spec
        self.quiet = quiet
        self.procs: dict[str, subprocess.Popen] = {}
        self.say = None     # when set, the coordinator's lines come through it (a live view)
        self.relay = None

    def start(self) -> None:
        path = os.path.join(self.spec.run_dir, "config.json")
        env = child_env(1)
        py = [sys.executable, "-m", "dni_async"]
        out = subprocess.DEVNULL if self.quiet else (subprocess.PIPE if self.say else None)
        # Children get sessions of their own, so a terminal's Ctrl-C reaches only `train`, which
        # asks the coordinator for an orderly stop instead of every process stopping at once.
        for k in range(self.spec.config.n_stages):
            self.procs[f"stage {k}"] = subprocess.Popen(
                [*py, "stage", path, "--rank", str(k)], env=env, preexec_fn=_die_with_parent,
                start_new_session=True)
        self.procs = {"coordinator": None, **self.procs}
        self.procs["coordinator"] = subprocess.Popen(
            [*py, "coordinator", path], env=env, stdout=out, preexec_fn=_die_with_parent,
            start_new_session=True, text=out is subprocess.PIPE or None)
        if out is subprocess.PIPE:
            self.relay = threading.Thread(target=self._relay, daemon=True,
                                          args=(self.procs["coordinator"].stdout,))
            self.relay.start()

    def _relay(self, stream) -> None:
        for line in stream:
            self.say(line.rstrip("\n"))
    def watch(self, tick=time.sleep) -> tuple[int, str | None]:
        """Wait for the coordinator; if any process fails first, return (status, who).
        `tick(seconds)` waits between looks (a live view draws meanwhile)."""
        coord = self.procs["coordinator"]
        while True:
            rc = coord.poll()
            if rc is not None:
                if rc != 0:
                    return rc, "coordinator"
                return self._await_stages()
            for name, p in self.procs.items():
                # a stage that fails makes the run fail; one that ends cleanly was told to stop
                if name != "coordinator" and p.poll() not in (None, 0):
                    self._await_verdict(coord)
                    return self._first_cause(p.returncode, name)
            tick(0.05)

    def _first_cause(self, status: int, who: str) -> tuple[int, str]:
        """A stage that refused its settings is the cause, not a peer that timed out on it
        meanwhile (with a short peer_timeout_s the peers can exit before the refusal shows).
        Stages still running get a moment, bounded, to end by themselves."""
        deadline = time.monotonic() + REFUSAL_GRACE_S
        stages = [(n, p) for n, p in self.procs.items() if n != "coordinator"]
        while any(p.poll() is None for _, p in stages) and time.monotonic() < deadline:
            time.sleep(0.02)
        for name, p in stages:
            if p.poll() == EXIT_REFUSED:
                return EXIT_REFUSED, name
        return status, who

    def _await_verdict(self, coord) -> None:
        """A stage has failed: let the coordinator see it too and write its own account, or
        finish the summary if the stage failed after its final report. Bounded: a coordinator
        that has not ended by then (stuck itself, or still waiting for a stage that never
        said hello) is stopped."""
        try:
            coord.wait(verdict_wait_s(self.spec.config))
        except subprocess.TimeoutExpired:
            pass

    def _await_stages(self) -> tuple[int, str | None]:
        """The coordinator ended well, so every stage had saved its weights and sent its final
        report: the run is complete, and summary.json says so. A stage that then fails to
        leave cleanly (killed while closing, say) is reported, but does not fail the run."""
        deadline = time.monotonic() + 5.0
        for name, p in self.procs.items():
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                print(f"dni-async train: {name} did not exit after the run had completed; "
                      "stopping it", file=sys.stderr)
                continue     # stop_all ends it
            if p.returncode != 0:
                print(f"dni-async train: {name} {_describe_exit(p.returncode)} after the run "
                      "had completed; its summary is written", file=sys.stderr)
        return 0, None

    def interrupt_coordinator(self, wait_s: float = 1.6) -> None:
        """Ask the coordinator for an orderly stop (drain, checkpoint, stop the stages)."""
        coord = self.procs.get("coordinator")
        if coord is None or coord.poll() is not None:
            return
        try:
            coord.send_signal(signal.SIGINT)
            coord.wait(wait_s)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass

    def stop_all(self, grace: float = GRACE_S) -> None:
        """SIGTERM everyone (the coordinator first, so it can record where the run stood),
        then SIGKILL whoever is still there after `grace` seconds."""
        alive = [p for p in self.procs.values() if p is not None and p.poll() is None]
        for p in alive:
            try:
                p.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        for p in alive:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def resume_point(run_dir: str) -> tuple[RunSpec, str]:
    """A run's saved plan and its newest good checkpoint (an absolute path, for processes
    started anywhere), or one ConfigError line saying why there is none."""
    from dni_async.runtime import checkpoint
    old = RunSpec.load(os.path.join(run_dir, "config.json"))
    # what the previous attempt left if `train` itself was killed, so that nobody swept after
    # it: ipc files of children killed before they could remove theirs, unfinished checkpoints
    release_ipc(all_endpoints(old.endpoints))
    checkpoint.discard_unfinished(run_dir)
    if os.path.exists(os.path.join(run_dir, "summary.json")):
        raise ConfigError(f"{run_dir} finished already (its summary.json is there): nothing to "
                          "resume; start a new run, or train longer with a new run folder")
    try:
        ckpt = checkpoint.latest_good(run_dir, log=lambda m: print(m, file=sys.stderr))
    except checkpoint.CheckpointError as exc:
        raise ConfigError(str(exc)) from None
    return old, os.path.abspath(ckpt)


def resume(run_dir: str, json_path: str | None = None, quiet: bool = False,
           live: bool = False) -> int:
    """Continue a run from its newest good checkpoint, with fresh endpoints."""
    old, ckpt = resume_point(run_dir)
    if not quiet:
        print(f"dni-async train: resuming {run_dir} from {ckpt}", flush=True)
    return train(old.config, run_dir=run_dir, json_path=json_path, quiet=quiet,
                 trace=old.trace, resume_from=ckpt, live=live)


def train(cfg: Config, run_dir: str | None = None, json_path: str | None = None,
          quiet: bool = False, trace: bool = False, resume_from: str | None = None,
          live: bool = False, view=None, timeline: bool = False) -> int:
    """Run a pipeline to its end. `live`: the full-screen view (plain lines without a terminal);
    otherwise a progress bar when stdout is a terminal. `view`: a ready-made one (tests).
    `timeline` (with `trace`): write trace.json and gantt.png into the run folder at the end."""
    if json_path:
        folder = os.path.dirname(os.path.abspath(json_path))
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError:
            pass
        if not os.access(folder, os.W_OK):
            raise ConfigError(f"cannot write {json_path}: folder {folder} is not writable")
    spec, ipc_dir = prepare(cfg, run_dir, trace, resume_from)
    if not quiet:
        print(f"dni-async train: {cfg.mode}, {cfg.n_stages} stage processes + coordinator, "
              f"{cfg.transport}, widths {cfg.widths}, run folder {spec.run_dir}", flush=True)
    sup = Supervisor(spec, quiet=quiet)
    if view is None:
        from dni_async.measure import live as live_mod
        view = live_mod.make_view(spec, live, quiet)
    if view is not None and view.captures_output:
        sup.say = view.say
    # Installed explicitly: a shell that starts `train` in the background leaves SIGINT
    # ignored, yet SIGINT to `train` is its documented "stop in order".
    previous = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    status, who = EXIT_FAILED, None
    try:
        sup.start()
        status, who = sup.watch(view.tick if view else time.sleep)
        if view is not None:
            _last_words(view, sup)
    except KeyboardInterrupt:
        _hold_signals(previous)   # a second Ctrl-C must not cut the orderly stop short
        status, who = EXIT_INTERRUPTED, None
        if view is not None:
            view.close()
        print("dni-async: interrupted; checkpointing and stopping every process", file=sys.stderr)
        sup.interrupt_coordinator()
    finally:
        _hold_signals(previous)   # cleanup is bounded (GRACE_S, then SIGKILL): let it finish
        if view is not None:
            view.close()
        sup.stop_all()
        remove_ipc_files(spec.endpoints)
        if ipc_dir:
            shutil.rmtree(ipc_dir, ignore_errors=True)
        # every process has gone: what a killed one was writing will never be finished
        checkpoint.discard_unfinished(spec.run_dir)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if status != 0 and completed(spec.run_dir):
        # a process killed (or Ctrl-C) after every stage had reported and the summary was
        # written: the run's result is whole, and --resume would refuse it as finished
        what = "interrupted" if who is None else f"{who} {_describe_exit(status)}"
        print(f"dni-async train: {what} after the run had completed; its summary is written",
              file=sys.stderr)
        status = 0
    if status == EXIT_INTERRUPTED:
        stopped = report.read_json(os.path.join(spec.run_dir, "stopped.json")) or {}
        where = stopped.get("checkpoint")
        if where:
            print(f"dni-async train: interrupted; checkpoint {where}\n"
                  f"resume with: dni-async train --resume {spec.run_dir}", file=sys.stderr)
        else:
            print("dni-async train: interrupted before a checkpoint could be taken",
                  file=sys.stderr)
        return EXIT_INTERRUPTED
    if status == 0:
        summary = report.read_json(os.path.join(spec.run_dir, "summary.json"))
        if json_path:
            report.write_json(json_path, summary)
        if not quiet:
            print(summary_text(summary))
        if trace and timeline:
            write_timeline(spec.run_dir, quiet)
        return 0
    print(f"dni-async train: failed: {_failure(spec.run_dir, status, who)}", file=sys.stderr)
    return EXIT_FAILED if status < 0 else max(1, min(status, 125))


def completed(run_dir: str) -> bool:
    """The coordinator writes summary.json last, only once every stage has sent its final
    report (and `prepare` removes an earlier attempt's): its presence means a complete run."""
    return os.path.exists(os.path.join(run_dir, "summary.json"))


def _failure(run_dir: str, status: int, who: str | None) -> str:
    """The run's failure in one line; failure.json rewritten when a stage failed, since the
    supervisor saw that first-hand (the coordinator's account may describe the aftermath, and
    a stage that gave up on a peer says whom it was waiting for)."""
    failure = report.read_json(os.path.join(run_dir, "failure.json")) or {}
    if not (who and who.startswith("stage")):
        return failure.get("error") or f"{who} {_describe_exit(status)}"
    stopped = report.read_json(os.path.join(run_dir, "stopped.json")) or {}
    detail = f"{who} {_describe_exit(status)}"
    said = (report.read_json(stage_account(run_dir, int(who.split()[1]))) or {}).get("error")
    step = failure.get("last_completed_step", stopped.get("last_completed_step"))
    if status == EXIT_REFUSED:    # its own check of the settings, before training
        detail = f"{who} refused to start (the line above says why)"
    else:
        if said:
            detail += ": " + said.removeprefix(f"{who}: ")
        if step is not None:
            detail += f" (last completed step {step})"
    # the coordinator's account (open steps, flight record) stays, under this headline
    report.write_json(os.path.join(run_dir, "failure.json"),
                      {**failure, "error": detail, "failed": who, "last_completed_step": step,
                       "coordinator_saw": failure.get("error"), "stage_said": said})
    return detail


def write_timeline(run_dir: str, quiet: bool = False) -> None:
    """The run's Chrome trace (trace.json, for Perfetto) and its Gantt picture (gantt.png)."""
    from dni_async.measure import plots, trace
    path = os.path.join(run_dir, "trace.json")
    trace.merge(run_dir, path)
    png = plots.run_gantt(path, os.path.join(run_dir, "gantt.png"))
    if not quiet:
        print(f"trace: {path} (open it in https://ui.perfetto.dev)"
              + (f"\ntimeline: {png}" if png else ""))


def _last_words(view, sup, wait_s: float = 1.0) -> None:
    """After the coordinator has gone: the final snapshot and its last lines, if on the way."""
    deadline = time.monotonic() + wait_s
    while not view.feed.final and time.monotonic() < deadline:
        view.tick(0.05)
    if sup.relay is not None:
        sup.relay.join(wait_s)     # it reads to the end of the pipe


def _describe_exit(status: int) -> str:
    if status < 0:
        try:
            return f"was killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"was killed by signal {-status}"
    return f"exited with status {status}"


def _hold_signals(signals) -> None:
    for sig in signals:
        signal.signal(sig, signal.SIG_IGN)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def summary_text(s: dict) -> str:
    f = s["final"]
    busy = "  ".join(f"stage {k}: {b:.0%}" for k, b in enumerate(s["stage_busy"]))
    bad = sum(s["bad_messages"].values())
    lags = []
    for st in s["stages"]:
        c = st.get("counters", {})
        if c.get("targets_applied"):
            lags.append(f"stage {st['rank']}: mean {c['target_lag_sum'] / c['targets_applied']:.2f} "
                        f"max {c['target_lag_max']}")
    lag = f"target lag (own updates before a generator target arrives): {'  '.join(lags)}\n" if lags else ""
    fp = float_warnings.line(s.get("fp_warnings") or {})
    fp = f"{fp}\n" if fp else ""
    slow = s["config"].get("slow_stage")
    slow = f"slow_stage = {slow}: busy compute added to that stage's every forward pass\n" if slow else ""
    return (f"\n== {s['config']['mode']} across {len(s['stage_busy'])} stage processes ==\n"
            f"train: bit accuracy {f['train_bit_acc']:.4f}  exact {f['train_exact_acc']:.4f}  "
            f"loss {f['train_loss']:.5f}\n"
            f"held-out: bit accuracy {f['test_bit_acc']:.4f}  exact {f['test_exact_acc']:.4f}\n"
            f"throughput: {s['samples_per_s']:,.0f} samples/s over {s['train_seconds']:.1f} s "
            f"of training ({s['wall_seconds']:.1f} s wall"
            f"{' since the resume' if s.get('resumed') else ''})\n"
            f"busy share: {busy}\n"
            f"{lag}"
            f"{slow}"
            f"{fp}"
            f"bad messages dropped: {bad}\n"
            f"run folder: {s.get('run_dir')}")
