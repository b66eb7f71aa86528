"""The systemd units in deploy/: they parse as units, hold the settings the validator's shutdown
and restarts rely on, their command line is one validator.py accepts, and `systemd-analyze
verify` passes them where that tool is installed."""

import json
import re
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

import common

DEPLOY = ROOT / "deploy"
UNITS = ["validator-parent.service", "validator-child@.service"]
INSTALL_DIR = "/opt/parent-child-validator"  # the install directory the units assume


def parse_unit(path):
    """A unit file -> {section: [(key, value), ...]}, keys in order and repeated as written.
    Fails on any line that is not blank, a comment, a [section] or key=value."""
    sections, current = {}, None
    lines = path.read_text().splitlines()
    while lines:
        line = lines.pop(0).strip()
        while line.endswith("\\") and lines:  # a continuation line
            line = line[:-1] + " " + lines.pop(0).strip()
        if not line or line[0] in "#;":
            continue
        header = re.fullmatch(r"\[([A-Za-z]+)\]", line)
        if header:
            current = sections.setdefault(header[1], [])
            continue
        pair = re.fullmatch(r"([A-Za-z][A-Za-z0-9]*)=(.*)", line)
        assert pair and current is not None, f"{path.name}: not a unit line: {line!r}"
        current.append((pair[1], pair[2].strip()))
    return sections


def values(unit, section, key):
    return [value for k, value in unit[section] if k == key]


def value(unit, section, key):
    found = values(unit, section, key)
    assert len(found) == 1, f"{section}.{key}: expected one setting, got {found}"
    return found[0]


def seconds(timespan):
    """A systemd time span such as 90, 90s, 1min 30s -> seconds."""
    units = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", timespan)
    assert parts and "".join(n + u for n, u in parts) == timespan.replace(" ", "")
    return sum(float(n) * units[u or "s"] for n, u in parts)


@pytest.fixture(params=UNITS)
def unit(request):
    return request.param, parse_unit(DEPLOY / request.param)


def test_each_unit_has_the_three_sections_and_runs_validator_py_with_a_config(unit):
    name, parsed = unit
    assert set(parsed) == {"Unit", "Service", "Install"}
    command = value(parsed, "Service", "ExecStart").split()
    assert command[:3] == [f"{INSTALL_DIR}/.venv/bin/python", f"{INSTALL_DIR}/validator.py",
                           "--config"]
    config = command[3]
    assert config.startswith("/etc/parent-child-validator/") and config.endswith(".toml")
    if name == "validator-child@.service":
        assert config == "/etc/parent-child-validator/child-%i.toml"  # the instance's config
    assert value(parsed, "Service", "WorkingDirectory") == INSTALL_DIR
    assert value(parsed, "Install", "WantedBy") == "multi-user.target"


def test_stop_and_restart_settings_fit_the_staged_shutdown(unit):
    _, parsed = unit
    assert value(parsed, "Service", "KillSignal") == "SIGTERM"
    # Only the validator gets SIGTERM: its evaluators and its embedded PostgreSQL are its own
    # to stop, in stages; with the default (control-group) they would get it at once too.
    assert value(parsed, "Service", "KillMode") == "mixed"
    grace = common.CONFIG_KEYS["shutdown_grace_seconds"][1]
    assert grace == 60.0
    # The evaluators still running then are stopped gently: SIGTERM, SIGKILL after their grace.
    stop_grace = common.CONFIG_KEYS["evaluator"]["stop_grace_seconds"][1]
    assert seconds(value(parsed, "Service", "TimeoutStopSec")) >= grace + stop_grace + 15
    assert value(parsed, "Service", "Restart") == "on-failure"
    assert 1 <= seconds(value(parsed, "Service", "RestartSec")) <= 60
    assert value(parsed, "Service", "RestartPreventExitStatus") == "2"  # a config error
    after = " ".join(values(parsed, "Unit", "After")).split()
    assert {"network-online.target", "postgresql.service"} <= set(after)
    assert "network-online.target" in value(parsed, "Unit", "Wants").split()


def test_a_dedicated_user_and_hardening_that_leaves_the_data_dir_writable(unit):
    name, parsed = unit
    assert value(parsed, "Service", "User") not in ("", "root", "0")
    for key, expected in (("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"),
                          ("PrivateTmp", "yes")):
        assert value(parsed, "Service", key) == expected
    # The data dir systemd creates for the unit is the one ProtectSystem=strict leaves
    # writable, and the one the unit's comment tells the operator to set as data_dir.
    state = value(parsed, "Service", "StateDirectory")
    data_dir = f"/var/lib/{state}"
    assert value(parsed, "Service", "ReadWritePaths") == data_dir
    assert f'data_dir = "{data_dir}"' in (DEPLOY / name).read_text()
    # The embedded PostgreSQL locks a file under XDG_RUNTIME_DIR: it must be writable too.
    runtime = value(parsed, "Service", "RuntimeDirectory")
    assert f"XDG_RUNTIME_DIR=%t/{runtime}" in values(parsed, "Service", "Environment")


