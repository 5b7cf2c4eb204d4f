"""Consistent snapshots of a whole pipeline, and finding the newest good one to resume from.

A checkpoint is a folder `RUN_DIR/checkpoints/step-<N>/` holding one file per stage
(`stage-K.npz`: weights, bias, generator, counters), the coordinator's state
(`coordinator.json`: data position, history so far) and, written last, `manifest.json` with the
sha256 of every other file. Every file is written atomically (temporary file, fsync, rename),
so a folder without a manifest is an unfinished checkpoint and a file whose hash differs from
the manifest is a damaged one; both are refused, and the previous checkpoint is used instead.
Once no process of the run is left, unfinished ones are removed (`discard_unfinished`).

The coordinator takes a checkpoint only when no batch is in flight, so in lockstep modes the
snapshot is exactly the state an uninterrupted run has at that step. In dni/cdni, generator
targets still on the wire at that moment are not part of it (they are dropped on resume).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil

import numpy as np

from dni_async.report import TEMPORARY, atomic_write

MANIFEST = "manifest.json"
REFUSED = ".refused"     # a checkpoint that failed verification, set aside for inspection


class CheckpointError(RuntimeError):
    pass


def folder(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, "checkpoints", f"step-{step:09d}")


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_arrays(path: str, arrays: dict) -> str:
    """Write an npz atomically; returns its sha256."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    data = buf.getvalue()
    atomic_write(path, data)
    return hashlib.sha256(data).hexdigest()


def load_arrays(path: str) -> dict:
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def write_manifest(ckpt_dir: str, step: int, files: dict) -> None:
    """The last write of a checkpoint: from here on it counts."""
    body = json.dumps({"step": step, "files": files}, indent=2).encode()
    atomic_write(os.path.join(ckpt_dir, MANIFEST), body)


def verify(ckpt_dir: str) -> dict:
    """The manifest of a complete, undamaged checkpoint, or CheckpointError saying what is wrong."""
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
        if sha256_file(p) != digest:
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


def prune(run_dir: str, keep: int, just_written: str) -> None:
    """Keep the newest `keep` checkpoints that verify, always including the one just written."""
    good = []
    for c in candidates(run_dir):
        try:
            verify(c)
            good.append(c)
        except CheckpointError:
            pass
    keepers = set(good[:keep]) | {just_written}
    for old in good:
        if old not in keepers:
            shutil.rmtree(old, ignore_errors=True)
