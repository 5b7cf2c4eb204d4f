"""Bad settings: one clear line on stderr, exit status 2, and no process started."""

import socket

import pytest

from conftest import cli, procs_mentioning


def check_refused(r, needle, run_dir):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith("dni-async: error:"), r.stderr
    assert needle in lines[0], lines[0]
    assert not procs_mentioning(str(run_dir))
    assert not (run_dir / "config.json").exists()


@pytest.mark.parametrize("flags,needle", [
    (["--set", "input_dim=30"], "input_dim = 30 does not match the dataset (24 columns)"),
    (["--hidden", "16,8", "--activation", "relu,tanh,relu"], "one per hidden layer"),
    (["--mode", "synthetic"], "unknown mode 'synthetic'"),
    (["--preset", "huge"], "unknown preset 'huge'"),
    (["--batch-size", "0"], "batch_size must be positive"),
    (["--hidden", "64,0"], "widths must be positive"),
    (["--max-in-flight", "-1"], "max_in_flight must be positive"),
    (["--dtype", "float16"], "unknown dtype"),
    (["--set", "colour=blue"], "unknown setting 'colour'"),
    (["--dataset", "missing.npz"], "does not exist"),
    (["--transport", "tcp", "--set", "stage_hosts=127.0.0.2"], "names 1 hosts for 3 stages"),
    (["--epohcs", "5"], "unrecognized arguments: --epohcs 5 (see dni-async train --help)"),
    (["--epochs", "five"], "invalid int value: 'five'"),
    (["--lr", "inf"], "lr: inf is not a finite number"),
    (["--set", "generator_lr=nan"], "generator_lr: 'nan' is not a finite number"),
    (["--hidden", "128,,64"], "hidden: an empty item in '128,,64'"),
    (["--set", "epocs=3"], "unknown setting 'epocs' (did you mean 'epochs'?)"),
    (["--mode", "gpipe"], "set --micro-batches to one of 2, 5, 10, or a --batch-size that 4 divides"),
])
def test_bad_settings(flags, needle, tmp_path):
    r = cli("train", "--run-dir", tmp_path / "run", *flags)
    check_refused(r, needle, tmp_path / "run")


def test_port_in_use(tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    port = s.getsockname()[1]
    try:
        r = cli("train", "--run-dir", tmp_path / "run", "--transport", "tcp",
                "--set", "coordinator_host=127.0.0.1",
                "--set", "stage_hosts=127.0.0.1,127.0.0.1,127.0.0.1",
                "--set", f"base_port={port}")
    finally:
        s.close()
    assert r.returncode == 2 and f"port {port} on 127.0.0.1 is in use" in r.stderr, r.stderr
    assert not procs_mentioning(str(tmp_path / "run"))


def test_two_sockets_on_one_address_are_refused():
    from dni_async.config import ConfigError
    from dni_async.runtime.runspec import check_ports_free
    ep = {"control": "tcp://127.0.0.1:1", "results": "tcp://127.0.0.1:2",
          "fwd_in": ["tcp://127.0.0.1:3", "tcp://127.0.0.1:3"], "grad_in": [None, None]}
    with pytest.raises(ConfigError, match="would bind the same address: tcp://127.0.0.1:3"):
        check_ports_free(ep)


def test_unwritable_run_folder(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    r = cli("train", "--run-dir", blocker / "run")
    assert r.returncode == 2 and "cannot write the run folder" in r.stderr, r.stderr


def test_bad_toml(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("epochs = [1, 2\n")
    r = cli("train", "--config", cfg, "--run-dir", tmp_path / "run")
    check_refused(r, "is not valid TOML", tmp_path / "run")


def test_missing_optional_dependency(tmp_path):
    fake = tmp_path / "fake" / "sklearn"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('not installed')\n")
    r = cli("train", "--dataset", "digits", "--run-dir", tmp_path / "run",
            env={"PYTHONPATH": str(tmp_path / "fake"), "DNI_ASYNC_CACHE": "off"})
    check_refused(r, "pip install 'dni-async[data]'", tmp_path / "run")


@pytest.mark.parametrize("argv,prefix,needle", [
    (["experiment", "launch/experiments/fidelity.toml", "--bad"], "dni-async experiment: error:",
     "unrecognized arguments: --bad"),
    (["experiment"], "dni-async experiment: error:", "required: what"),
    (["stage", "--rank", "1"], "dni-async: error:", "required: run_config"),
])
def test_bad_flags_of_other_commands(argv, prefix, needle):
    r = cli(*argv)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith(prefix) and needle in lines[0], lines[0]


@pytest.mark.parametrize("text,needle", [
    ("[settings]\nepochs = 3\n", "unknown table [settings]"),
    ("epocs = 3\n", "unknown setting 'epocs' (did you mean 'epochs'?)"),
])
def test_a_config_file_with_an_unknown_table_or_key_is_refused(text, needle, tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(text)
    r = cli("train", "--run-dir", tmp_path / "run", "--config", path)
    check_refused(r, needle, tmp_path / "run")
    assert str(path) in r.stderr


def test_resuming_a_finished_run_says_so(tmp_path):
    run = tmp_path / "run"
    assert cli("train", "--run-dir", run, "--preset", "tiny", "--epochs", "1",
               "--quiet").returncode == 0
    r = cli("train", "--resume", run)
    assert r.returncode == 2 and "finished already" in r.stderr, r.stderr


@pytest.mark.parametrize("command", ["train", "reference"])
def test_a_run_whose_loss_is_not_a_number_stops_at_once_and_says_so(command, tmp_path):
    # a linear network in float32 with an absurd learning rate: the weights overflow at once
    where = ["--run-dir", tmp_path / "run"] if command == "train" else []
    r = cli(command, *where, "--preset", "tiny", "--mode", "backprop", "--activation",
            "identity", "--dtype", "float32", "--lr", "1e30", "--epochs", "20", timeout=120)
    assert r.returncode == 4, r.stderr
    assert "the loss is not a number" in r.stderr
    if command == "train":
        assert not procs_mentioning(str(tmp_path / "run"))
