"""The child's evaluator: one real process per job, JSON in, one JSON object out."""

import json
import sys
import threading
import time
import types

import pytest
from conftest import wait_until

import common
import evaluator

JOB = {"jobId": 5, "hfRepoId": "org/model", "hfRepoCommit": "abc", "randomSeed": 7,
       "logsPath": "../../escape/job-5.log"}


def config(command=(), timeout=10.0, **evaluator_keys):
    """The evaluator's keys as load_config gives them: the defaults, and these."""
    keys = {key: rule[1] for key, rule in common.CONFIG_KEYS["evaluator"].items()}
    keys.update(command=list(command), timeout_seconds=timeout, demo_seconds=0.0,
                **evaluator_keys)
    return types.SimpleNamespace(max_result_bytes=1000,
                                 evaluator=types.SimpleNamespace(**keys))


def python(code):
    return [sys.executable, "-c", code]


def test_the_evaluator_gets_the_job_on_stdin_and_its_stdout_is_the_result(tmp_path):
    code = ("import json, sys; job = json.load(sys.stdin); "
            "print('working', file=sys.stderr); "
            "print(json.dumps({'score': 0.25, 'repo': job['hfRepoId']}))")
    success, result, retryable = evaluator.evaluate(config(python(code)), JOB, tmp_path)
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
     "evaluator printed more than max_result_bytes (1000 bytes) and was stopped"),
])
def test_a_failing_evaluator_is_a_failed_job_with_the_reason(tmp_path, code, reason):
    success, result, retryable = evaluator.evaluate(config(python(code), timeout=0.5), JOB,
                                                    tmp_path)
    assert (success, retryable) == (False, False)  # the miner's failure: final
    assert json.loads(result) == {"error": reason}


def test_an_evaluator_that_cannot_start_is_a_failed_job(tmp_path):
    success, result, retryable = evaluator.evaluate(config(["/nonexistent/evaluator"]), JOB,
                                                    tmp_path)
    assert (success, retryable) == (False, True)  # not the miner's failure
    assert json.loads(result)["error"].startswith("cannot start the evaluator")


def test_the_demo_evaluator_scores_the_same_submission_the_same(tmp_path):
    first = evaluator.evaluate(config(), JOB, tmp_path)
    assert first == evaluator.evaluate(config(), dict(JOB), tmp_path)
    assert json.loads(first[1])["evaluator"] == "demo"
    other = evaluator.evaluate(config(), dict(JOB, hfRepoCommit="def"), tmp_path)
    assert other != first


def test_an_evaluator_that_prints_without_end_is_stopped_at_max_result_bytes(tmp_path):
    """It would fill the child's memory if its output were read whole before the check."""
    code = "import sys\nwhile True: sys.stdout.write('x' * 65536)"
    cfg = config(python(code), timeout=60.0)
    success, result, retryable = evaluator.evaluate(cfg, JOB, tmp_path)
    assert (success, json.loads(result)) == (False, {
        "error": "evaluator printed more than max_result_bytes (1000 bytes) and was stopped"})


def test_what_an_evaluator_leaves_behind_does_not_hold_the_evaluation(tmp_path):
    """A process the evaluator started and left holding its stdout is killed with its group,
    so the evaluation ends when the evaluator does."""
    code = ("import subprocess, sys; subprocess.Popen([sys.executable, '-c', "
            "'import time; time.sleep(120)']); print('{\"score\": 1}')")
    success, result, retryable = evaluator.evaluate(config(python(code), timeout=60.0), JOB,
                                                    tmp_path)
    assert (success, json.loads(result)) == (True, {"score": 1})


def test_the_evaluation_ends_when_the_evaluator_exits_not_at_a_later_look(tmp_path,
                                                                          monkeypatch):
    """Popen.wait(timeout) looks for the exit between naps of up to 50 ms, and each job's end
    waited for the next look. The evaluation is woken by the exit itself: the thread that
    runs it never naps (and a timeout still stops a hung evaluator)."""
    naps, sleep, me = [], time.sleep, threading.get_ident()

    def counted_sleep(seconds):
        if threading.get_ident() == me:
            naps.append(seconds)
        sleep(seconds)

    monkeypatch.setattr(time, "sleep", counted_sleep)
    code = "import sys, time; sys.stdin.read(); time.sleep(0.3); print('{\"score\": 1}')"
    success, result, retryable = evaluator.evaluate(config(python(code)), JOB, tmp_path)
    assert (success, json.loads(result)) == (True, {"score": 1})
    assert naps == []
    success, result, retryable = evaluator.evaluate(config(python("import time; time.sleep(60)"),
                                            timeout=0.5), JOB, tmp_path)
    assert (success, json.loads(result)) == (False, {"error": "evaluator timed out after 0.5s"})


def test_the_evaluator_has_its_job_before_its_process_group_is_recorded(tmp_path):
    """Recording the evaluator's process group is a database transaction: the evaluator
    works meanwhile. Here the recording waits for the evaluator to have read its job."""
    got_job = tmp_path / "got-job"
    code = (f"import sys, pathlib; sys.stdin.read(); pathlib.Path({str(got_job)!r}).touch(); "
            "print('{\"score\": 1}')")
    recorded = []

    def record(job_id, group, gpus=None):
        wait_until(got_job.exists, 10, "the evaluator to read its job")
        recorded.append(job_id)

    running = evaluator.Evaluations(record)
    success, result, retryable = evaluator.evaluate(config(python(code)), JOB, tmp_path, running)
    assert (success, json.loads(result)) == (True, {"score": 1})
    assert recorded == [5]
