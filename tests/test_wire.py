"""Tests for the wire format and socket helpers, over real ZeroMQ sockets."""

from __future__ import annotations

import os
import random
import time

import msgpack
import numpy as np
import pytest
import zmq

from dni_async.runtime import wire
from dni_async.runtime.wire import WireError

RUN = "run-1"
TIMEOUT_MS = 2000


# ---------------------------------------------------------------- fixtures

class Sockets:
    """Makes sockets on one context and remembers them for teardown."""

    def __init__(self):
        self.context = wire.make_context()
        self.made: list[zmq.Socket] = []

    def make(self, kind: int, **kw) -> zmq.Socket:
        sock = wire.socket(self.context, kind, **kw)
        self.made.append(sock)
        return sock


@pytest.fixture
def ctx():
    """Sockets closed with linger 0 and the context terminated at teardown."""
    sockets = Sockets()
    yield sockets
    wire.close_all(sockets.context, sockets.made)


@pytest.fixture(params=["inproc", "ipc"])
def pair(request, ctx, tmp_path):
    """A connected (push, pull) pair over inproc or ipc."""
    if request.param == "inproc":
        endpoint = "inproc://wire-test"
    else:
        endpoint = wire.ipc_endpoint(tmp_path, "w.ipc")
    pull = ctx.make(zmq.PULL, max_msg_bytes=wire.DEFAULT_MAX_ARRAY_BYTES)
    pull.bind(endpoint)
    push = ctx.make(zmq.PUSH)
    push.connect(endpoint)
    return push, pull


def _frames(data=(), /, **changes):
    """Raw frames for arrays ``data``; header fields can be overridden or deleted (None)."""
    header = {"v": 1, "run": RUN, "kind": "fwd", "step": 0, "meta": {},
              "arrays": [[a.dtype.str, list(a.shape)] for a in data]}
    for key, value in changes.items():
        if value is None:
            del header[key]
        else:
            header[key] = value
    return [msgpack.packb(header, use_bin_type=True), *(a.tobytes() for a in data)]


def _assert_same(sent, got):
    assert got.dtype == sent.dtype and got.shape == sent.shape
    assert got.tobytes() == np.ascontiguousarray(sent).tobytes()


# ---------------------------------------------------------------- round trip

ARRAYS = [
    np.array([[1.5, np.nan, -0.0], [np.inf, 2.0, 3.0]]),           # float64 incl. nan, -0
    np.arange(24, dtype=np.float32).reshape(2, 3, 4),
    np.arange(-5, 5, dtype=np.int64),
    np.zeros((0, 5)),                                               # 0-sized
    np.array(7, dtype=np.int32),                                    # 0-d
    np.arange(16, dtype=np.uint8).reshape(1, 2, 2, 4),
    np.random.default_rng(0).standard_normal((100, 200)),          # 160 KB: zero-copy path
    np.arange(60, dtype=np.float64).reshape(6, 10)[:, ::3],         # not contiguous
]
META = {"lr": 0.1, "names": ["a", "b"], "n": -3, "ok": True, "none": None,
        "nested": {"x": [1, 2.5]}, "blob": b"\x00\xff"}


def test_round_trip_over_socket(pair):
    push, pull = pair
    wire.send(push, RUN, "fwd", 42, ARRAYS, META)
    msg = wire.recv(pull, RUN, TIMEOUT_MS)
    assert msg is not None
    assert (msg.kind, msg.step, msg.meta) == ("fwd", 42, META)
    assert len(msg.arrays) == len(ARRAYS)
    for sent, got in zip(ARRAYS, msg.arrays):
        _assert_same(sent, got)
        assert not got.flags.writeable and got.flags.aligned


def test_many_small_messages_keep_order(pair):
    push, pull = pair
    for step in range(50):
        wire.send(push, RUN, "grad", step, [np.full((10, 128), step, dtype=np.float64)])
    for step in range(50):
        msg = wire.recv(pull, RUN, TIMEOUT_MS)
        assert msg.step == step and msg.arrays[0][3, 7] == step and msg.arrays[0].flags.aligned


