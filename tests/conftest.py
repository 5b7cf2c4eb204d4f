"""Shared test helpers: find processes by their command line, run the CLI with a time bound."""

import faulthandler
import os
import subprocess
import sys
import time

import pytest
import zmq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session):
    """The session's last minute: if the process has not exited a minute after the tests end
    (say, a garbage-collected ZeroMQ context waiting on a peer that has gone), print every
    thread's stack and exit with status 1, rather than hang a CI job until its limit. Armed
    only when pytest owns the process, never under pytest.main() inside a longer-lived one."""
    launcher = os.path.normpath(sys.argv[0])
    if (os.path.basename(launcher) in ("pytest", "py.test")
            or launcher.endswith(os.path.join("pytest", "__main__.py"))):
        faulthandler.dump_traceback_later(60, exit=True, file=sys.__stderr__)


def need(ok: bool, why: str) -> None:
    """Skip a test whose machine lacks something (root, a tool), with the reason; but when the
    environment variable CI is set, the machine was set up for it: fail instead of skipping."""
    if ok:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI is set, so this test must run, but {why}", pytrace=False)
    pytest.skip(why)


def procs_mentioning(text: str) -> list:
    """PIDs of live processes whose command line contains `text` (e.g. a run folder)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{pid}/stat") as fh:
                state = fh.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmd and state != "Z":
            found.append(int(pid))
    return found


def wait_gone(text: str, timeout: float) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = procs_mentioning(text)
        if not left:
            return []
        time.sleep(0.05)
    return procs_mentioning(text)


def wait_for_spec(run_dir, proc, settle: float = 1.0) -> dict:
    """A started run's config.json (endpoints, run id), once every process had time to bind."""
    import json
    deadline = time.monotonic() + 30
    while not (run_dir / "config.json").exists():
        assert time.monotonic() < deadline and proc.poll() is None, "the run did not start"
        time.sleep(0.05)
    time.sleep(settle)
    return json.loads((run_dir / "config.json").read_text())


def sent_while_running(proc) -> None:
    """Counting every message is a fair claim for messages sent while the run is reading them.
    A test's sockets then stay connected until the run has ended: ZeroMQ gives no receipt, and
    what a peer that has gone leaves unread beyond the receiver's queue (1000 messages) is lost
    with its connection (libzmq issue #160)."""
    if proc.poll() is not None:
        _, said = proc.communicate(timeout=30)
        raise AssertionError(f"the run ended (status {proc.returncode}) before the test had "
                             f"sent its messages; it said:\n{said}")


def summary_after_the_run(proc, run_dir) -> dict:
    """Once a test has sent everything into a live run: the run ends in order, and its summary
    says what it counted."""
    import json
    sent_while_running(proc)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return json.loads((run_dir / "summary.json").read_text())


def end_run(proc) -> None:
    """After a test that started `train`: nothing left running, whatever the test asserted."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture
def zmq_ctx():
    """A ZeroMQ context for a test's own sockets, destroyed at teardown even when the test fails.
    Its sockets default to linger 0: a context left to the garbage collector with messages queued
    for a peer that has gone would otherwise block forever in zmq_ctx_term (the default linger is
    infinite), and hang pytest after its summary."""
    ctx = zmq.Context()
    ctx.setsockopt(zmq.LINGER, 0)
    yield ctx
    ctx.destroy(linger=0)


def cli(*args, timeout=120, env=None, **kw) -> subprocess.CompletedProcess:
    """Run `python -m dni_async ARGS` to completion within `timeout` seconds."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "dni_async", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=full_env, **kw)


@pytest.fixture
def no_leftovers(tmp_path):
    """A run folder; after the test, no process may still mention it."""
    yield tmp_path
    left = wait_gone(str(tmp_path), 5.0)
    for pid in left:
        try:
            os.kill(pid, 9)
        except OSError:
            pass
    assert not left, f"processes left behind: {left}"
    remove_ipc_folder(tmp_path)


def remove_ipc_folder(run_dir) -> None:
    """Tests that SIGKILL every process leave the run's ipc folder: nobody was left to remove
    it. Graceful runs remove it themselves (test_pipeline checks that)."""
    import json
    import shutil
    try:
        spec = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return
    for ep in spec.get("endpoints", {}).get("fwd_in", []):
        if ep.startswith("ipc://"):
            shutil.rmtree(os.path.dirname(ep[len("ipc://"):]), ignore_errors=True)
