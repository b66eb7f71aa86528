"""A submission's score (scores.py): per entry the mean of its repeats, with count and
standard error; the submission, the weighted mean of its entries once all its jobs are final;
failed jobs as failed_scores says; a miner's score over its submissions; `validator.py
scores`. On a real PostgreSQL, with jobs made by the parent's own chain intake."""

import json
import math
import subprocess
import sys

import pytest
from conftest import ROOT, commitment, write_chain

import chain as chains
import common
import parent as parents
import scores

SUITE = [{"env_provider": "demo", "env_name": "reach", "repeats": 3, "weight": 1.0},
         {"env_provider": "demo", "env_name": "push", "repeats": 2, "weight": 3.0}]


@pytest.fixture
def suite_state(make_state):
    """A parent state whose chain intake made the jobs of miners 1 and 2 on SUITE."""
    state = make_state(jobs={"suite": SUITE})
    state.intake.add_commitments(chains.ChainSnapshot(100, [
        chains.Commitment(**c) for c in (commitment(1), commitment(2))]))
    return state


def jobs_of(state, hotkey):
    return state.db.query("select job_id, suite_entry from jobs where miner_hotkey = %s "
                          "order by job_id", (hotkey,))


def finish(state, job_id, score=None, status="completed"):
    state.db.query("update jobs set status = %s, success = %s, result = %s, "
                   "finished_at = now() where job_id = %s",
                   (status, status == "completed", json.dumps(
                       {"score": score} if score is not None else {"error": "crashed"}),
                    job_id))


def test_the_worked_example_of_docs_weights(suite_state):
    """reach 0.2, 0.4, 0.6 and push 0.9, 0.7: 0.4 ± 0.115 and 0.8 ± 0.1, the submission 0.7."""
    jobs = jobs_of(suite_state, "5Miner001")
    assert [j["suite_entry"] for j in jobs] == [0, 0, 0, 1, 1]
    for job, score in zip(jobs, (0.2, 0.4, 0.6, 0.9, 0.7)):
        finish(suite_state, job["job_id"], score)
    settings = suite_state.cfg.weights
    [submission] = [s for s in scores.submission_scores(suite_state.db, settings).values()
                    if s.hotkey == "5Miner001"]
    reach, push = submission.entries[0], submission.entries[1]
    assert (reach.env, reach.weight, reach.count) == ("demo/reach", 1.0, 3)
    assert reach.mean == pytest.approx(0.4) and reach.stderr == pytest.approx(0.2 / math.sqrt(3))
    assert (push.weight, push.count, push.mean) == (3.0, 2, pytest.approx(0.8))
    assert push.stderr == pytest.approx(0.1)
    assert submission.score == pytest.approx(0.7)


def test_a_submission_counts_only_once_every_job_is_final(suite_state):
    jobs = jobs_of(suite_state, "5Miner001")
    for job in jobs[:-1]:
        finish(suite_state, job["job_id"], 1.0)
    settings = suite_state.cfg.weights
    neurons = [chains.Neuron(1, "5Miner001", 0), chains.Neuron(2, "5Miner002", 0)]
    assert chains.weight_table(suite_state.db, settings, neurons, set()) == []
    [s] = [s for s in scores.submission_scores(suite_state.db, settings).values()
           if s.hotkey == "5Miner001"]
    assert (s.score, s.why_not) == (None, "1 of its jobs are not finished")
    finish(suite_state, jobs[-1]["job_id"], 0.0)
    [row] = chains.weight_table(suite_state.db, settings, neurons, set())
    assert (row.uid, row.score, row.weight) == (1, pytest.approx((1 + 3 * 0.5) / 4), 1.0)


@pytest.mark.parametrize("failed_scores, expected", [
    ("zero", (1 * (0.5 + 0.5 + 0) / 3 + 3 * 0.5) / 4),  # the failure is a 0 in reach's mean
    ("skip", (1 * 0.5 + 3 * 0.5) / 4),                  # it is left out of it
])
def test_a_failed_job_scores_zero_or_is_left_out(suite_state, failed_scores, expected):
    jobs = jobs_of(suite_state, "5Miner001")
    for job in jobs:
        finish(suite_state, job["job_id"], 0.5)
    finish(suite_state, jobs[2]["job_id"], status="failed")
    suite_state.cfg.weights.failed_scores = failed_scores
    [s] = [s for s in scores.submission_scores(suite_state.db, suite_state.cfg.weights)
           .values() if s.hotkey == "5Miner001"]
    assert s.entries[0].failed == 1 and s.score == pytest.approx(expected)


def test_a_submission_with_a_cancelled_job_has_no_score(suite_state):
    jobs = jobs_of(suite_state, "5Miner001")
    for job in jobs[1:]:
        finish(suite_state, job["job_id"], 0.5)
    with suite_state.db.transaction() as conn:
        parents.cancel_jobs(conn, "operator", "select %s::bigint, 'by hand'",
                            (jobs[0]["job_id"],))
    [s] = [s for s in scores.submission_scores(suite_state.db, suite_state.cfg.weights)
           .values() if s.hotkey == "5Miner001"]
    assert (s.score, s.why_not) == (None, "1 of its jobs were cancelled")


def test_a_changed_suite_weight_does_not_change_a_submission_made_before(suite_state):
    jobs = jobs_of(suite_state, "5Miner001")
    for job, score in zip(jobs, (1.0, 1.0, 1.0, 0.0, 0.0)):
        finish(suite_state, job["job_id"], score)
    suite_state.cfg.jobs.suite[1].weight = 1.0  # an operator's change, after the fact
    [s] = [s for s in scores.submission_scores(suite_state.db, suite_state.cfg.weights)
           .values() if s.hotkey == "5Miner001"]
    assert s.score == pytest.approx(0.25)  # weights 1 and 3, as they were when it was made


def test_the_scores_command_shows_each_entry_and_the_weight(suite_state, tmp_path):
    for hotkey, values in (("5Miner001", (0.2, 0.4, 0.6, 0.9, 0.7)),
                           ("5Miner002", (0.1, 0.1, 0.1, 0.1, 0.1))):
        for job, score in zip(jobs_of(suite_state, hotkey), values):
            finish(suite_state, job["job_id"], score)
    config = tmp_path / "parent-scores.toml"
    write_chain(tmp_path / "chain.json", 100, [])
    config.write_text(f"is_parent_validator = true\nauth = 'off'\npg_database = "
                      f"'{suite_state.db.dsn}'\n[subtensor]\nnetwork = 'file'\n"
                      f"commitments_file = '{tmp_path / 'chain.json'}'\n")
    run = subprocess.run([sys.executable, ROOT / "validator.py", "scores", "--config", config,
                          "--json"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    one, two = doc["miners"]
    assert (one["hotkey"], one["score"], two["score"]) == \
        ("5Miner001", pytest.approx(0.7), pytest.approx(0.1))
    assert one["weight"] == pytest.approx(0.7 / 0.8)
    reach = one["submission"]["entries"][0]
    assert (reach["env"], reach["count"], reach["mean"], reach["stderr"]) == \
        ("demo/reach", 3, pytest.approx(0.4), pytest.approx(0.2 / math.sqrt(3)))
    text = subprocess.run([sys.executable, ROOT / "validator.py", "scores", "--config", config],
                          capture_output=True, text=True, timeout=60).stdout
    assert "5Miner001  score 0.7000  weight 0.8750" in text
    assert "demo/reach  weight 1  0.4000 ± 0.1155  (3 scores)" in text
    assert "demo/push  weight 3  0.8000 ± 0.1000  (2 scores)" in text
    assert common.load_config(config).weights.failed_scores == "zero"
