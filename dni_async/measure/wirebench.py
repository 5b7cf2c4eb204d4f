"""Transport micro-benchmark: the wire layer against raw pyzmq, per hop, between two processes.

    dni-async bench --wire --json wire.json

Both sides use the sockets a pipeline uses: PUSH -> PULL over ipc, one each way, made by
`wire.socket`. This process sends; a child process (`python -m dni_async.measure.wirebench --child`)
echoes or swallows. For each array size:

  latency    median round trip / 2 of one message echoed back (both hops carry the array)
  bandwidth  bytes / second of a stream of messages, until the child acknowledges the last;
             the median of 5 rounds, raw and wire alternating round by round

"wire" is `wire.send` + `wire.recv` (msgpack header frame, validation, a read-only array view);
"raw" is `send_multipart([array], copy=False)` + `recv_multipart(copy=False)` + `np.frombuffer`.
Every receive has a timeout, and the child is always ended (stop message, then kill).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import zmq

from dni_async.runtime import wire

SIZES = (1 << 10, 4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 8 << 20)
RUN = "wirebench"
TIMEOUT_MS = 10_000
MIB = 1024 * 1024


class WireBenchError(RuntimeError):
    pass


# -- the child: echo or swallow what it is told to --------------------------------------------

def _child(to_ep: str, back_ep: str) -> int:
    ctx = wire.make_context()
    pull = wire.socket(ctx, zmq.PULL, max_msg_bytes=wire.DEFAULT_MAX_ARRAY_BYTES)
    push = wire.socket(ctx, zmq.PUSH)
    push.setsockopt(zmq.SNDTIMEO, TIMEOUT_MS)
    try:
        pull.connect(to_ep)
        push.connect(back_ep)
        while True:
            ctl = wire.recv(pull, RUN, TIMEOUT_MS)
            if ctl is None or ctl.kind == "stop":
                return 0 if ctl is not None else 1
            phase, n = ctl.meta["phase"], int(ctl.meta["n"])
            for _ in range(n):
                if not pull.poll(TIMEOUT_MS):
                    return 1
                if phase.endswith("wire"):
                    msg = wire.recv(pull, RUN, 0)
                    if phase.startswith("echo"):
                        wire.send(push, RUN, "fwd", msg.step, msg.arrays)
                else:
                    frames = pull.recv_multipart(copy=False)
                    arr = np.frombuffer(frames[0], dtype=np.float32)
                    if phase.startswith("echo"):
                        push.send_multipart([arr], copy=False)
            if phase.startswith("sink"):
                wire.send(push, RUN, "ack", n)
    except zmq.Again:
        return 1
    finally:
        wire.close_all(ctx, [pull, push])


# -- the parent: time both ways ----------------------------------------------------------------

class _Link:
    """This process's end: PUSH to the child, PULL back; the child is started and always ended."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="dni-wb-")
        self.ctx = wire.make_context()
        self.push = wire.socket(self.ctx, zmq.PUSH)
        self.push.setsockopt(zmq.SNDTIMEO, TIMEOUT_MS)
        self.pull = wire.socket(self.ctx, zmq.PULL, max_msg_bytes=wire.DEFAULT_MAX_ARRAY_BYTES)
        to_ep = wire.ipc_endpoint(self.dir, "to")
        back_ep = wire.ipc_endpoint(self.dir, "back")
        self.push.bind(to_ep)
        self.pull.bind(back_ep)
        from dni_async.runtime.supervisor import _die_with_parent, child_env
        self.child = subprocess.Popen(
            [sys.executable, "-m", "dni_async.measure.wirebench", "--child", to_ep, back_ep],
            env=child_env(1), preexec_fn=_die_with_parent)

    def close(self) -> None:
        try:
            if self.child.poll() is None:
                try:
                    wire.send(self.push, RUN, "stop", flags=zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
                try:
                    self.child.wait(5)
                except subprocess.TimeoutExpired:
                    self.child.kill()
                    self.child.wait()
        finally:
            wire.close_all(self.ctx, [self.push, self.pull])
            shutil.rmtree(self.dir, ignore_errors=True)

    def control(self, phase: str, n: int) -> None:
        wire.send(self.push, RUN, "start", meta={"phase": phase, "n": n})

    def _wait(self) -> None:
        if not self.pull.poll(TIMEOUT_MS):
            code = self.child.poll()
            raise WireBenchError("the echo process did not answer within "
                                 f"{TIMEOUT_MS / 1000:.0f} s" + (f" (exit {code})" if code else ""))

    def recv_wire(self):
        self._wait()
        return wire.recv(self.pull, RUN, 0)

    def recv_raw(self):
        self._wait()
        frames = self.pull.recv_multipart(copy=False)
        return np.frombuffer(frames[0], dtype=np.float32)


def _round_trips(link: _Link, arr, raw: bool, n: int) -> list:
    """Seconds of each of n round trips (after three warm-up ones)."""
    link.control("echo-raw" if raw else "echo-wire", n + 3)
    times = []
    for i in range(n + 3):
        t0 = time.perf_counter()
        if raw:
            link.push.send_multipart([arr], copy=False)
            link.recv_raw()
        else:
            wire.send(link.push, RUN, "fwd", i, [arr])
            link.recv_wire()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return times


def _stream_MiBps(link: _Link, arr, raw: bool, n: int) -> float:
    """MiB/s of n messages sent back to back, until the child acknowledges the last."""
    link.control("sink-raw" if raw else "sink-wire", n)
    t0 = time.perf_counter()
    for i in range(n):
        if raw:
            link.push.send_multipart([arr], copy=False)
        else:
            wire.send(link.push, RUN, "fwd", i, [arr])
    ack = link.recv_wire()
    dt = time.perf_counter() - t0
    if ack is None or ack.kind != "ack":
        raise WireBenchError("the echo process sent no acknowledgement")
    return n * arr.nbytes / dt / MIB


def measure(link: _Link, size: int, rounds: int = 5) -> dict:
    """One size: raw and wire alternate round by round, so drifts in load hit both alike."""
    arr = np.random.RandomState(0).rand(max(1, size // 4)).astype(np.float32)
    n_rt = int(min(200, max(8, (16 * MIB) // size)))
    n_bw = int(min(1000, max(8, (64 * MIB) // size)))
    rt = {True: [], False: []}
    bw = {True: [], False: []}
    for _ in range(rounds):
        for raw in (True, False):
            rt[raw] += _round_trips(link, arr, raw, n_rt)
            bw[raw].append(_stream_MiBps(link, arr, raw, n_bw))
    row = {"bytes": int(arr.nbytes),
           "latency_us": statistics.median(rt[False]) / 2 * 1e6,
           "raw_latency_us": statistics.median(rt[True]) / 2 * 1e6,
           "bandwidth_MiBps": statistics.median(bw[False]),
           "raw_bandwidth_MiBps": statistics.median(bw[True])}
    row["bandwidth_ratio"] = row["bandwidth_MiBps"] / row["raw_bandwidth_MiBps"]
    return row


def run(sizes=None, log=None) -> list[dict]:
    """Latency and bandwidth of wire vs raw pyzmq for each array size (bytes)."""
    sizes = SIZES if sizes is None else sizes
    link = _Link()
    rows = []
    try:
        for size in sizes:
            rows.append(measure(link, size))
            if log:
                log(format_row(rows[-1]))
    except zmq.Again:
        raise WireBenchError("the echo process took no message within "
                             f"{TIMEOUT_MS / 1000:.0f} s") from None
    finally:
        link.close()
    return rows


def human_bytes(n: int) -> str:
    if n >= MIB:
        return f"{n / MIB:g} MiB"
    return f"{n / 1024:g} KiB"


HEADER = (f"{'array':>8}  {'latency us':>10}  {'raw us':>8}  {'MiB/s':>8}  {'raw MiB/s':>9}  "
          f"{'wire/raw':>8}")


def format_row(r: dict) -> str:
    return (f"{human_bytes(r['bytes']):>8}  {r['latency_us']:>10.1f}  {r['raw_latency_us']:>8.1f}  "
            f"{r['bandwidth_MiBps']:>8,.0f}  {r['raw_bandwidth_MiBps']:>9,.0f}  "
            f"{r['bandwidth_ratio']:>8.0%}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dni_async.measure.wirebench")
    p.add_argument("--child", nargs=2, metavar=("TO", "BACK"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return _child(*args.child)
    print(HEADER)
    run(log=print)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
