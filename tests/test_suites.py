"""Suites ([[jobs.suite]]): a submission makes one job per entry and repeat, exactly once
(across a restart and a kill -9 mid-sync), its jobs are served together, oldest submission
first, and are superseded or cancelled together; the config names a bad entry's key; a database
made before suites upgrades in place."""

import subprocess
import sys
import textwrap

import pytest
from conftest import ROOT, commitment, write_toml

import chain as chains
import common
import parent

SUITE = [{"env_provider": "metaworld", "env_name": "reach", "repeats": 3, "weight": 2.0},
         {"env_provider": "metaworld", "env_name": "push", "repeats": 3}]


def snapshot(block, commitments, neurons=None):
    return chains.ChainSnapshot(block, [chains.Commitment(**c) for c in commitments], neurons)


def suite_jobs(state):
    return [(row["job_id"], row["miner_hotkey"], row["suite_entry"], row["suite_repeat"],
             row["env_name"], row["status"])
            for row in state.db.query("select * from jobs order by job_id")]


def made(miner, first):
    """The six jobs of one submission of a 2 x 3 suite, from job id `first`, pending."""
    return [(first + n, miner, n // 3, n % 3, ("reach", "push")[n // 3], "pending")
            for n in range(6)]


def test_a_2_by_3_suite_makes_six_jobs_per_submission_exactly_once_across_a_restart(make_state):
    state = make_state(jobs={"suite": SUITE})
    assert state.intake.add_commitments(snapshot(100, [commitment(1), commitment(2)])) == \
        list(range(1, 13))
    assert suite_jobs(state) == made("5Miner001", 1) + made("5Miner002", 7)
    seeds = [row["random_seed"] for row in state.db.query("select random_seed from jobs")]
    assert len(set(seeds)) == 12  # each repeat is an independent draw
    assert {row["fingerprint"] for row in state.db.query(
        "select fingerprint from jobs where miner_hotkey = '5Miner001'")} == \
        {parent.fingerprint("5Miner001", "org/model-1", f"{1:040x}")}
    again = make_state(jobs={"suite": SUITE})
    assert again.intake.add_commitments(snapshot(101, [commitment(1), commitment(2)])) == []
    assert again.intake.add_commitments(snapshot(102, [commitment(1), commitment(3)])) == \
        list(range(13, 19))
    assert len(suite_jobs(again)) == 18
    # The database refuses a second job of one (submission, entry, repeat, cross-check round)
    # whatever the code.
    with pytest.raises(Exception, match="jobs_submission_check"):
        again.db.query("insert into jobs (fingerprint, submission_id, miner_hotkey, hf_repo_id, "
                       "hf_repo_commit, commit_block, env_provider, env_name, random_seed, "
                       "max_retries, suite_entry, suite_repeat) select fingerprint, 1, "
                       "miner_hotkey, 'a/b', '', 1, 'p', 'e', 1, 0, 1, 2 from jobs "
                       "where job_id = 1")


def test_a_change_of_suite_leaves_the_submissions_already_made_as_they_were(make_state):
    state = make_state(jobs={"suite": SUITE})
    state.intake.add_commitments(snapshot(100, [commitment(1)]))
    changed = make_state(jobs={"suite": SUITE + [
        {"env_provider": "metaworld", "env_name": "pick", "repeats": 2}]})
    assert changed.intake.add_commitments(snapshot(101, [commitment(1), commitment(2)])) == \
        list(range(7, 15))
    counts = {row["miner_hotkey"]: row["n"] for row in changed.db.query(
        "select miner_hotkey, count(*) as n from jobs group by 1")}
    assert counts == {"5Miner001": 6, "5Miner002": 8}


def test_without_a_suite_a_submission_makes_one_job_of_the_jobs_table(make_state):
    state = make_state(jobs={"env_provider": "gym", "env_name": "cartpole"})
    assert state.intake.add_commitments(snapshot(100, [commitment(1)])) == [1]
    [row] = state.db.query("select * from jobs")
    assert (row["env_provider"], row["env_name"], row["suite_entry"], row["suite_repeat"]) == \
        ("gym", "cartpole", 0, 0)


def test_a_submissions_jobs_are_served_together_oldest_submission_first(make_state):
    state = make_state(jobs={"suite": SUITE})
    state.register_child("c1", "127.0.0.1:9000")
    # The newer commitment comes first in the snapshot; the older one's jobs get the lower ids.
    state.intake.add_commitments(snapshot(100, [commitment(2, block=99),
                                                commitment(1, block=90)]))
    assert suite_jobs(state) == made("5Miner001", 1) + made("5Miner002", 7)
    served = [job["jobId"] for job in state.request_jobs("c1", 8)]
    assert served == list(range(1, 9))
    assert [job["envName"] for job in state.request_jobs("c1", 0, served)] == []


def test_a_superseded_submission_cancels_all_its_open_jobs(make_state):
    state = make_state(jobs={"suite": SUITE})
    state.register_child("c1", "127.0.0.1:9000")
    state.intake.add_commitments(snapshot(100, [commitment(1), commitment(2)]))
    assert [job["jobId"] for job in state.request_jobs("c1", 2)] == [1, 2]
    assert state.report_completion("c1", 2, True, '{"score": 1}') == (True, "recorded")
    assert state.statistics.stats()["open_submissions"] == 2
    new = state.intake.add_commitments(snapshot(101, [
        commitment(1, block=101, revision="e" * 40), commitment(2)]))
    assert new == list(range(13, 19))
    status = {row["job_id"]: (row["status"], row["result"]) for row in state.db.query(
        "select job_id, status, result from jobs where miner_hotkey = '5Miner001'")}
    assert status == {
        **{i: ("cancelled", '{"cancelled": "superseded by job 13"}') for i in (1, 3, 4, 5, 6)},
        2: ("completed", '{"score": 1}'),  # a job that ended is never touched
        **{i: ("pending", None) for i in range(13, 19)}}
    assert state.statistics.stats()["cancelled_jobs"] == {"superseded": 5}
    # The miner leaves: all six jobs of its newest submission go.
    state.intake.add_commitments(snapshot(102, [commitment(2)], {"5Miner002": 2}))
    assert [row["job_id"] for row in state.db.query(
        "select job_id from jobs where cancel_reason = 'deregistered' order by 1")] == \
        list(range(13, 19))
    assert state.statistics.stats()["open_submissions"] == 1


def test_two_submissions_of_a_miner_in_one_sync_keep_all_jobs_of_the_newest(make_state):
    state = make_state(jobs={"suite": SUITE})
    new = state.intake.add_commitments(snapshot(100, [
        commitment(1, block=95, revision="e" * 40), commitment(1, block=90)]))
    assert new == list(range(1, 13))
    assert {row["job_id"]: row["status"] for row in state.db.query(
        "select job_id, status from jobs")} == \
        {**{i: "cancelled" for i in range(1, 7)}, **{i: "pending" for i in range(7, 13)}}


def test_a_kill_9_mid_sync_makes_no_job_and_the_next_sync_makes_each_once(tmp_path, make_dsn):
    dsn = make_dsn()
    config = write_toml(tmp_path / "p.toml", {
        "pg_database": dsn, "is_parent_validator": True, "auth": "off",
        "subtensor": {"network": "file", "commitments_file": "unused.json"},
        "jobs": {"suite": SUITE}})
    # A sync of three submissions in statements of 4 rows: the process stops for good before
    # its third statement, with two of them done inside the open transaction.
    script = textwrap.dedent(f"""
        import itertools, sys, time
        sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / "tests")!r}]
        import chain, common, parent
        from conftest import commitment
        parent.JOBS_PER_STATEMENT = 4
        calls = []
        def islice(rows, n):
            calls.append(n)
            if len(calls) == 3:
                print("mid-sync", flush=True)
                time.sleep(600)
            return itertools.islice(rows, n)
        parent.itertools = type("patched", (), {{"islice": staticmethod(islice)}})
        state = parent.ParentState(common.Database({dsn!r}, parent.SCHEMA),
                                   common.load_config({str(config)!r}))
        state.intake.add_commitments(chain.ChainSnapshot(100, [
            chain.Commitment(**commitment(i)) for i in (1, 2, 3)]))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "mid-sync\n"
        proc.kill()
    finally:
        proc.wait(timeout=30)
    state = parent.ParentState(common.Database(dsn, parent.SCHEMA), common.load_config(config))
    assert state.db.query("select count(*) as n from jobs")[0]["n"] == 0
    state.intake.add_commitments(snapshot(100, [commitment(i) for i in (1, 2, 3)]))
    state.intake.add_commitments(snapshot(101, [commitment(i) for i in (1, 2, 3)]))
    rows = state.db.query("select miner_hotkey, suite_entry, suite_repeat, count(*) as n "
                          "from jobs group by 1, 2, 3")
    assert len(rows) == 18 and {row["n"] for row in rows} == {1}


def test_a_database_made_before_suites_upgrades_its_jobs_to_entry_0_repeat_0(make_dsn):
    dsn = make_dsn()
    old = common.Database(dsn, parent.SCHEMA[:-1])
    digest = parent.fingerprint("5Miner001", "org/model-1", f"{1:040x}")
    old.query("insert into jobs (fingerprint, submission_id, miner_hotkey, hf_repo_id, "
              "hf_repo_commit, commit_block, env_provider, env_name, random_seed, max_retries) "
              "values (%s, 1, '5Miner001', 'org/model-1', %s, 100, 'demo', 'demo-env', 7, 3)",
              (digest, f"{1:040x}"))
    old.close()
    db = common.Database(dsn, parent.SCHEMA)
    assert db.query("select job_id, suite_entry, suite_repeat from jobs") == \
        [{"job_id": 1, "suite_entry": 0, "suite_repeat": 0}]
    with db.transaction() as conn:
        conn.execute(parent.SCHEMA[-1])  # idempotent: a second run changes nothing
    assert db.query("select count(*) as n from jobs")[0]["n"] == 1


def test_after_the_upgrade_a_submission_made_before_makes_no_job_again(tmp_path, make_dsn):
    dsn = make_dsn()
    old = common.Database(dsn, parent.SCHEMA[:-1])
    old.query("insert into jobs (fingerprint, submission_id, miner_hotkey, hf_repo_id, "
              "hf_repo_commit, commit_block, env_provider, env_name, random_seed, max_retries) "
              "values (%s, 1, '5Miner001', 'org/model-1', %s, 100, 'demo', 'demo-env', 7, 3)",
              (parent.fingerprint("5Miner001", "org/model-1", f"{1:040x}"), f"{1:040x}"))
    old.close()
    config = write_toml(tmp_path / "p.toml", {
        "pg_database": dsn, "is_parent_validator": True, "auth": "off",
        "subtensor": {"network": "file", "commitments_file": "unused.json"},
        "jobs": {"suite": SUITE}})
    state = parent.ParentState(common.Database(dsn, parent.SCHEMA), common.load_config(config))
    assert state.intake.add_commitments(snapshot(100, [commitment(1), commitment(2)])) == \
        list(range(2, 8))


@pytest.mark.parametrize("suite, error", [
    ([SUITE[0], dict(SUITE[1], repeats=0)],
     "key 'jobs.suite[2].repeats' must be between 1 and 1000"),
    ([{"env_provider": "metaworld"}], "missing required key 'jobs.suite[1].env_name'"),
    ([dict(SUITE[0], weigth=1.0)], "unknown key 'jobs.suite[1].weigth'"),
    ([dict(SUITE[0], weight=0)], "key 'jobs.suite[1].weight' must be above 0"),
    ([dict(SUITE[0], repeats="3")], "key 'jobs.suite[1].repeats' must be an integer"),
    ([dict(SUITE[0], env_name=f"e{n}") for n in range(65)],
     "key 'jobs.suite' has 65 entries, more than 64"),
    ([dict(SUITE[0], repeats=1000, env_name=f"e{n}") for n in range(11)],
     "key 'jobs.suite' makes 11000 jobs per submission"),
])
def test_a_bad_suite_entry_is_refused_naming_the_file_and_the_key(tmp_path, suite, error):
    path = write_toml(tmp_path / "p.toml", {"pg_database": "x", "is_parent_validator": True,
                                             "jobs": {"suite": suite}})
    with pytest.raises(common.ConfigError) as refused:
        common.load_config(path)
    assert str(refused.value).startswith(f"{path}: ") and error in str(refused.value)


def test_a_suite_that_is_not_an_array_of_tables_is_refused(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('pg_database = "x"\nis_parent_validator = true\n[jobs]\nsuite = ["a"]\n')
    with pytest.raises(common.ConfigError, match=r"key 'jobs.suite' must be an array of "
                                                 r"tables \[\[jobs.suite\]\]"):
        common.load_config(path)
