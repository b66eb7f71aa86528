"""Configuration: the seed's keys, command-line overrides, and one clear line for every mistake."""

import subprocess
import sys
import types

import pytest
from conftest import ROOT, write_toml

import common


def test_sample_configs_load_with_the_seed_values():
    parent = common.load_config(ROOT / "validator_parent.toml")
    assert parent.is_parent_validator is True
    assert parent.parent_port == 8001
    assert parent.subtensor.netuid == 2
    assert parent.neuron.max_commitment_lookback == 3
    child = common.load_config(ROOT / "validator_child.toml")
    assert child.is_parent_validator is False
    assert (child.validator_id, child.parent_host, child.child_port) == \
        ("child_validator_1", "localhost", 8002)


def test_command_line_flags_override_the_file():
    args = common.role_arguments("test").parse_args([
        "--config", str(ROOT / "validator_child.toml"), "--validator-id", "c9",
        "--parent-host", "10.0.0.5", "--parent-port", "9001", "--child-port", "9002",
        "--pg-database", "postgresql://x@y/z", "--log-level", "DEBUG"])
    cfg = common.config_from_arguments(args)
    assert (cfg.validator_id, cfg.parent_host, cfg.parent_port, cfg.child_port) == \
        ("c9", "10.0.0.5", 9001, 9002)
    assert cfg.pg_database == "postgresql://x@y/z"
    assert cfg.log_level == "DEBUG"
    args = common.role_arguments("test").parse_args([
        "--config", str(ROOT / "validator_child.toml"), "--is-parent-validator"])
    assert common.config_from_arguments(args).is_parent_validator is True


def test_the_subnet_templates_flags_override_the_file_too():
    args = common.role_arguments("test").parse_args([
        "--config", str(ROOT / "validator_parent.toml"), "--netuid", "61",
        "--subtensor.network", "test", "--subtensor.chain_endpoint", "wss://node.example:443",
        "--wallet.name", "owner", "--wallet.hotkey", "validator", "--wallet.path", "/srv/w",
        "--logging.debug"])
    cfg = common.config_from_arguments(args)
    assert (cfg.subtensor.netuid, cfg.subtensor.network, cfg.subtensor.address) == \
        (61, "test", "wss://node.example:443")
    assert (cfg.wallet_name, cfg.hotkey_name, cfg.wallet_path) == ("owner", "validator", "/srv/w")
    assert cfg.log_level == "DEBUG"
    untouched = common.load_config(ROOT / "validator_parent.toml")
    assert cfg.neuron.sync_frequency == untouched.neuron.sync_frequency
    trace = common.role_arguments("test").parse_args([
        "--config", str(ROOT / "validator_parent.toml"), "--logging.trace"])
    assert common.config_from_arguments(trace).log_level == "TRACE"


def test_trace_logs_the_libraries_debug_lines_and_debug_does_not():
    """log_level = "TRACE" is DEBUG for the validator and for pgqueuer, psycopg and asyncio,
    which DEBUG keeps at WARNING."""
    import logging
    for level, library_level in (("DEBUG", logging.WARNING), ("TRACE", logging.DEBUG)):
        cfg = types.SimpleNamespace(log_format="text", log_level=level, is_parent_validator=True)
        root = logging.getLogger()
        saved = root.handlers[:], root.level
        try:
            root.handlers = []
            common.setup_logging(cfg)
            assert root.level == logging.DEBUG
            assert logging.getLogger("pgqueuer").level == library_level
        finally:
            root.handlers, root.level = saved


@pytest.mark.parametrize("table, message", [
    ({"pg_database": "x", "is_parent_validator": True, "parent_prot": 1},
     "unknown key 'parent_prot'"),
    ({"pg_database": "x", "is_parent_validator": True, "neuron": {"sync_freq": 1}},
     "unknown key 'neuron.sync_freq'"),
    ({"pg_database": "x", "is_parent_validator": True, "parent_port": "8001"},
     "key 'parent_port' must be an integer"),
    ({"pg_database": "x", "is_parent_validator": True, "neuron": {"load_old_nodes": 1}},
     "key 'neuron.load_old_nodes' must be true or false"),
    ({"pg_database": "x", "is_parent_validator": True, "neuron": {"allowed_validators": [1]}},
     "key 'neuron.allowed_validators' must be a list of strings"),
    ({"is_parent_validator": True}, "missing required key 'pg_database'"),
    ({"pg_database": "x"}, "key 'validator_id' is required"),
    ({"pg_database": "x", "is_parent_validator": True, "parent_port": 70000},
     "key 'parent_port' must be a TCP port"),
    ({"pg_database": "x", "is_parent_validator": True, "log_level": "LOUD"},
     "key 'log_level' must be one of"),
    ({"pg_database": "x", "is_parent_validator": True, "subtensor": 3},
     "key 'subtensor' must be a table"),
    ({"pg_database": "x", "is_parent_validator": True, "max_result_bytes": (16 << 20) + 1},
     "key 'max_result_bytes' must be between 1 and 16777216 (16 MiB)"),
    ({"pg_database": "x", "validator_id": "c1", "auth": "off",
      "parent_hosts": ["host-a:8001", "host-b"]},
     "key 'parent_hosts': endpoint 'host-b' is not host:port"),
    ({"pg_database": "x", "is_parent_validator": True, "leader_timeout_seconds": 1},
     "key 'leader_timeout_seconds' must be at least 2"),
])
def test_a_bad_config_names_the_file_and_the_key(tmp_path, table, message):
    path = write_toml(tmp_path / "bad.toml", table)
    with pytest.raises(common.ConfigError) as error:
        common.load_config(path)
    assert str(error.value).startswith(str(path))
    assert message in str(error.value)


def test_a_config_that_is_not_toml_is_refused(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("pg_database = \n")
    with pytest.raises(common.ConfigError, match="not valid TOML"):
        common.load_config(path)
    with pytest.raises(common.ConfigError, match="file not found"):
        common.load_config(tmp_path / "missing.toml")


@pytest.mark.parametrize("script", ["parent.py", "child.py", "validator.py"])
def test_each_entry_point_exits_with_one_line_on_a_bad_config(tmp_path, script):
    path = write_toml(tmp_path / "bad.toml", {"pg_database": "x", "is_parent_validator": True,
                                              "validator_id": "c1", "wallet": "oops"})
    run = subprocess.run([sys.executable, ROOT / script, "--config", path],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert run.stderr.strip() == f"error: {path}: unknown key 'wallet'"


@pytest.mark.parametrize("key, bad, good", [
    ("rpc_max_connections", 0, 1),
    ("rpc_max_unregistered", 0, 1),
    ("rpc_max_unregistered_per_address", 0, 1),
    ("rpc_unregistered_max_message_bytes", 1023, 1024),
    ("rpc_unregistered_max_message_bytes", common.MAX_MESSAGE_BYTES + 1,
     common.MAX_MESSAGE_BYTES),
    ("rpc_register_timeout_seconds", 0.0, 0.1),
    ("rpc_idle_timeout_seconds", 0.0, 0.1),
])
def test_the_rpc_limits_are_refused_past_their_edge(tmp_path, key, bad, good):
    base = {"pg_database": "x", "is_parent_validator": True}
    assert getattr(common.load_config(write_toml(tmp_path / "good.toml", {**base, key: good})),
                   key) == good
    with pytest.raises(common.ConfigError, match=f"bad.toml: key '{key}' must be"):
        common.load_config(write_toml(tmp_path / "bad.toml", {**base, key: bad}))