def test_decode_accepts_encoded_frames_and_bytes():
    frames = wire.encode(RUN, "done", arrays=ARRAYS[:3])
    for variant in (frames, [bytes(f) for f in frames], [bytearray(f) for f in frames]):
        msg = wire.decode(variant, RUN)
        assert (msg.kind, msg.step, msg.meta) == ("done", -1, {})
        for sent, got in zip(ARRAYS, msg.arrays):
            _assert_same(sent, got)


def test_malformed_message_is_consumed(pair):
    push, pull = pair
    push.send_multipart([b"\xc1garbage"])
    wire.send(push, RUN, "ack", 1)
    with pytest.raises(WireError):
        wire.recv(pull, RUN, TIMEOUT_MS)
    assert wire.recv(pull, RUN, TIMEOUT_MS).kind == "ack"


def test_recv_times_out(ctx):
    pull = ctx.make(zmq.PULL)
    pull.bind("inproc://nobody")
    t0 = time.monotonic()
    assert wire.recv(pull, RUN, 50) is None
    assert 0.04 <= time.monotonic() - t0 < 1.0


# ---------------------------------------------------------------- encode

@pytest.mark.parametrize("kwargs", [
    {"kind": "nope"},
    {"step": True},
    {"step": 1.0},
    {"arrays": [[1.0, 2.0]]},
    {"arrays": [np.zeros(2, dtype=np.complex128)]},
    {"arrays": [np.zeros(2, dtype=">f8")]},
    {"arrays": [np.zeros((1,) * 5)]},
    {"meta": {1: "x"}},
    {"meta": {"x": np.int64(3)}},
    {"meta": {"x": 2**70}},
    {"meta": {"x": "y" * wire.DEFAULT_MAX_HEADER}},
])
def test_encode_rejects(kwargs):
    args = {"kind": "fwd", "step": 0, "arrays": (), "meta": None} | kwargs
    with pytest.raises(WireError):
        wire.encode(RUN, **args)


# ---------------------------------------------------------------- decode rejects

A = np.arange(4, dtype=np.float64)


