"""Wire format and ZeroMQ socket helpers for the dni_async pipeline.

Wire format (protocol version 1)
--------------------------------
One message is one ZeroMQ multipart message::

    frame 0      header: a msgpack map (at most ``max_header`` bytes, 64 KiB default)
    frame 1..N   one raw frame per numpy array, in header order

The header map has exactly these six keys, no more and no fewer:

    ``v``       int   protocol version, must equal ``PROTOCOL_VERSION`` (1)
    ``run``     str   run id; a receiver rejects messages from any other run
    ``kind``    str   one of ``KINDS``
    ``step``    int   batch id, ``-1`` when the message is not about a batch
    ``meta``    map   str keys; values are nil, bool, int, float, str, bin,
                      or arrays/maps of those (maps again with str keys),
                      nested at most 8 levels deep; may be empty
    ``arrays``  array one ``[dtype, shape]`` pair per array frame, where
                ``dtype`` is numpy's ``dtype.str`` and one of ``ALLOWED_DTYPES``
                (``'<f8' '<f4' '<i8' '<i4' '|u1'``) and ``shape`` is an array
                of 0 to 4 non-negative ints (bools are not ints here)

Strings are msgpack str (UTF-8), byte strings are msgpack bin; ext types
are not used. Each array frame holds exactly ``prod(shape) * itemsize``
bytes: the array's C-order data, little-endian, with no padding. Its length
must match the header and must not exceed ``max_array_bytes`` (512 MiB by
default). The number of ``arrays`` entries must equal the number of frames
minus one. Anything else is malformed and ``decode`` raises ``WireError``.

Memory and copying
------------------
Array frames larger than 64 KiB are sent zero-copy: ZeroMQ reads the
array's memory after ``send`` returns, so do not modify an array in place
after sending it (send a copy if you must). Smaller frames are copied.

Received arrays are read-only views of the received frames (over
``inproc://`` they may even share memory with the sender's array). Copy
one before writing to it. A frame that arrives unaligned for its dtype (it
happens to small frames over ipc/tcp) is copied into an aligned array.

Sockets
-------
Create one context per process with ``make_context`` after any fork, make
sockets with ``socket`` (linger 0, bounded queues, optional frame size
limit) and release everything with ``close_all``.
"""

from __future__ import annotations

import math
import os
import reprlib
import socket as _stdsocket
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import zmq

PROTOCOL_VERSION = 1

KINDS: frozenset[str] = frozenset({
    "fwd", "grad", "loss", "done", "eval", "evalres", "hello", "start",
    "heartbeat", "stats", "stop", "error", "checkpoint", "ack",
})
ALLOWED_DTYPES: frozenset[str] = frozenset({"<f8", "<f4", "<i8", "<i4", "|u1"})

DEFAULT_MAX_HEADER = 64 * 1024            # bytes
DEFAULT_MAX_ARRAY_BYTES = 512 * 1024**2   # per array
ZERO_COPY_THRESHOLD = 64 * 1024           # frames larger than this are not copied

_HEADER_KEYS = frozenset({"v", "run", "kind", "step", "meta", "arrays"})
_MAX_NDIM = 4
_MAX_META_DEPTH = 8
_META_SCALARS = (type(None), bool, int, float, str, bytes)

# sun_path holds 108 bytes on Linux and 104 on macOS/BSD, NUL included.
_IPC_PATH_MAX = 107 if sys.platform.startswith("linux") else 103

# Socket types that receive messages; MAXMSGSIZE only matters for these.
_RECEIVING = frozenset({
    zmq.PULL, zmq.SUB, zmq.XSUB, zmq.PAIR, zmq.REQ, zmq.REP, zmq.DEALER, zmq.ROUTER,
})


class WireError(ValueError):
    """A message that does not follow the wire format, or cannot be encoded."""


@dataclass
class Message:
    """A decoded message; ``arrays`` are read-only, usually views of the frames."""

    kind: str
    step: int
    arrays: list[np.ndarray] = field(default_factory=list)
    meta: dict = field(default_factory=dict)


def _short(x: Any) -> str:
    """repr() capped in length, so error messages stay readable for hostile input."""
    return reprlib.repr(x)


