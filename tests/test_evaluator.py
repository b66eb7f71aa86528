"""The child's evaluator: one real process per job, JSON in, one JSON object out."""

import json
import sys
import types

import pytest

import child

JOB = {"jobId": 5, "hfRepoId": "org/model", "hfRepoCommit": "abc", "randomSeed": 7,
       "logsPath": "../../escape/job-5.log"}


def config(command=(), timeout=10.0):
    return types.SimpleNamespace(max_result_bytes=1000, evaluator=types.SimpleNamespace(
        command=list(command), timeout_seconds=timeout, demo_seconds=0.0))


def python(code):
    return [sys.executable, "-c", code]


def test_the_evaluator_gets_the_job_on_stdin_and_its_stdout_is_the_result(tmp_path):
    code = ("import json, sys; job = json.load(sys.stdin); "
            "print('working', file=sys.stderr); "
            "print(json.dumps({'score': 0.25, 'repo': job['hfRepoId']}))")
    success, result = child.evaluate(config(python(code)), JOB, tmp_path)
    assert success is True
    assert json.loads(result) == {"score": 0.25, "repo": "org/model"}
    # stderr goes to the job's log file, kept inside logs_dir whatever logsPath says
    assert (tmp_path / "job-5.log").read_text() == "working\n"


@pytest.mark.parametrize("code, reason", [
    ("import sys; sys.exit(3)", "evaluator exited with code 3"),
    ("print('not json')", "evaluator did not print one JSON object on stdout"),
    ("print('[1, 2]')", "evaluator did not print one JSON object on stdout"),
    ("import time; time.sleep(30)", "evaluator timed out after 0.5s"),
    ("print('{\"x\": \"' + 'y' * 2000 + '\"}')",
     "evaluator printed 2010 bytes; max_result_bytes is 1000"),
])
def test_a_failing_evaluator_is_a_failed_job_with_the_reason(tmp_path, code, reason):
    success, result = child.evaluate(config(python(code), timeout=0.5), JOB, tmp_path)
    assert success is False
    assert json.loads(result) == {"error": reason}


def test_an_evaluator_that_cannot_start_is_a_failed_job(tmp_path):
    success, result = child.evaluate(config(["/nonexistent/evaluator"]), JOB, tmp_path)
    assert success is False
    assert json.loads(result)["error"].startswith("cannot start the evaluator")


def test_the_demo_evaluator_scores_the_same_submission_the_same(tmp_path):
    first = child.evaluate(config(), JOB, tmp_path)
    assert first == child.evaluate(config(), dict(JOB), tmp_path)
    assert json.loads(first[1])["evaluator"] == "demo"
    other = child.evaluate(config(), dict(JOB, hfRepoCommit="def"), tmp_path)
    assert other != first