def test_the_child_unit_lets_evaluators_use_gpus_and_no_other_device():
    """PrivateDevices=yes hid /dev/nvidia*: GPU evaluations could not run under the unit."""
    parsed = parse_unit(DEPLOY / "validator-child@.service")
    assert value(parsed, "Service", "PrivateDevices") == "no"
    assert value(parsed, "Service", "DevicePolicy") == "closed"
    allowed = values(parsed, "Service", "DeviceAllow")
    assert {"char-nvidia-frontend rw", "char-nvidia-uvm rw"} <= set(allowed)
    for key in ("NoNewPrivileges", "ProtectKernelModules", "ProtectKernelTunables",
                "RestrictSUIDSGID"):  # the rest of the hardening stays
        assert value(parsed, "Service", key) == "yes"
    assert value(parsed, "Service", "CapabilityBoundingSet") == ""
    # The parent runs no evaluator: it keeps its devices private.
    assert value(parse_unit(DEPLOY / "validator-parent.service"), "Service",
                 "PrivateDevices") == "yes"


def test_the_command_line_is_one_validator_py_accepts(unit, tmp_path):
    """Run the unit's ExecStart from this checkout, on a config that does not exist: the flags
    parse, and it ends as a bad config does (exit 2, which the unit does not restart)."""
    _, parsed = unit
    command = value(parsed, "Service", "ExecStart").replace("%i", "7").split()
    command[0] = sys.executable
    command = [part.replace(INSTALL_DIR, str(ROOT)) for part in command]
    missing = tmp_path / "missing.toml"
    command[3] = str(missing)
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {missing}: file not found"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed on this machine")
def test_systemd_analyze_verify_passes_the_units(tmp_path):
    """verify checks that ExecStart's program exists: the units are checked with the install
    directory pointed at this checkout and its Python, otherwise exactly as written."""
    for name in UNITS:
        text = (DEPLOY / name).read_text()
        text = text.replace(f"{INSTALL_DIR}/.venv/bin/python", sys.executable)
        (tmp_path / name).write_text(text.replace(INSTALL_DIR, str(ROOT)))
    (tmp_path / "validator-child@1.service").write_text(
        (tmp_path / "validator-child@.service").read_text())
    files = [str(tmp_path / name) for name in [*UNITS, "validator-child@1.service"]]
    result = subprocess.run(["systemd-analyze", "verify", *files], capture_output=True,
                            text=True, timeout=120)
    # verify also loads the units ours name (targets, postgresql.service) and may warn about
    # those on some machines; a line about our units is a failure, as is any error.
    ours = [line for line in (result.stdout + result.stderr).splitlines()
            if "validator-" in line]
    assert result.returncode == 0 and ours == [], result.stdout + result.stderr


PM2_FILE = DEPLOY / "ecosystem.config.js"


@pytest.fixture(scope="module")
def pm2_apps():
    """The apps of the pm2 ecosystem file, as pm2 reads them: loaded by Node.js."""
    loaded = subprocess.run(
        ["node", "-e", "process.stdout.write(JSON.stringify(require(process.argv[1]).apps))",
         str(PM2_FILE)], capture_output=True, text=True, timeout=60)
    assert loaded.returncode == 0, loaded.stderr
    return {app["name"]: app for app in json.loads(loaded.stdout)}


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")
@pytest.mark.parametrize("app_name, unit_name, instance", [
    ("validator-parent", "validator-parent.service", None),
    ("validator-child-1", "validator-child@.service", "1")])
def test_the_pm2_file_runs_what_the_systemd_units_run(pm2_apps, app_name, unit_name, instance):
    """The pm2 apps and the units must not drift apart: the same command, directory and
    environment, the same restarts, and a stop that signals the validator only and waits at
    least as long as systemd does before SIGKILL."""
    app, unit = pm2_apps[app_name], parse_unit(DEPLOY / unit_name)

    def expand(text):
        return text.replace("%i", instance) if instance else text

    assert [app["interpreter"], app["script"], *app["args"]] == \
        expand(value(unit, "Service", "ExecStart")).split()
    assert app["cwd"] == value(unit, "Service", "WorkingDirectory")
    unit_env = dict(entry.split("=", 1) for entry in values(unit, "Service", "Environment"))
    assert set(app["env"]) == set(unit_env)
    assert app["env"]["PYTHONUNBUFFERED"] == unit_env["PYTHONUNBUFFERED"]
    state = "/var/lib/" + expand(value(unit, "Service", "StateDirectory"))
    assert all(path.startswith(state + "/") for name, path in app["env"].items()
               if name != "PYTHONUNBUFFERED")  # systemd's %t and %S, made plain paths
    assert value(unit, "Service", "Restart") == "on-failure" and app["autorestart"] is True
    assert app["restart_delay"] == seconds(value(unit, "Service", "RestartSec")) * 1000
    assert app["stop_exit_codes"] == [int(value(unit, "Service", "RestartPreventExitStatus"))]
    assert value(unit, "Service", "KillMode") == "mixed" and app["treekill"] is False
    assert app["kill_timeout"] >= seconds(value(unit, "Service", "TimeoutStopSec")) * 1000
