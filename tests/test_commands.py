"""The operator's side of real validator processes: a start-up error that is one line, and the
commands that read a config (status, weights)."""

import json
import socket
import subprocess
import sys

from conftest import ROOT, commitment, write_chain, write_toml

import common
import validator


def test_a_port_already_in_use_is_one_line_naming_the_key(tmp_path, parent_config, child_config,
                                                         processes):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        write_chain(tmp_path / "chain.json", 100, [])
        for config, key in ((parent_config(parent_port=port), "parent_port"),
                            (child_config("c1", 1, child_port=port), "child_port")):
            script = "parent.py" if key == "parent_port" else "child.py"
            run = subprocess.run([sys.executable, ROOT / script, "--config", config, "--log-level",
                                  "ERROR"], capture_output=True, text=True, timeout=60)
            assert run.returncode == 2, run.stderr
            assert run.stderr.splitlines() == [
                f"error: {config}: cannot listen on 127.0.0.1:{port}: address already in use; "
                f"change key '{key}', or stop the process that holds the port"]


def status(*args):
    return subprocess.run([sys.executable, ROOT / "validator.py", "status", *map(str, args)],
                          capture_output=True, text=True, timeout=60)


def test_status_dials_the_endpoints_its_config_names(tmp_path, parent_config, child_config,
                                                     processes):
    write_chain(tmp_path / "chain.json", 100, [commitment(i) for i in (1, 2)])
    config = parent_config()  # on a free port, not 8001
    port = common.load_config(config).parent_port
    parent = processes(["parent.py", "--config", config], tmp_path / "parent.log")
    parent.wait_for_log(r"New job 2 ")
    run = status("--config", config, "--json")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["active_parent"] == f"localhost:{port}"
    # What the command line says wins over the file.
    down = status("--config", config, "--parent-port", 1)
    assert down.returncode == 1
    assert down.stderr.startswith("error: parent validator unreachable: localhost:1")

    # A child's file: its parent, and the child itself.
    child_path = child_config("c1", port)
    child = processes(["child.py", "--config", child_path], tmp_path / "c1.log")
    child.wait_for_log("Successfully registered")
    own = f"127.0.0.1:{common.load_config(child_path).child_port}"
    run = status("--config", child_path)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == f"parent 127.0.0.1:{port}: active (leadership epoch 1)"
    assert lines[3].startswith("c1 ") and lines[-1].startswith(f"child c1 {own}: ")
    report = json.loads(status("--config", child_path, "--json").stdout)
    assert set(report) == {f"127.0.0.1:{port}", own}
    assert "queued" in report[own]
    assert report[f"127.0.0.1:{port}"]["children"][0]["child_id"] == "c1"
    # The child alone: the parent is down, and the exit code says so.
    parent.stop()
    run = status("--config", child_path)
    assert run.returncode == 1
    assert run.stderr.startswith(f"error: parent validator unreachable: 127.0.0.1:{port}")
    assert run.stdout.startswith(f"child c1 {own}: "), run.stdout


def test_the_weights_command_reads_its_config_once_and_closes_its_database(
        tmp_path, make_dsn, monkeypatch, capsys):
    write_chain(tmp_path / "chain.json", 120, [])
    config = write_toml(tmp_path / "p.toml", {
        "pg_database": make_dsn(), "is_parent_validator": True,
        "subtensor": {"network": "file", "commitments_file": str(tmp_path / "chain.json")}})
    loads, databases = [], []
    load_config = common.load_config
    monkeypatch.setattr(common, "load_config", lambda *a: loads.append(a) or load_config(*a))

    class Database(common.Database):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            databases.append(self)

    monkeypatch.setattr(common, "Database", Database)
    assert validator.weights(["--config", str(config), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["block"] == 120
    assert len(loads) == 1 and len(databases) == 1 and databases[0].conn.closed


def test_the_front_door_lists_every_command_and_each_has_its_own_help():
    run = subprocess.run([sys.executable, ROOT / "validator.py", "--help"], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    listed = run.stdout.split("commands (python validator.py COMMAND --help for each):\n")[1]
    names = [line.split()[0] for line in listed.splitlines() if line.strip()]
    assert names == list(validator.COMMANDS)
    assert "--config" in run.stdout and "--wallet.hotkey" in run.stdout  # the role's flags
    for name in names:
        own = subprocess.run([sys.executable, ROOT / "validator.py", name, "--help"],
                             capture_output=True, text=True, timeout=60)
        assert own.returncode == 0, (name, own.stderr)
        assert own.stdout.startswith("usage: "), (name, own.stdout)
        assert f"validator.py {name}" in own.stdout.splitlines()[0] or name == "bench", name
    bare = subprocess.run([sys.executable, ROOT / "validator.py"], capture_output=True,
                          text=True, timeout=60)
    assert bare.returncode == 2
    assert "commands (python validator.py COMMAND" in bare.stderr
    assert bare.stderr.rstrip().endswith("error: name a config (--config FILE) or a command")
