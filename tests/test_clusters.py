"""The multi-host recipes, run for real on this machine.

- launch/ssh-launch.sh against OpenSSH servers: one network namespace per host, an sshd in each,
  joined by a bridge that also carries the launching host (the root namespace), CURVE keys.
  Each host also has a file system of its own where the runs go (a tmpfs in a mount namespace
  of its own), so nothing reaches a host but what the script copies there.
- launch/slurm.sbatch under Slurm: a one-node cluster of the test's own (munged, slurmctld and
  slurmd on private sockets and ports, configured by files written here), one task per process.

They need root and the Debian packages openssh-server, slurm-wlm, munge and iproute2; without
them they skip, except when CI is set (.ci/run installs them): then they fail. Every daemon,
process, namespace and link they start is ended by its id, pass or fail."""

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT, cli, need, procs_mentioning, wait_gone
from dni_async.config import make_config
from dni_async.oneprocess import reference

EPOCHS = 30
TRAIN = ["--preset", "tiny", "--mode", "backprop"]


def sh(*cmd, timeout=30):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def reference_sha() -> list:
    return reference.train(make_config({"mode": "backprop", "epochs": EPOCHS}, preset="tiny"),
                           log=None)["weights_sha256"]


def dni_command(tmp) -> dict:
    """The scripts' default is this repository's .venv/bin/dni-async (CI has it); otherwise
    the Python running the tests, through a wrapper at one path for every host."""
    if os.path.exists(os.path.join(ROOT, ".venv", "bin", "dni-async")):
        return {}
    wrapper = tmp / "dni-async"
    wrapper.write_text(f"#!/bin/sh\nPYTHONPATH={ROOT} exec {sys.executable} -m dni_async \"$@\"\n")
    wrapper.chmod(0o755)
    return {"DNI_ASYNC": str(wrapper)}


def stop(proc) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def kill_left(text: str) -> list:
    """Processes whose command line still mentions `text` after a grace period: killed, named."""
    left = wait_gone(text, 10.0)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return left


# -- ssh: one sshd per network namespace ----------------------------------------------------

HOSTS = {"coordinator": ("dnsc", "10.78.0.1"), "stage-0": ("dns0", "10.78.0.2"),
         "stage-1": ("dns1", "10.78.0.3"), "stage-2": ("dns2", "10.78.0.4")}
BRIDGE, LAUNCHER = "dnsbr", "10.78.0.254"


def ssh_teardown():
    for ns, _ in HOSTS.values():
        sh("ip", "netns", "del", ns)
        sh("ip", "link", "del", f"v{ns}")
    sh("ip", "link", "del", BRIDGE)


