"""The whole job flow with real processes on real ports and real databases."""

import json
import re
import subprocess
import sys

import pytest

from conftest import ROOT, commitment, wait_until, write_chain

import common
from rpc import RpcClient


def test_twenty_commitments_become_twenty_results_each_recorded_once(
        tmp_path, parent_config, child_config, processes, rpc):
    write_chain(tmp_path / "chain.json", 100, [commitment(i) for i in range(1, 21)])
    config = parent_config()
    parent_cfg = common.load_config(config)
    parent = processes(["validator.py", "--config", config], tmp_path / "parent.log")
    parent.wait_for_log("Parent validator serving")
    children = {}
    for name, runner in (("c1", ["validator.py"]), ("c2", ["-m", "validator"])):
        child_path = child_config(name, parent_cfg.parent_port, max_concurrent_jobs=3)
        children[name] = (common.load_config(child_path).pg_database,
                          processes([*runner, "--config", child_path], tmp_path / f"{name}.log"))
    for name, (_, proc) in children.items():
        proc.wait_for_log(f"Successfully registered with parent validator as {name}")

    with common.connect(parent_cfg.pg_database) as db:
        def finished():
            return db.execute("select count(*) as n from jobs where status = 'completed'"
                              ).fetchone()["n"] == 20
        wait_until(finished, 60, "20 completed jobs at the parent")
        jobs = db.execute("select * from jobs order by job_id").fetchall()
        assignments = db.execute("select * from assignments").fetchall()

    assert [j["miner_hotkey"] for j in jobs] == [f"5Miner{i:03d}" for i in range(1, 21)]
    assert all(j["success"] and json.loads(j["result"])["evaluator"] == "demo" for j in jobs)
    assert len(assignments) == 20 and all(a["finished_at"] for a in assignments)
    for line in ("Sending", "completed job"):
        assert line in parent.log()
    for job in jobs:
        assert parent.log().count(f"completed job {job['job_id']}\n") == 1

    # Each child's own database holds exactly the jobs the parent recorded for it, reported.
    by_child = {name: {j["job_id"] for j in jobs if j["child_id"] == name} for name in children}
    assert by_child["c1"] | by_child["c2"] == {j["job_id"] for j in jobs}
    for name, (dsn, _) in children.items():
        with common.connect(dsn) as db:
            rows = db.execute("select job_id, status, reported_at, result from child_jobs"
                              ).fetchall()
        assert {r["job_id"] for r in rows} == by_child[name]
        assert all(r["status"] == "completed" and r["reported_at"] for r in rows)
        results = {j["job_id"]: j["result"] for j in jobs}
        assert all(results[r["job_id"]] == r["result"] for r in rows)

    stats = json.loads(RpcClient(rpc, "127.0.0.1", parent_cfg.parent_port)
                       .call("getStats")["json"])
    assert (stats["total_children"], stats["active_children"], stats["pending_jobs"]) == (2, 2, 0)
    for entry in stats["children"]:
        assert entry["total_jobs_sent"] == entry["total_jobs_completed"] == \
            len(by_child[entry["child_id"]])
        assert entry["active_jobs"] == 0

    # A clean stop on SIGTERM.
    assert [proc.stop() for _, proc in children.values()] == [0, 0]
    assert parent.stop() == 0


def test_a_child_started_before_its_parent_waits_and_registers(
        tmp_path, parent_config, child_config, processes):
    write_chain(tmp_path / "chain.json", 100, [commitment(1)])
    config = parent_config()
    port = common.load_config(config).parent_port
    child = processes(["child.py", "--config", child_config("early", port)],
                      tmp_path / "child.log")
    child.wait_for_log("Parent unreachable")
    processes(["parent.py", "--config", config], tmp_path / "parent.log")
    child.wait_for_log("Successfully registered with parent validator as early")
    child.wait_for_log("Job 1 succeeded")


def test_an_unreachable_database_fails_with_what_to_do(tmp_path, parent_config):
    from conftest import free_port
    config = parent_config(pg_database=f"postgresql://postgres@127.0.0.1:{free_port()}/x")
    run = subprocess.run([sys.executable, ROOT / "parent.py", "--config", config],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert run.stderr.startswith("error: cannot connect to PostgreSQL at postgresql://")
    assert 'pg_database = "embedded"' in run.stderr
    assert "Traceback" not in run.stderr


def test_embedded_postgres_runs_the_validators_own_server(
        tmp_path, parent_config, processes, rpc):
    write_chain(tmp_path / "chain.json", 100, [commitment(1)])
    config = parent_config(pg_database="embedded", data_dir=str(tmp_path / "parent-data"))
    parent = processes(["parent.py", "--config", config], tmp_path / "parent.log")
    parent.wait_for_log("New job 1 ")
    assert (tmp_path / "parent-data" / "pgdata" / "PG_VERSION").exists()
    stats = RpcClient(rpc, "127.0.0.1", common.load_config(config).parent_port) \
        .call("getStats")
    assert json.loads(stats["json"])["pending_jobs"] == 1
    assert parent.stop() == 0


def test_the_demo_completes_every_job():
    run = subprocess.run([sys.executable, ROOT / "validator.py", "demo", "--miners", "4",
                          "--eval-seconds", "0.2"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "All jobs completed" in run.stdout
    # Each miner's submission on the demo's suite: two entries of two repeats each.
    jobs, scored = run.stdout.split("(validator.py scores):")
    rows = re.findall(r"^ +\d+  5DemoMiner0\d .*$", jobs, re.M)
    twins = [row for row in rows if "(cross-check of job" in row]
    assert len(rows) - len(twins) == 4 * 4 and twins  # half are evaluated twice, on average
    # Each child's cross-check record: the demo's evaluator is honest, so all of them agree.
    records = re.findall(r"^child_validator_\d .* (\d+) \((\d+) disagreed\)$", jobs, re.M)
    assert len(records) == 2 and sum(int(n) for n, _ in records) == 2 * len(twins)
    assert all(disagreed == "0" for _, disagreed in records)
    scored = scored.split("(validator.py weights):")[0]
    assert len(re.findall(r"^    demo/reach  weight 1  [\d.]+ ± [\d.]+  \(2 scores\)$",
                          scored, re.M)) == 4
    assert len(re.findall(r"^    demo/push  weight 2  [\d.]+ ± [\d.]+  \(2 scores\)$",
                          scored, re.M)) == 4
    # It ends with the weights table: each miner's uid, score and normalized weight.
    table = run.stdout.split("validator.py weights):")[1]
    rows = re.findall(r"^(\d+)\s+5DemoMiner0\d\s+([\d.]+)\s+([\d.]+)\s+-$", table, re.M)
    assert [uid for uid, _, _ in rows] == ["0", "1", "2", "3"]
    assert sum(float(weight) for _, _, weight in rows) == pytest.approx(1.0, abs=1e-3)
    assert "no chain to set these weights on" in table
    for k in (1, 2):
        assert f"Successfully registered with parent validator as child_validator_{k}" \
            in run.stderr