def _is_int(x: Any) -> bool:
    """msgpack booleans decode to bool, a subclass of int; they are not ints here."""
    return isinstance(x, int) and not isinstance(x, bool)


def _check_meta(value: Any, depth: int = 0) -> None:
    """Keep meta to plain msgpack data, so both sides see the same thing."""
    if depth > _MAX_META_DEPTH:
        raise WireError(f"meta nested deeper than {_MAX_META_DEPTH} levels")
    if isinstance(value, msgpack.ExtType):  # a tuple, but packed as an ext type
        raise WireError("meta must not contain msgpack ext types")
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise WireError(f"meta key {_short(k)} is not a str")
            _check_meta(v, depth + 1)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _check_meta(v, depth + 1)
    elif not isinstance(value, _META_SCALARS):
        raise WireError(f"meta value of type {type(value).__name__} is not allowed")


def _byte_view(frame: Any) -> memoryview:
    """Accept zmq.Frame, bytes, bytearray, memoryview or ndarray as a flat byte buffer."""
    try:
        view = memoryview(frame)
        if view.ndim != 1 or view.format != "B":
            view = view.cast("B")
    except TypeError as exc:
        raise WireError(f"frame of type {type(frame).__name__} is not a contiguous buffer") from exc
    return view


def encode(
    run_id: str,
    kind: str,
    step: int = -1,
    arrays: Iterable[np.ndarray] = (),
    meta: dict | None = None,
) -> list:
    """Build the frames of one message, ready for ``send_multipart``.

    Array frames are memoryviews of the (C-contiguous) arrays, not copies.
    Raises ``WireError`` if the message would be rejected by a receiver
    using the default limits.
    """
    if not isinstance(run_id, str):
        raise WireError(f"run id must be a str, got {type(run_id).__name__}")
    if kind not in KINDS:
        raise WireError(f"unknown kind {_short(kind)}")
    if not _is_int(step):
        raise WireError(f"step must be an int, got {type(step).__name__}")
    meta = {} if meta is None else meta
    if not isinstance(meta, dict):
        raise WireError(f"meta must be a dict, got {type(meta).__name__}")
    _check_meta(meta)

    specs, frames = [], []
    for a in arrays:
        if not isinstance(a, np.ndarray):
            raise WireError(f"expected a numpy array, got {type(a).__name__}")
        if a.dtype.str not in ALLOWED_DTYPES:
            raise WireError(f"dtype {a.dtype.str!r} not in {sorted(ALLOWED_DTYPES)}")
        if a.ndim > _MAX_NDIM:
            raise WireError(f"array has {a.ndim} dimensions, at most {_MAX_NDIM} allowed")
        if a.nbytes > DEFAULT_MAX_ARRAY_BYTES:
            raise WireError(f"array of {a.nbytes} bytes exceeds {DEFAULT_MAX_ARRAY_BYTES}")
        if not a.flags.c_contiguous:
            a = np.ascontiguousarray(a)
        specs.append([a.dtype.str, list(a.shape)])
        frames.append(memoryview(a.reshape(-1).view(np.uint8)))

    header = {"v": PROTOCOL_VERSION, "run": run_id, "kind": kind,
              "step": step, "meta": meta, "arrays": specs}
    try:
        packed = msgpack.packb(header, use_bin_type=True)
    except Exception as exc:  # e.g. an int too large for msgpack
        raise WireError(f"cannot pack header: {exc}") from exc
    if len(packed) > DEFAULT_MAX_HEADER:
        raise WireError(f"header of {len(packed)} bytes exceeds {DEFAULT_MAX_HEADER}")
    return [packed, *frames]