@pytest.fixture
def ssh_hosts(tmp_path):
    """Four 'hosts' (network namespaces) with an sshd each, reachable from this namespace as
    10.78.0.1-4, each seeing its own empty tmp_path/cluster; yields the environment that points
    ssh-launch.sh at them."""
    need(os.geteuid() == 0, "needs root to make network namespaces and run sshd")
    missing = [t for t in ("ip", "ssh", "ssh-keygen", "/usr/sbin/sshd", "unshare", "mount")
               if not shutil.which(t)]
    need(not missing, f"needs openssh-server, openssh-client and iproute2 (missing: {missing})")
    d = tmp_path / "ssh"
    d.mkdir()
    for key in ("host", "user"):
        assert sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", d / key).returncode == 0
    (d / "authorized_keys").write_text((d / "user.pub").read_text())
    addrs = ",".join(a for _, a in HOSTS.values())
    (d / "known_hosts").write_text(f"{addrs} {(d / 'host.pub').read_text()}")
    (d / "ssh_config").write_text(
        f"Host *\n  IdentityFile {d}/user\n  IdentitiesOnly yes\n"
        f"  UserKnownHostsFile {d}/known_hosts\n  StrictHostKeyChecking yes\n"
        "  ConnectTimeout 5\n  LogLevel ERROR\n")
    cluster = tmp_path / "cluster"       # here: the launching host's; each host: its own
    cluster.mkdir()
    made_privsep = not os.path.isdir("/run/sshd")    # sshd's privilege separation folder
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)

    ssh_teardown()
    daemons = []
    try:
        ok = all(sh(*c).returncode == 0 for c in [
            ("ip", "link", "add", BRIDGE, "type", "bridge"), ("ip", "link", "set", BRIDGE, "up"),
            ("ip", "addr", "add", f"{LAUNCHER}/24", "dev", BRIDGE)])
        for ns, addr in HOSTS.values():
            ok = ok and all(sh(*c).returncode == 0 for c in [
                ("ip", "netns", "add", ns),
                ("ip", "link", "add", f"v{ns}", "type", "veth", "peer", "name", "eth0", "netns", ns),
                ("ip", "link", "set", f"v{ns}", "master", BRIDGE),
                ("ip", "link", "set", f"v{ns}", "up"),
                ("ip", "netns", "exec", ns, "ip", "addr", "add", f"{addr}/24", "dev", "eth0"),
                ("ip", "netns", "exec", ns, "ip", "link", "set", "eth0", "up"),
                ("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")])
        need(ok, "this machine does not permit network namespaces with a bridge")
        for ns, addr in HOSTS.values():
            conf = d / f"sshd-{ns}.conf"
            conf.write_text(
                f"ListenAddress {addr}\nPort 22\nHostKey {d}/host\n"
                f"AuthorizedKeysFile {d}/authorized_keys\nPermitRootLogin prohibit-password\n"
                "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
                f"StrictModes no\nPidFile {d}/sshd-{ns}.pid\n")
            # -D: sshd stays in the foreground, so its pid is this Popen's (each step execs);
            # its sessions see a tmpfs of their own at tmp_path/cluster
            daemons.append(subprocess.Popen(
                ["ip", "netns", "exec", ns, "unshare", "--mount", "--propagation", "private",
                 "sh", "-c", 'mount -t tmpfs tmpfs "$0" && exec /usr/sbin/sshd -D -e -f "$1"',
                 str(cluster), str(conf)],
                stdout=subprocess.DEVNULL, stderr=open(d / f"sshd-{ns}.log", "w")))
        deadline = time.monotonic() + 20
        for _, addr in HOSTS.values():
            while True:
                try:
                    socket.create_connection((addr, 22), timeout=1).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline, (d / "sshd-dnsc.log").read_text()
                    time.sleep(0.1)
        env = {"SSH_OPTS": f"-F {d}/ssh_config", **dni_command(tmp_path)}
        yield env
    finally:
        for p in daemons:
            stop(p)
        ssh_teardown()
        if made_privsep:
            shutil.rmtree("/run/sshd", ignore_errors=True)