@pytest.mark.parametrize("frames, limits", [
    pytest.param([], {}, id="no frames"),
    pytest.param([bytes(range(256))], {}, id="random header"),
    pytest.param([_frames()[0][:-3]], {}, id="truncated header"),
    pytest.param([_frames()[0] + b"\x00"], {}, id="trailing bytes"),
    pytest.param(_frames(meta={"s": "x" * 100}), {"max_header": 64}, id="oversized header"),
    pytest.param([msgpack.packb([1, 2])], {}, id="header not a map"),
    pytest.param([b"\xc7\x00\x05"], {}, id="ext header"),
    pytest.param(_frames(step=None), {}, id="missing key"),
    pytest.param(_frames(extra=1), {}, id="extra key"),
    pytest.param(_frames(v=2), {}, id="wrong version"),
    pytest.param(_frames(v=True), {}, id="bool version"),
    pytest.param(_frames(run="other"), {}, id="wrong run"),
    pytest.param(_frames(run=b"run-1"), {}, id="bytes run"),
    pytest.param(_frames(kind="bogus"), {}, id="unknown kind"),
    pytest.param(_frames(kind="fwd"), {"kinds": frozenset({"grad"})}, id="kind not accepted"),
    pytest.param(_frames(step=True), {}, id="bool step"),
    pytest.param(_frames(step="1"), {}, id="str step"),
    pytest.param(_frames(meta=[]), {}, id="meta not a map"),
    pytest.param(_frames(meta={b"k": 1}), {}, id="bytes meta key"),
    pytest.param(_frames(meta={"k": {b"k": 1}}), {}, id="nested bytes meta key"),
    pytest.param(_frames(meta={"k": msgpack.ExtType(1, b"")}), {}, id="ext meta value"),
    pytest.param([msgpack.packb({"v": 1, "run": RUN, "kind": "fwd", "step": 0,
                                 "meta": {1: 2}, "arrays": []})],
                 {}, id="int meta key"),
    pytest.param(_frames(meta={"k": [[[[[[[[[[1]]]]]]]]]]}), {}, id="meta too deep"),
    pytest.param(_frames(arrays={}), {}, id="arrays not a list"),
    pytest.param([*_frames([A]), A.tobytes()], {}, id="fewer specs than frames"),
    pytest.param(_frames([A])[:1], {}, id="more specs than frames"),
    pytest.param([_frames([A])[0], A.tobytes()[:-1]], {}, id="size mismatch"),
    pytest.param([_frames(arrays=[["|O", [1]]])[0], b"\x00" * 8], {}, id="object dtype"),
    pytest.param([_frames(arrays=[["<c16", [1]]])[0], b"\x00" * 16], {}, id="complex dtype"),
    pytest.param([_frames(arrays=[[">f8", [1]]])[0], b"\x00" * 8], {}, id="big-endian dtype"),
    pytest.param([_frames(arrays=[[7, [1]]])[0], b"\x00" * 8], {}, id="dtype not str"),
    pytest.param([_frames(arrays=[["<f8", [-1]]])[0], b""], {}, id="negative dim"),
    pytest.param([_frames(arrays=[["|u1", [True, True]]])[0], b"\x00"], {}, id="bool dims"),
    pytest.param([_frames(arrays=[["|u1", [1.0]]])[0], b"\x00"], {}, id="float dim"),
    pytest.param([_frames(arrays=[["|u1", [1] * 5]])[0], b"\x00"], {}, id="ndim > 4"),
    pytest.param([_frames(arrays=[["|u1", 1]])[0], b"\x00"], {}, id="shape not a list"),
    pytest.param([_frames(arrays=[["|u1"]])[0], b"\x00"], {}, id="short spec"),
    pytest.param([_frames(arrays=[["<f8", [2**63, 2**63, 2**63, 2**63]]])[0], b""], {},
                 id="huge shape"),
    pytest.param(_frames([A]), {"max_array_bytes": 16}, id="array over limit"),
    pytest.param([_frames([A])[0], 12345], {}, id="frame not a buffer"),
])
def test_decode_rejects(frames, limits):
    with pytest.raises(WireError):
        wire.decode(frames, RUN, **limits)


def test_decode_limits_allow_exact_sizes():
    frames = _frames([A])
    assert wire.decode(frames, RUN, max_header=len(frames[0]), max_array_bytes=A.nbytes).step == 0


# ---------------------------------------------------------------- fuzz

_JUNK = [None, True, False, -1, 0, 1, 2**40, -2**63, 1.5, "", "fwd", "<f8", b"x",
         [], {}, [1], [-1], ["<f8", [1]], [["<f8", [1]]], [["|u1", [8]]], {"a": 1}, {"": [None]}]


def _mutate(rng: random.Random, frames: list[bytes]) -> list:
    frames = list(frames)
    op = rng.randrange(7)
    if op == 0:  # bit flips in the header
        head = bytearray(frames[0])
        for _ in range(rng.randint(1, 4)):
            head[rng.randrange(len(head))] ^= 1 << rng.randrange(8)
        frames[0] = bytes(head)
    elif op == 1:  # truncate a frame
        i = rng.randrange(len(frames))
        frames[i] = frames[i][: rng.randrange(len(frames[i]) + 1)]
    elif op == 2:  # drop or duplicate frames
        if frames and rng.random() < 0.5:
            del frames[rng.randrange(len(frames))]
        else:
            frames.insert(rng.randrange(len(frames) + 1), rng.choice(frames))
    elif op == 3:  # random bytes
        frames[rng.randrange(len(frames))] = rng.randbytes(rng.randrange(64))
    elif op == 4:  # random frame count
        frames = frames[: rng.randrange(len(frames) + 2)] + [b"\x00" * 8] * rng.randrange(3)
    else:  # structurally valid msgpack with a wrong value somewhere
        header = msgpack.unpackb(frames[0])
        target = header
        if rng.random() < 0.5 and header["arrays"]:
            target = rng.choice(header["arrays"])
            target[rng.randrange(2)] = rng.choice(_JUNK)
        else:
            target[rng.choice(list(target))] = rng.choice(_JUNK)
        frames[0] = msgpack.packb(header)
    return frames


