"""The parent's disk guard (issue 28): below min_free_disk_mb free under its data_dir (or its
local database), the parent records no result (the children keep them) and makes no job, says
so once with the figures, and resumes by itself once there is room."""

import json
import logging

from conftest import commitment, wait_until, write_chain

import common


def test_results_wait_at_the_child_while_the_parents_disk_is_low(make_state, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="validator")
    state = make_state(jobs={"max_retries": 3})
    state.db.query("""insert into jobs (fingerprint, submission_id, miner_hotkey, hf_repo_id,
                          hf_repo_commit, commit_block, env_provider, env_name, random_seed,
                          max_retries) values ('f', 1, '5Miner001', 'org/m', 'r', 100, 'demo',
                          'demo-env', 7, 3)""")
    state.queue.reload(anew=True)
    state.register_child("c1", "127.0.0.1:9000")
    [job] = state.request_jobs("c1", 1)
    state.disk = common.DiskGuard(1 << 40, [tmp_path], stops="recording no result")
    [(taken, message)] = state.report_completions("c1", [(job["jobId"], True, '{"score": 1}')])
    assert not taken and message.startswith("not recorded: the parent's disk is low (")
    assert "under min_free_disk_mb (1099511627776)); kept by the child" in message
    assert state.db.query("select status from jobs")[0]["status"] == "assigned"
    _, answers, _ = state.poll("c1", 0, results=[(job["jobId"], True, '{"score": 1}')])
    assert [taken for taken, _ in answers] == [False]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Disk low")]
    assert len(lines) == 1 and lines[0].endswith("; recording no result until there is room")

    state.disk.min_free = 1  # room again
    [(taken, message)] = state.report_completions("c1", [(job["jobId"], True, '{"score": 1}')])
    assert (taken, message) == (True, "recorded")
    assert state.db.query("select status from jobs")[0]["status"] == "completed"


def test_a_parent_on_a_full_disk_makes_no_job_and_keeps_no_result_then_resumes(
        tmp_path, tmpfs, parent_config, child_config, processes):
    data = tmpfs("48m")
    write_chain(tmp_path / "chain.json", 100, [commitment(1), commitment(2)])
    config = parent_config(data_dir=str(data), min_free_disk_mb=24)
    ballast = data / "ballast"
    ballast.write_bytes(b"\0" * (32 << 20))  # 16 MB left
    parent = processes(["parent.py", "--config", config], tmp_path / "parent.log")
    parent.wait_for_log(r"Disk low: \d+ MB free on .*, under min_free_disk_mb \(24\); recording "
                        "no result and making no job until there is room")
    child = processes(["child.py", "--config", child_config(
        "c1", common.load_config(config).parent_port, evaluator={"demo_seconds": 3.0})],
        tmp_path / "c1.log")
    child.wait_for_log("Successfully registered with parent validator as c1")
    dsn = common.load_config(config).pg_database

    def jobs():
        with common.connect(dsn) as db:
            return {r["job_id"]: r["status"] for r in db.execute(
                "select job_id, status from jobs order by job_id")}
    assert jobs() == {}  # no sync made a job meanwhile
    ballast.unlink()
    parent.wait_for_log("Disk has room again: .*; recording results and making jobs again")
    wait_until(lambda: set(jobs().values()) == {"assigned"} and len(jobs()) == 2, 30,
               "both jobs handed to c1")
    ballast.write_bytes(b"\0" * (32 << 20))  # low again before the evaluations end
    child.wait_for_log(r"Parent did not take the result of job [12](, [12])?: not recorded: "
                       "the parent's disk is low", timeout=30)
    assert set(jobs().values()) == {"assigned"}
    ballast.unlink()
    wait_until(lambda: set(jobs().values()) == {"completed"}, 30, "both results recorded")
    with common.connect(dsn) as db:
        results = [json.loads(r["result"]) for r in db.execute("select result from jobs")]
    assert all(r["evaluator"] == "demo" for r in results)