def on_host(env, addr, command) -> str:
    """Run a shell command on one of the hosts, over ssh; its output."""
    r = subprocess.run(["ssh", *env["SSH_OPTS"].split(), addr, command], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout


def ssh_launch(tmp_path, env, epochs):
    """Start launch/ssh-launch.sh with CURVE keys on the four hosts; output to files."""
    keys, run_dir = tmp_path / "cluster" / "keys", tmp_path / "cluster" / "run"
    assert cli("keys", keys, "--stages", 3).returncode == 0
    hosts = tmp_path / "hosts"
    # listed backwards: stages are ordered by their names, not by their lines
    hosts.write_text("# NAME ADDRESS\n\n" + "".join(f"{n}   {a}\n"
                                                    for n, (_, a) in reversed(HOSTS.items())))
    full_env = dict(os.environ, **env, CURVE_KEYS=str(keys),
                    BASE_PORT=str(random.randint(20000, 60000)))
    out, err = tmp_path / "launch.out", tmp_path / "launch.err"
    proc = subprocess.Popen(["bash", os.path.join(ROOT, "launch", "ssh-launch.sh"), str(hosts),
                             str(run_dir), *TRAIN, "--epochs", str(epochs), "--set",
                             "log_every=100"], cwd=ROOT, env=full_env,
                            stdout=open(out, "w"), stderr=open(err, "w"))
    return proc, run_dir, out, err


def wait_training(proc, out, timeout=60):
    """Until the coordinator has printed an epoch line: every process is up and training."""
    deadline = time.monotonic() + timeout
    while "epoch " not in out.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, out.read_text()
        time.sleep(0.1)


def test_ssh_launch_across_namespaces_equals_the_reference(tmp_path, ssh_hosts):
    """Four hosts, one sshd each, CURVE on every socket: the lockstep run trains, and its final
    weights are bit for bit those of the one-process reference. Each host got config.json,
    the public keys and its own secret key only, and kept its own results."""
    proc, run_dir, out, err = ssh_launch(tmp_path, ssh_hosts, EPOCHS)
    try:
        proc.wait(timeout=120)
    finally:
        stop(proc)
        left = kill_left(str(run_dir))
    assert proc.returncode == 0, err.read_text()
    assert f"epoch    {EPOCHS}/{EPOCHS}" in out.read_text(), out.read_text()
    assert not left, f"processes left behind: {left}"
    coordinator = HOSTS["coordinator"][1]
    summary = json.loads(on_host(ssh_hosts, coordinator, f"cat {run_dir}/summary.json"))
    assert summary["endpoints"]["fwd_in"][1].startswith("tcp://10.78.0.3:")   # stage 1's host
    assert summary["config"]["curve_keys"] == str(tmp_path / "cluster" / "keys")
    assert summary["weights_sha256"] == reference_sha()
    for name, (_, addr) in HOSTS.items():
        there = on_host(ssh_hosts, addr, f"cd {tmp_path}/cluster && ls run keys/private").split()
        assert f"{name}.key_secret" in there and len([f for f in there if "key_secret" in f]) == 1
        assert ("summary.json" in there) == (name == "coordinator"), (name, there)
        assert name == "coordinator" or f"{name}.npz" in there, (name, there)
    assert sorted(os.listdir(run_dir)) == ["config.json"]      # the launching host: the plan


def test_ssh_launch_names_a_killed_stage_and_stops_everyone(tmp_path, ssh_hosts):
    proc, run_dir, out, err = ssh_launch(tmp_path, ssh_hosts, 100000)
    try:
        wait_training(proc, out)
        on_host(ssh_hosts, HOSTS["stage-1"][1],
                f"kill -KILL $(cat {run_dir}/.ssh-launch/stage-1.pid)")
        t0 = time.monotonic()
        proc.wait(timeout=30)
        took = time.monotonic() - t0
    finally:
        stop(proc)
        left = kill_left(str(run_dir))
    said = err.read_text()
    assert proc.returncode == 3, said
    assert "stage 1 is unreachable" in said or "stage 1 has been silent" in said, said
    assert "ssh-launch: coordinator on 10.78.0.1 exited with status 3" in said, said
    assert took < 15 and not left, (took, left)


def test_ssh_launch_stops_every_remote_process_on_sigterm(tmp_path, ssh_hosts):
    proc, run_dir, out, err = ssh_launch(tmp_path, ssh_hosts, 100000)
    try:
        wait_training(proc, out)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    finally:
        stop(proc)
        left = kill_left(str(run_dir))
    said = err.read_text()
    assert proc.returncode == 130, said
    assert "ssh-launch: stopping every process" in said and "interrupted at step" in said, said
    on_host(ssh_hosts, HOSTS["coordinator"][1], f"test -e {run_dir}/stopped.json")
    assert not left, f"processes left behind: {left}"


# -- Slurm: a one-node cluster of the test's own --------------------------------------------

SLURM_TOOLS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue",
               "scancel", "sinfo")


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """munged, slurmctld and slurmd started here on private sockets and ports; yields the
    environment (SLURM_CONF) that sbatch, srun and scontrol need to find them."""
    need(os.geteuid() == 0, "needs root to run slurmd and munged")
    missing = [t for t in SLURM_TOOLS if not shutil.which(t)]
    need(not missing, f"needs slurm-wlm and munge (missing: {missing})")
    d = tmp_path_factory.mktemp("slurm")
    (d / "state").mkdir()
    (d / "spool").mkdir()
    key = d / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    node = socket.gethostname().split(".")[0]
    conf = d / "slurm.conf"
    conf.write_text(f"""\
ClusterName=dnitest
SlurmctldHost={node}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
AuthInfo=socket={d}/munge.sock
CredType=cred/munge
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=600
KillWait=5
NodeName={node} NodeAddr=127.0.0.1 CPUs=8 RealMemory=1000 State=UNKNOWN
PartitionName=dni Nodes={node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")
    env = dict(os.environ, SLURM_CONF=str(conf))
    logs = {name: open(d / f"{name}.out", "w") for name in ("munged", "slurmctld", "slurmd")}
    daemons = []
    try:
        daemons.append(subprocess.Popen(
            ["munged", "-F", "--force", f"--socket={d}/munge.sock", f"--key-file={key}",
             f"--pid-file={d}/munged.pid", f"--seed-file={d}/munged.seed",
             f"--log-file={d}/munged.log"], stdout=logs["munged"], stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 10
        while not (d / "munge.sock").exists():
            assert daemons[0].poll() is None and time.monotonic() < deadline, \
                (d / "munged.out").read_text()
            time.sleep(0.05)
        daemons.append(subprocess.Popen(["slurmctld", "-D", "-i"], env=env,
                                        stdout=logs["slurmctld"], stderr=subprocess.STDOUT))
        daemons.append(subprocess.Popen(["slurmd", "-D"], env=env,
                                        stdout=logs["slurmd"], stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 30
        while _sinfo(env) != "idle":
            assert all(p.poll() is None for p in daemons) and time.monotonic() < deadline, \
                "the Slurm node did not come up: " + (d / "slurmctld.out").read_text()[-2000:] \
                + (d / "slurmd.out").read_text()[-2000:]
            time.sleep(0.2)
        yield {"SLURM_CONF": str(conf), "dir": d}
    finally:
        if daemons and len(daemons) == 3 and daemons[1].poll() is None:
            subprocess.run(["scancel", "--full", "--partition=dni"], env=env,
                           capture_output=True, timeout=30)
            deadline = time.monotonic() + 20
            while _squeue(env) and time.monotonic() < deadline:
                time.sleep(0.2)
        for p in reversed(daemons):
            stop(p)
        for pid in stepds_of(str(conf)):      # a job step's daemon that outlived slurmd
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        for f in logs.values():
            f.close()


def _sinfo(env) -> str:
    return subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True,
                          timeout=30).stdout.strip()


def _squeue(env) -> str:
    return subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True,
                          timeout=30).stdout.strip()


def stepds_of(conf: str) -> list:
    """slurmstepd processes started by this test's slurmd (their environment names its config)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if not fh.read().startswith(b"slurmstepd"):
                    continue
            with open(f"/proc/{pid}/environ", "rb") as fh:
                if f"SLURM_CONF={conf}".encode() in fh.read().split(b"\0"):
                    found.append(int(pid))
        except OSError:
            continue
    return found


def sbatch(slurm, tmp_path, epochs, extra=()):
    keys = tmp_path / "keys"
    assert cli("keys", keys, "--stages", 3).returncode == 0
    run_dir, out = tmp_path / "run", tmp_path / "job.out"
    env = dict(os.environ, SLURM_CONF=slurm["SLURM_CONF"], CURVE_KEYS=str(keys),
               BASE_PORT=str(random.randint(20000, 60000)), **dni_command(tmp_path))
    r = subprocess.run(["sbatch", "--parsable", "--ntasks=4", f"--output={out}",
                        "launch/slurm.sbatch", str(run_dir), *TRAIN, "--epochs", str(epochs),
                        *extra],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split(";")[0], run_dir, out


def job_state(slurm, job: str) -> dict:
    r = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True,
                       env=dict(os.environ, SLURM_CONF=slurm["SLURM_CONF"]), timeout=30)
    return dict(f.split("=", 1) for f in r.stdout.split() if "=" in f)


def wait_job(slurm, job: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        info = job_state(slurm, job)
        if info.get("JobState") not in (None, "PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
            return info
        assert time.monotonic() < deadline, f"job {job} still {info.get('JobState')}"
        time.sleep(0.2)


def test_slurm_job_trains_and_completes(tmp_path, slurm):
    job, run_dir, out = sbatch(slurm, tmp_path, EPOCHS)
    try:
        info = wait_job(slurm, job, 120)
    finally:
        left = kill_left(str(run_dir))
    said = out.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, said)
    assert info["NumTasks"] == "4"
    assert f"epoch    {EPOCHS}/{EPOCHS}" in said, said
    assert not left, f"processes left behind: {left}"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["weights_sha256"] == reference_sha()


def test_slurm_job_ends_when_one_task_is_killed(tmp_path, slurm):
    job, run_dir, out = sbatch(slurm, tmp_path, 100000, ["--set", "log_every=100"])
    try:
        deadline = time.monotonic() + 60
        while not (out.exists() and "epoch " in out.read_text()):   # every task is training
            assert time.monotonic() < deadline, (job_state(slurm, job), out.exists()
                                                 and out.read_text())
            time.sleep(0.1)
        assert job_state(slurm, job)["JobState"] == "RUNNING", out.read_text()
        for pid in procs_mentioning(f"{run_dir}/config.json --rank 1"):
            os.kill(pid, signal.SIGKILL)           # stage 1's process, task 2
        t0 = time.monotonic()
        info = wait_job(slurm, job, 60)
        took = time.monotonic() - t0
    finally:
        left = kill_left(str(run_dir))
    said = out.read_text()
    assert info["JobState"] == "FAILED", (info, said)
    assert "slurm-task: stage 1 (task 2 on" in said and "was killed by SIGKILL" in said, said
    assert "dni-async: stage 1 " in said, said           # the coordinator names it too
    assert "dni-async job: the pipeline failed" in said, said
    assert took < 30 and not left, (took, left)


def test_slurm_scancel_with_sigint_stops_the_job_in_order(tmp_path, slurm):
    """scancel --signal=INT is Ctrl-C for the job: a checkpoint, then every task ends."""
    job, run_dir, out = sbatch(slurm, tmp_path, 100000, ["--set", "log_every=100"])
    try:
        deadline = time.monotonic() + 60
        while not (out.exists() and "epoch " in out.read_text()):
            assert time.monotonic() < deadline, (job_state(slurm, job), out.exists()
                                                 and out.read_text())
            time.sleep(0.1)
        r = subprocess.run(["scancel", "--signal=INT", job], capture_output=True, text=True,
                           env=dict(os.environ, SLURM_CONF=slurm["SLURM_CONF"]), timeout=30)
        assert r.returncode == 0, r.stderr
        info = wait_job(slurm, job, 30)
    finally:
        left = kill_left(str(run_dir))
    said = out.read_text()
    assert "dni-async: interrupted at step" in said and "stopped in order" in said, said
    stopped = json.loads((run_dir / "stopped.json").read_text())
    assert stopped["checkpoint"] and os.path.exists(
        os.path.join(stopped["checkpoint"], "manifest.json")), stopped
    assert "was killed" not in said and not left, (said, left)
    assert info["ExitCode"] == "130:0", info


def test_a_port_left_in_time_wait_is_not_refused():
    """Submitting again on the same node and ports right after a run: the connections that run
    closed leave its ports in TIME_WAIT for a minute; ZeroMQ binds them (SO_REUSEADDR), so the
    check before start must not refuse them. A port someone listens on still is."""
    from dni_async.config import ConfigError
    from dni_async.runtime.runspec import check_ports_free
    lst = socket.socket()
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lst.bind(("127.0.0.1", 0))
    lst.listen()
    port = lst.getsockname()[1]
    ep = {"control": f"tcp://127.0.0.1:{port}", "results": None, "fwd_in": [], "grad_in": []}
    with pytest.raises(ConfigError, match="in use"):
        check_ports_free(ep)
    conn = socket.create_connection(("127.0.0.1", port))
    accepted, _ = lst.accept()
    accepted.close()            # the listening side closes first: its port goes to TIME_WAIT
    conn.close()
    lst.close()
    check_ports_free(ep)
