"""Processes started by hand from one config that names every host: on loopback addresses of
their own, and, where the machine allows it, each in its own network namespace."""

import json
import os
import random
import shutil
import subprocess
import sys
import time

import pytest

from conftest import ROOT, cli, need
from dni_async.oneprocess import reference
from dni_async.config import make_config
from dni_async.runtime import checkpoint

SETTINGS = {"mode": "backprop", "epochs": 30, "preset": "tiny"}


def plan(run_dir, coordinator_host, stage_hosts, extra=()):
    for _ in range(5):
        base = random.randint(20000, 60000)
        r = cli("plan", "--preset", "tiny", "--mode", "backprop", "--epochs", SETTINGS["epochs"],
                "--transport", "tcp", "--run-dir", run_dir,
                "--set", f"coordinator_host={coordinator_host}",
                "--set", f"stage_hosts={','.join(stage_hosts)}", "--set", f"base_port={base}",
                *extra)
        if r.returncode == 0:
            return os.path.join(run_dir, "config.json")
        assert "in use" in r.stderr, r.stderr
    raise AssertionError("no free port range")


def start_all(path, n, wrap=lambda who: []):
    py = [sys.executable, "-m", "dni_async"]
    stages = [subprocess.Popen([*wrap(f"s{k}"), *py, "stage", path, "--rank", str(k)], cwd=ROOT,
                               stderr=subprocess.PIPE, text=True) for k in range(n)]
    coord = subprocess.Popen([*wrap("c"), *py, "coordinator", path], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return coord, stages


def end_all(procs):
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def wait_for_checkpoints(run_dir, coord, n: int) -> None:
    """Until the run has `n` checkpoints, the newest finished (its manifest written)."""
    deadline = time.monotonic() + 60
    while len(checkpoint.candidates(str(run_dir))) < n or not os.path.exists(
            os.path.join(checkpoint.candidates(str(run_dir))[0], checkpoint.MANIFEST)):
        assert time.monotonic() < deadline and coord.poll() is None, "no checkpoints"
        time.sleep(0.05)


def run_and_compare(path, run_dir, wrap=lambda who: []) -> None:
    """Start every process by hand, wait for all to end well, compare with the reference."""
    coord, stages = start_all(path, 3, wrap)
    try:
        assert coord.wait(timeout=120) == 0, coord.stderr.read()
        assert all(s.wait(timeout=10) == 0 for s in stages)
    finally:
        end_all([coord, *stages])
    got = json.loads((run_dir / "summary.json").read_text())
    want = reference.train(make_config({k: v for k, v in SETTINGS.items() if k != "preset"},
                                       preset="tiny"), log=None)
    assert got["weights_sha256"] == want["weights_sha256"]


def test_tcp_beyond_loopback_without_keys_is_refused(tmp_path):
    r = cli("plan", "--transport", "tcp", "--run-dir", tmp_path, "--set", "coordinator_host=10.1.2.3",
            "--set", "stage_hosts=10.1.2.4,10.1.2.5,10.1.2.6", "--set", "base_port=40000")
    assert r.returncode == 2 and "reaches beyond this machine" in r.stderr, r.stderr


def test_every_process_on_its_own_loopback_address(tmp_path):
    path = plan(tmp_path, "127.0.0.1", ["127.0.0.2", "127.0.0.3", "127.0.0.4"])
    spec = json.loads(open(path).read())
    assert spec["endpoints"]["fwd_in"][2].startswith("tcp://127.0.0.4:")
    run_and_compare(path, tmp_path)


# -- network namespaces: one per process, joined by a bridge ---------------------------------

NS = ["dnic", "dni0", "dni1", "dni2"]
ADDR = {"dnic": "10.77.0.1", "dni0": "10.77.0.2", "dni1": "10.77.0.3", "dni2": "10.77.0.4"}


def sh(*cmd):
    return subprocess.run(cmd, capture_output=True, text=True)


def netns_teardown():
    for ns in NS:
        sh("ip", "netns", "del", ns)
        sh("ip", "link", "del", f"v{ns}")
    sh("ip", "link", "del", "dnibr")


@pytest.fixture
def namespaces():
    need(shutil.which("ip") is not None and os.geteuid() == 0,
         "needs iproute2 and root to make network namespaces")
    netns_teardown()
    ok = sh("ip", "link", "add", "dnibr", "type", "bridge").returncode == 0
    ok = ok and sh("ip", "link", "set", "dnibr", "up").returncode == 0
    for ns in NS:
        if not ok:
            break
        steps = [("ip", "netns", "add", ns),
                 ("ip", "link", "add", f"v{ns}", "type", "veth", "peer", "name", "eth0", "netns", ns),
                 ("ip", "link", "set", f"v{ns}", "master", "dnibr"),
                 ("ip", "link", "set", f"v{ns}", "up"),
                 ("ip", "netns", "exec", ns, "ip", "addr", "add", f"{ADDR[ns]}/24", "dev", "eth0"),
                 ("ip", "netns", "exec", ns, "ip", "link", "set", "eth0", "up"),
                 ("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")]
        ok = all(sh(*c).returncode == 0 for c in steps)
    if not ok:
        netns_teardown()
        need(False, "this machine does not permit network namespaces with a bridge")
    yield lambda who: ["ip", "netns", "exec", {"c": "dnic", "s0": "dni0", "s1": "dni1",
                                               "s2": "dni2"}[who]]
    netns_teardown()


def test_pipeline_across_network_namespaces(tmp_path, namespaces):
    """Beyond loopback a run needs CURVE keys (or an explicit allow_insecure): use them."""
    keys = tmp_path / "keys"
    assert cli("keys", keys, "--stages", 3).returncode == 0
    path = plan(tmp_path, ADDR["dnic"], [ADDR["dni0"], ADDR["dni1"], ADDR["dni2"]],
                extra=["--set", f"curve_keys={keys}"])
    run_and_compare(path, tmp_path, namespaces)


def test_cut_link_is_detected_and_everyone_exits(tmp_path, namespaces):
    path = plan(tmp_path, ADDR["dnic"], [ADDR["dni0"], ADDR["dni1"], ADDR["dni2"]],
                extra=["--epochs", "100000", "--set", "allow_insecure=true",
                       "--checkpoint-every", "20"])
    coord, stages = start_all(path, 3, namespaces)
    try:
        # cut once the run trains (its first checkpoint): before the handshake, peers wait
        # for the start-up deadline instead
        wait_for_checkpoints(tmp_path, coord, 1)
        assert coord.poll() is None
        t0 = time.monotonic()
        assert sh("ip", "link", "set", "vdni1", "down").returncode == 0   # stage 1's cable
        rc = coord.wait(timeout=15)
        codes = [s.wait(timeout=15) for s in stages]
        took = time.monotonic() - t0
    finally:
        end_all([coord, *stages])
    err = coord.stderr.read()
    assert rc == 3 and "stage 1" in err, err
    assert codes[1] == 3            # the cut-off stage gave up on the coordinator by itself
    assert took < 10


def test_slurm_task_script_maps_ranks_to_processes(tmp_path):
    """launch/slurm-task.sh as srun would run it: SLURM_PROCID 0 is the coordinator."""
    path = plan(tmp_path, "127.0.0.1", ["127.0.0.2", "127.0.0.3", "127.0.0.4"])
    script = os.path.join(ROOT, "launch", "slurm-task.sh")
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    procs = [subprocess.Popen([script, path], cwd=ROOT, env=dict(env, SLURM_PROCID=str(r)),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for r in range(4)]
    try:
        codes = [p.wait(timeout=120) for p in procs]
    finally:
        end_all(procs)
    assert codes == [0, 0, 0, 0], [p.stderr.read() for p in procs]
    assert (tmp_path / "summary.json").exists() and (tmp_path / "stage-2.npz").exists()


def test_a_run_started_by_hand_resumes_elsewhere_from_plan_resume(tmp_path):
    """Killed after two periodic checkpoints, planned again with `plan --resume` on other
    addresses and ports (a job that starts again on other nodes), started by hand: it ends as
    the uninterrupted run does."""
    epochs = 300
    path = plan(tmp_path, "127.0.0.1", ["127.0.0.2", "127.0.0.3", "127.0.0.4"],
                extra=["--epochs", str(epochs), "--checkpoint-every", "20"])
    coord, stages = start_all(path, 3)
    try:
        wait_for_checkpoints(tmp_path, coord, 2)
    finally:
        end_all([coord, *stages])            # SIGKILL: nothing more is saved
    assert not (tmp_path / "summary.json").exists()
    for _ in range(5):
        base = random.randint(20000, 60000)
        r = cli("plan", "--resume", tmp_path, "--run-dir", tmp_path, "--transport", "tcp",
                "--set", "coordinator_host=127.0.0.5",
                "--set", "stage_hosts=127.0.0.6,127.0.0.7,127.0.0.8", "--set", f"base_port={base}")
        if r.returncode == 0 or "in use" not in r.stderr:
            break
    assert r.returncode == 0, r.stderr
    assert f"resuming {tmp_path} from {tmp_path}/checkpoints/step-" in r.stdout
    commands = [ln.split()[1:] for ln in r.stdout.splitlines() if ln.startswith("  dni-async ")]
    assert [c[0] for c in commands] == ["coordinator", "stage", "stage", "stage"]
    spec = json.loads(open(path).read())
    assert spec["endpoints"]["fwd_in"][2] == f"tcp://127.0.0.8:{base + 14}"
    assert spec["config"]["epochs"] == epochs and spec["resume_from"]
    coord, stages = start_all(path, 3)
    try:
        assert coord.wait(timeout=120) == 0, coord.stderr.read()
        assert all(s.wait(timeout=10) == 0 for s in stages)
    finally:
        end_all([coord, *stages])
    got = json.loads((tmp_path / "summary.json").read_text())
    want = reference.train(make_config({"mode": "backprop", "epochs": epochs}, preset="tiny"),
                           log=None)
    assert got["weights_sha256"] == want["weights_sha256"]
    assert [h["epoch"] for h in got["history"]] == list(range(1, epochs + 1))


@pytest.mark.parametrize("flags, needle", [
    (["--epochs", "5"], "drop --epochs"),
    (["--set", "lr=0.5"], "drop --set lr"),
    (["--run-dir", "/elsewhere"], "name different folders")])
def test_plan_resume_changes_only_where_processes_run(tmp_path, flags, needle):
    r = cli("plan", "--resume", tmp_path, *flags)
    assert r.returncode == 2 and needle in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