def test_fuzz_raises_only_wire_error():
    rng = random.Random(1234)
    seeds = [
        [bytes(f) for f in wire.encode(RUN, "fwd", 3, [np.ones((2, 3)), np.arange(5)], {"a": [1]})],
        [bytes(f) for f in wire.encode(RUN, "stats", meta={"x": 1.0, "y": "z"})],
        [bytes(f) for f in wire.encode(RUN, "grad", 0, [np.zeros((4, 4), np.float32)])],
    ]
    outcomes = {"ok": 0, "error": 0}
    for _ in range(2000):
        frames = _mutate(rng, rng.choice(seeds))
        try:
            msg = wire.decode(frames, RUN)
        except WireError:
            outcomes["error"] += 1
            continue
        outcomes["ok"] += 1
        assert msg.kind in wire.KINDS and isinstance(msg.step, int) and isinstance(msg.meta, dict)
        assert len(msg.arrays) == len(frames) - 1
        assert all(a.dtype.str in wire.ALLOWED_DTYPES for a in msg.arrays)
    assert outcomes["error"] > 1000  # the mutations do reach the checks


# ---------------------------------------------------------------- helpers

def test_socket_options(ctx):
    pull = ctx.make(zmq.PULL, hwm=7, max_msg_bytes=1 << 20)
    push = ctx.make(zmq.PUSH, max_msg_bytes=1 << 20)
    assert pull.getsockopt(zmq.LINGER) == 0
    assert pull.getsockopt(zmq.SNDHWM) == 7 and pull.getsockopt(zmq.RCVHWM) == 7
    assert pull.getsockopt(zmq.MAXMSGSIZE) == 1 << 20
    assert push.getsockopt(zmq.MAXMSGSIZE) == -1
    assert ctx.make(zmq.PULL, linger=50).getsockopt(zmq.LINGER) == 50


def test_close_all_twice_and_forgotten_socket():
    context = wire.make_context()
    kept = wire.socket(context, zmq.PUSH)
    wire.socket(context, zmq.PULL).bind("inproc://forgotten")
    wire.close_all(context, [kept])
    wire.close_all(context, [kept])
    assert context.closed and kept.closed


def test_free_tcp_ports_are_distinct_and_bindable(ctx):
    for _ in range(2000):     # probed one by one, 14 in 5000 such draws repeated a port
        ports = wire.free_tcp_ports(7)
        assert len(set(ports)) == 7 and all(0 < p < 65536 for p in ports)
    for port in ports:
        ctx.make(zmq.PULL).bind(f"tcp://127.0.0.1:{port}")


def test_ipc_endpoint(tmp_path):
    endpoint = wire.ipc_endpoint(tmp_path, "s.ipc")
    assert endpoint == "ipc://" + os.path.join(str(tmp_path), "s.ipc")
    assert wire.endpoint_path(endpoint) == os.path.join(str(tmp_path), "s.ipc")
    with pytest.raises(ValueError, match="limit"):
        wire.ipc_endpoint("/tmp/" + "d" * 120, "s.ipc")
    with pytest.raises(ValueError):
        wire.ipc_endpoint(tmp_path, "n" * 110)


@pytest.mark.parametrize("endpoint", ["tcp://127.0.0.1:5555", "inproc://x", "ipc://@abstract", "ipc://*"])
def test_endpoint_path_none(endpoint):
    assert wire.endpoint_path(endpoint) is None
