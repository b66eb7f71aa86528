"""The operator's side of real validator processes: a start-up error that is one line, and the
commands that read a config (status, weights)."""

import json
import socket
import subprocess
import sys

from conftest import ROOT, commitment, write_chain


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