def _unpack_header(frame: Any, max_header: int) -> dict:
    """Unpack frame 0 with msgpack limits tied to its size, so it cannot balloon."""
    buf = _byte_view(frame)
    if len(buf) > max_header:
        raise WireError(f"header of {len(buf)} bytes exceeds {max_header}")
    try:
        header = msgpack.unpackb(
            buf, raw=False, strict_map_key=True, use_list=True,
            max_str_len=max_header, max_bin_len=max_header,
            max_array_len=max_header, max_map_len=max_header, max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises many types; all mean "malformed"
        raise WireError(f"header is not valid msgpack: {type(exc).__name__}: {exc}") from exc
    if not isinstance(header, dict):
        raise WireError(f"header is a {type(header).__name__}, not a map")
    keys = set(header)
    if keys != _HEADER_KEYS:
        missing, extra = _HEADER_KEYS - keys, keys - _HEADER_KEYS
        raise WireError(f"header keys wrong: missing {sorted(missing)}, unexpected {sorted(map(repr, extra))}")
    return header


def _decode_array(spec: Any, frame: Any, index: int, max_array_bytes: int) -> np.ndarray:
    """Check one ``[dtype, shape]`` spec against its frame and view the frame as an array."""
    if not (isinstance(spec, list) and len(spec) == 2):
        raise WireError(f"array {index}: spec must be [dtype, shape], got {_short(spec)}")
    dtype_str, shape = spec
    if not (isinstance(dtype_str, str) and dtype_str in ALLOWED_DTYPES):
        raise WireError(f"array {index}: dtype {_short(dtype_str)} not in {sorted(ALLOWED_DTYPES)}")
    if not (isinstance(shape, list) and len(shape) <= _MAX_NDIM):
        raise WireError(f"array {index}: shape must be a list of at most {_MAX_NDIM} dims, got {_short(shape)}")
    if not all(_is_int(d) and d >= 0 for d in shape):
        raise WireError(f"array {index}: shape {_short(shape)} must hold non-negative ints")
    dtype = np.dtype(dtype_str)
    nbytes = math.prod(shape) * dtype.itemsize  # Python ints: no overflow
    if nbytes > max_array_bytes:
        raise WireError(f"array {index}: {nbytes} bytes exceeds {max_array_bytes}")
    buf = _byte_view(frame)
    if len(buf) != nbytes:
        raise WireError(f"array {index}: frame has {len(buf)} bytes, {dtype_str} {shape} needs {nbytes}")
    arr = np.frombuffer(buf, dtype=dtype).reshape(shape)
    if not arr.flags.aligned:
        arr = arr.copy()
    arr.flags.writeable = False
    return arr


def decode(
    frames: Sequence[Any],
    run_id: str,
    *,
    max_header: int = DEFAULT_MAX_HEADER,
    max_array_bytes: int = DEFAULT_MAX_ARRAY_BYTES,
    kinds: frozenset[str] | set[str] = KINDS,
) -> Message:
    """Validate a received multipart message and return it; ``WireError`` if malformed."""
    try:
        frames = list(frames)
    except TypeError as exc:
        raise WireError("frames must be a sequence") from exc
    if not frames:
        raise WireError("message has no frames")
    header = _unpack_header(frames[0], max_header)

    version, run, kind, step = header["v"], header["run"], header["kind"], header["step"]
    meta, specs = header["meta"], header["arrays"]
    if not _is_int(version):
        raise WireError(f"'v' must be an int, got {_short(version)}")
    if version != PROTOCOL_VERSION:
        raise WireError(f"protocol version {version}, expected {PROTOCOL_VERSION}")
    if not isinstance(run, str):
        raise WireError(f"'run' must be a str, got {_short(run)}")
    if run != run_id:
        raise WireError(f"message from run {_short(run)}, expected {run_id!r}")
    if not isinstance(kind, str) or kind not in kinds:
        raise WireError(f"unknown kind {_short(kind)}")
    if not _is_int(step):
        raise WireError(f"'step' must be an int, got {_short(step)}")
    if not isinstance(meta, dict):
        raise WireError(f"'meta' must be a map, got {type(meta).__name__}")
    _check_meta(meta)
    if not isinstance(specs, list):
        raise WireError(f"'arrays' must be a list, got {type(specs).__name__}")
    if len(specs) != len(frames) - 1:
        raise WireError(f"header lists {len(specs)} arrays but message has {len(frames) - 1} array frames")

    arrays = [_decode_array(s, f, i, max_array_bytes)
              for i, (s, f) in enumerate(zip(specs, frames[1:]))]
    return Message(kind=kind, step=step, arrays=arrays, meta=meta)


def send(
    sock: zmq.Socket,
    run_id: str,
    kind: str,
    step: int = -1,
    arrays: Iterable[np.ndarray] = (),
    meta: dict | None = None,
    *,
    flags: int = 0,
) -> None:
    """Encode and send one message; large array frames go zero-copy (see module docs).

    With ``flags=zmq.NOBLOCK`` a full queue raises ``zmq.Again`` and nothing is sent.
    """
    frames = encode(run_id, kind, step, arrays, meta)
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        more = zmq.SNDMORE if i < last else 0
        sock.send(frame, flags | more, copy=len(frame) <= ZERO_COPY_THRESHOLD)


def recv(sock: zmq.Socket, run_id: str, timeout_ms: int, **limits: Any) -> Message | None:
    """Wait up to ``timeout_ms`` for one message: None on timeout, ``WireError`` if malformed.

    A malformed message is consumed either way, so one bad peer cannot wedge
    the receiver. ``limits`` are passed to ``decode``. A negative timeout
    waits forever.
    """
    frames = recv_frames(sock, timeout_ms)
    return None if frames is None else decode(frames, run_id, **limits)


def recv_frames(sock: zmq.Socket, timeout_ms: int) -> list | None:
    """Wait up to ``timeout_ms`` for one message's frames, not yet decoded; None on timeout.

    The frames are ``zmq.Frame`` objects, so ``frame.get("User-Id")`` tells which key the
    sender's connection authenticated with (CURVE, ``runtime/security.py``).
    """
    if not sock.poll(timeout_ms, zmq.POLLIN):
        return None
    return sock.recv_multipart(zmq.NOBLOCK, copy=False)


def make_context() -> zmq.Context:
    """A fresh context; make one per process, after forking, never inherit one."""
    return zmq.Context()


def socket(
    ctx: zmq.Context,
    kind: int,
    *,
    hwm: int = 1000,
    max_msg_bytes: int | None = None,
    linger: int = 0,
) -> zmq.Socket:
    """A socket that never blocks shutdown (linger) and queues at most ``hwm`` messages.

    ``max_msg_bytes`` sets ZMQ_MAXMSGSIZE on sockets that receive: ZeroMQ
    then drops a peer that sends a larger *frame* before it is buffered, so
    pass at least ``max(max_header, max_array_bytes)``.
    """
    sock = ctx.socket(kind)
    try:
        sock.setsockopt(zmq.LINGER, linger)
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.RCVHWM, hwm)
        if max_msg_bytes is not None and kind in _RECEIVING:
            sock.setsockopt(zmq.MAXMSGSIZE, max_msg_bytes)
    except BaseException:
        sock.close(linger=0)
        raise
    return sock


