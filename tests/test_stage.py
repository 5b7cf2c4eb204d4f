"""One stage's loop, in this process, with the test playing the coordinator and the neighbours:
what it handles after its final report, and what its checkpoint counts."""

import os
import shutil
import time

import numpy as np
import pytest
import zmq

from dni_async.config import make_config
from dni_async.runtime import checkpoint, supervisor, wire
from dni_async.runtime.stage import Stage


class Peers:
    """The sockets around stage `rank`: the coordinator's control and results, the upstream
    feed, and whatever the stage sends downstream and upstream."""

    def __init__(self, ctx, spec, rank):
        ep, n = spec.endpoints, spec.config.n_stages
        self.spec, self.rank = spec, rank
        self.control = ctx.socket(zmq.ROUTER)
        self.control.bind(ep["control"])
        self.results = ctx.socket(zmq.PULL)
        self.results.bind(ep["results"])
        self.feed = ctx.socket(zmq.PUSH)
        self.feed.connect(ep["fwd_in"][rank])
        self.grads = ctx.socket(zmq.PUSH)            # as stage rank+1 would send them
        if rank < n - 1:
            self.grads.connect(ep["grad_in"][rank])
        self.upstream = ctx.socket(zmq.PULL)         # stage rank-1's grad_in
        if rank > 0:
            self.upstream.bind(ep["grad_in"][rank - 1])
        self.downstream = ctx.socket(zmq.PULL)       # stage rank+1's fwd_in
        if rank < n - 1:
            self.downstream.bind(ep["fwd_in"][rank + 1])

    def to_stage(self, kind, meta=None):
        frames = wire.encode(self.spec.run_id, kind, -1, (), meta)
        self.control.send_multipart([f"stage-{self.rank}".encode(), *frames])

    def from_stage(self, timeout_ms=3000):
        """The stage's next control message other than a heartbeat (long work beats)."""
        while True:
            assert self.control.poll(timeout_ms), "the stage said nothing"
            msg = wire.decode(self.control.recv_multipart()[1:], self.spec.run_id)
            if msg.kind != "heartbeat":
                return msg


def arrays(cfg, rank, rows=None):
    rows = rows or cfg.batch_size
    rng = np.random.default_rng(0)
    return [rng.standard_normal((rows, cfg.widths[rank])),
            np.eye(cfg.output_dim)[rng.integers(0, cfg.output_dim, rows)]]


@pytest.fixture
def stage_and_peers(tmp_path, zmq_ctx):
    made = []

    def make(mode, rank):
        cfg = make_config({"mode": mode}, preset="tiny")
        spec, ipc_dir = supervisor.prepare(cfg, str(tmp_path))
        peers = Peers(zmq_ctx, spec, rank)
        stage = Stage(spec, rank)
        made.append((stage, ipc_dir))
        stage.links.send(stage.links.control, "hello", meta={"rank": rank})
        assert peers.from_stage().kind == "hello"      # connected both ways
        stage.heard, stage.next_beat = time.monotonic(), float("inf")
        return stage, peers, spec.config

    yield make
    for stage, ipc_dir in made:
        stage.close()
        shutil.rmtree(ipc_dir, ignore_errors=True)


def both_waiting(*socks):
    deadline = time.monotonic() + 5
    while not all(s.poll(0) for s in socks):
        assert time.monotonic() < deadline, "messages did not arrive"
        time.sleep(0.01)


def test_a_stage_handles_no_data_after_its_final_report(stage_and_peers):
    stage, peers, cfg = stage_and_peers("backprop", 2)      # the last stage: a batch = a loss
    wire.send(peers.feed, peers.spec.run_id, "fwd", 0, arrays(cfg, 2))
    peers.to_stage("stop")
    both_waiting(stage.links.control, stage.links.fwd_in)   # one wake-up finds both
    stage._pump(1.0)
    stats = peers.from_stage()
    assert stats.kind == "stats" and stats.meta["batches"] == 0
    assert stage.stopping and stage.batches == 0
    assert not peers.results.poll(300) and not peers.upstream.poll(0)   # no loss, no gradient


def test_a_checkpoint_takes_in_the_targets_on_the_way_and_counts_the_rest(stage_and_peers,
                                                                          tmp_path):
    stage, peers, cfg = stage_and_peers("cdni", 1)
    for step in (0, 1):
        wire.send(peers.feed, peers.spec.run_id, "fwd", step, arrays(cfg, 1))
        both_waiting(stage.links.fwd_in)
        stage._pump(1.0)
    assert list(stage.model.pending) == [0, 1]
    for _ in (0, 1):        # it sent both on, and a target upstream for each
        assert peers.downstream.poll(1000) and peers.upstream.poll(1000)
        peers.downstream.recv_multipart(), peers.upstream.recv_multipart()
    # step 0's target is on its way when the checkpoint is asked for; step 1's never comes
    peers.to_stage("checkpoint", {"step": 2})
    wire.send(peers.grads, peers.spec.run_id, "grad", 0, arrays(cfg, 2)[:1])
    both_waiting(stage.links.control)
    stage._pump(1.0)
    ack = peers.from_stage()
    assert ack.kind == "ack", ack.meta
    saved = checkpoint.load_arrays(os.path.join(checkpoint.folder(str(tmp_path), 2),
                                                "stage-1.npz"))
    assert int(saved["counter_targets_applied"]) == 1
    assert int(saved["counter_targets_missing"]) == 1
    # the live run still waits for it, and does not count it missing
    assert list(stage.model.pending) == [1] and stage.model.counters["targets_missing"] == 0
