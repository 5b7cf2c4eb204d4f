"""Consistent snapshots of a whole pipeline, and finding the newest good one to resume from.

A checkpoint is a folder `RUN_DIR/checkpoints/step-<N>/` holding one file per stage
(`stage-K.npz`: weights, bias, generator, counters), the coordinator's state
(`coordinator.json`: data position, history so far) and, written last, `manifest.json` with the
sha256 of every other file. Every file is written atomically (temporary file, fsync, rename),
so a folder without a manifest is an unfinished checkpoint and a file whose hash differs from
the manifest is a damaged one; both are refused, and the previous checkpoint is used instead.
Once no process of the run is left, unfinished ones are removed (`discard_unfinished`).

The coordinator takes a checkpoint only when no batch is in flight, so in lockstep modes the
snapshot is exactly the state an uninterrupted run has at that step. In dni/cdni, each stage
first takes in the generator targets still on their way, and counts in its file any that do
not come (`stage_snapshot.py`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import zipfile

import numpy as np

from dni_async import report
from dni_async.report import TEMPORARY

MANIFEST = "manifest.json"
BLOCK = 8 << 20          # bytes hashed, or written and fsynced, before a pause
REFUSED = ".refused"     # a checkpoint that failed verification, set aside for inspection


class CheckpointError(RuntimeError):
    pass


def folder(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, "checkpoints", f"step-{step:09d}")


def sha256_file(path: str, between=None) -> str:
    with open(path, "rb") as fh:
        return _sha256(fh, between)


def _sha256(fh, between=None) -> str:
    """sha256 of the rest of an open file, read in blocks; `between()` after each block."""
    h = hashlib.sha256()
    for block in iter(lambda: fh.read(BLOCK), b""):
        h.update(block)
        if between is not None:
            between()
    return h.hexdigest()


def save_arrays(path: str, arrays: dict, between=None) -> str:
    """Write an npz, as np.savez does, atomically; returns the sha256 of the bytes written.

    A wide layer's snapshot is hundreds of megabytes, so the writing is done in pieces with
    `between()` after each (a stage sends its heartbeats there): BLOCK bytes written and
    fsynced, a BLOCK of hashing."""
    with report.atomic_file(path) as fh:
        paced = _Paced(fh, between)
        with zipfile.ZipFile(fh, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, value in arrays.items():
                with zf.open(name + ".npy", "w", force_zip64=True) as paced.member:
                    np.lib.format.write_array(paced, np.asanyarray(value), allow_pickle=False)
        fh.flush()
        fh.seek(0)
        return _sha256(fh, between)


class _Paced:
    """Where `np.lib.format.write_array` writes an array (into a zip `member` of the file
    `fh`): after every BLOCK bytes the file so far goes to disk and `between()` runs, so that
    no piece of a large write, its fsync included, is long."""

    def __init__(self, fh, between):
        self.fh, self.between, self.member, self.unsynced = fh, between, None, 0

    def write(self, data) -> None:
        data = memoryview(data).cast("B")
        for i in range(0, len(data), BLOCK):
            piece = data[i:i + BLOCK]
            self.member.write(piece)
            self.unsynced += len(piece)
            if self.unsynced >= BLOCK:
                self.fh.flush()
                os.fsync(self.fh.fileno())
                self.unsynced = 0
                if self.between is not None:
                    self.between()


def write_stage(run_dir: str, step: int, rank: int, arrays: dict, between=None) -> dict:
    """One stage's file of the checkpoint of `step`, in that step's folder under the stage's
    own run folder; returns what its confirmation says (raises OSError): the file, its sha256,
    and the bytes and seconds the write took, from which the coordinator learns the disk's
    speed."""
    where = folder(run_dir, step)
    os.makedirs(where, exist_ok=True)
    name = f"stage-{rank}.npz"
    path, t0 = os.path.join(where, name), time.perf_counter()
    digest = save_arrays(path, arrays, between)
    return {"file": name, "sha256": digest, "dir": where, "bytes": os.path.getsize(path),
            "seconds": time.perf_counter() - t0}


def snapshot_bytes(model) -> int:
    """The bytes of a stage's checkpoint arrays, counted without copying them: what the
    coordinator's deadline for writing them grows with."""
    return int(sum(a.nbytes for a in model.snapshot(copy=False).values()))


def load_arrays(path: str) -> dict:
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def write_manifest(ckpt_dir: str, step: int, files: dict) -> None:
    """The last write of a checkpoint: from here on it counts."""
    body = json.dumps({"step": step, "files": files}, indent=2).encode()
    report.atomic_write(os.path.join(ckpt_dir, MANIFEST), body)


def verify(ckpt_dir: str, between=None) -> dict:
    """The manifest of a complete, undamaged checkpoint, or CheckpointError saying what is wrong.
    `between()` runs between blocks of hashing."""
    path = os.path.join(ckpt_dir, MANIFEST)
    try:
        with open(path) as fh:
            manifest = json.load(fh)
        files = manifest["files"]
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt_dir} is unfinished (no manifest)") from None
    except (OSError, ValueError, KeyError, TypeError):
        raise CheckpointError(f"{ckpt_dir}: manifest is damaged") from None
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise CheckpointError(f"{ckpt_dir}: manifest is damaged")
    for name, digest in files.items():
        p = os.path.join(ckpt_dir, name)
        if not os.path.exists(p):
            raise CheckpointError(f"{ckpt_dir}: {name} is missing")
        if sha256_file(p, between) != digest:
            raise CheckpointError(f"{ckpt_dir}: {name} is damaged (sha256 differs from the manifest)")
    return manifest


def candidates(run_dir: str) -> list:
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    return sorted((os.path.join(root, d) for d in os.listdir(root)
                   if d.startswith("step-") and not d.endswith(REFUSED)), reverse=True)


def latest_good(run_dir: str, log=print) -> str:
    """The newest checkpoint that verifies; says why any newer one was refused."""
    for ckpt in candidates(run_dir):
        try:
            verify(ckpt)
            return ckpt
        except CheckpointError as exc:
            if log:
                log(f"dni-async: refusing checkpoint: {exc}; trying the previous one")
            try:   # set aside, so that pruning never keeps it in place of a good one
                os.replace(ckpt, ckpt + REFUSED)
            except OSError:
                pass
    raise CheckpointError(f"no usable checkpoint in {run_dir}")


def discard_unfinished(run_dir: str) -> list:
    """Remove what writers killed mid-way left: checkpoint folders without a manifest and the
    temporary files of atomic writes (`.tmp-*`). Call only when no process of the run is left
    to finish them. Returns what was removed, relative to the run folder."""
    removed = []
    for ckpt in candidates(run_dir):
        if not os.path.exists(os.path.join(ckpt, MANIFEST)):
            shutil.rmtree(ckpt, ignore_errors=True)
            removed.append(ckpt)
    for folder, _, files in os.walk(run_dir):
        for name in files:
            if name.startswith(TEMPORARY):
                try:
                    os.unlink(os.path.join(folder, name))
                    removed.append(os.path.join(folder, name))
                except OSError:
                    pass
    return [os.path.relpath(p, run_dir) for p in removed]


def prune(run_dir: str, keep: int, just_written: str, between=None) -> None:
    """Keep the newest `keep` checkpoints that verify, always including the one just written.
    `between()` runs between blocks of hashing (the coordinator keeps its heartbeats going)."""
    good = []
    for c in candidates(run_dir):
        try:
            verify(c, between)
            good.append(c)
        except CheckpointError:
            pass
    keepers = set(good[:keep]) | {just_written}
    for old in good:
        if old not in keepers:
            shutil.rmtree(old, ignore_errors=True)