def close_all(ctx: zmq.Context, sockets: Iterable[zmq.Socket]) -> None:
    """Close the sockets and terminate the context without waiting; safe to call twice.

    Sockets of ``ctx`` missing from ``sockets`` are closed too, because
    ``term`` would otherwise hang on them. Call it from the thread that
    uses the sockets.
    """
    for sock in sockets:
        if not sock.closed:
            sock.close(linger=0)
    ctx.destroy(linger=0)


def free_tcp_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports that were free a moment ago. Every probe stays bound until all are
    chosen: closed one by one, the kernel may hand the same port out twice (seen here in about
    3 runs in 1000 for 7 ports), and the second process to bind it fails."""
    probes = []
    try:
        for _ in range(n):
            s = _stdsocket.socket(_stdsocket.AF_INET, _stdsocket.SOCK_STREAM)
            probes.append(s)
            s.bind((host, 0))
        return [s.getsockname()[1] for s in probes]
    finally:
        for s in probes:
            s.close()


def ipc_endpoint(directory: str | os.PathLike, name: str) -> str:
    """``ipc://`` endpoint for ``directory/name``; fails early on paths the OS would truncate."""
    path = os.path.abspath(os.path.join(directory, name))
    size = len(os.fsencode(path))
    if size > _IPC_PATH_MAX:
        raise ValueError(
            f"ipc socket path is {size} bytes, the limit here is {_IPC_PATH_MAX}: {path!r}; "
            "use a shorter directory (e.g. under /tmp) or name"
        )
    return "ipc://" + path


def endpoint_path(endpoint: str) -> str | None:
    """Filesystem path behind an ``ipc://`` endpoint (to remove it at exit), else None."""
    if not endpoint.startswith("ipc://"):
        return None
    path = endpoint[len("ipc://"):]
    if not path or path.startswith("@") or path == "*":  # abstract namespace or wildcard
        return None
    return path
