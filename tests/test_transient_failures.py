"""Transient failures end to end (issue 26), through a real parent and real children with
their evaluators: exit 75 once is retried on another child and completes; exit 75 every time
ends failed after maxRetries with every reason; exit 1 is final at once; the example evaluator's
failed download is retried; a child whose evaluations all fail transiently rests."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import commitment, wait_until, write_chain

import common

ROOT = Path(__file__).resolve().parent.parent

# Exits with the code its first argument names for its first `times` runs (counted in a file
# per job), then succeeds. Each run records the child that ran it.
EVALUATOR = """
import json, os, sys
from pathlib import Path
code, times, here, name = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
job = json.load(sys.stdin)
runs = here / f"runs-{job['jobId']}"
with open(runs, "a") as f:
    f.write(f"{name} {os.environ['VALIDATOR_ATTEMPT']}\\n")
if len(runs.read_text().split("\\n")) - 1 <= times:
    print(f"run on {name} fails with {code}", file=sys.stderr)
    sys.exit(code)
print(json.dumps({"score": 0.5, "child": name}))
"""


def start(tmp_path, parent_config, child_config, processes, code, times, names=("c1", "c2"),
          commitments=1, **parent_keys):
    script = tmp_path / "evaluator.py"
    script.write_text(textwrap.dedent(EVALUATOR))
    write_chain(tmp_path / "chain.json", 100, [commitment(i) for i in range(1, commitments + 1)])
    config = parent_config(**{"jobs": {"retry_backoff_seconds": 0.3, "max_retries": 2},
                              **parent_keys})
    parent = processes(["parent.py", "--config", config], tmp_path / "parent.log")
    port = common.load_config(config).parent_port
    children = {}
    for name in names:
        path = child_config(name, port, evaluator={"command": [
            sys.executable, str(script), str(code), str(times), str(tmp_path), name]})
        children[name] = processes(["child.py", "--config", path], tmp_path / f"{name}.log")
        children[name].wait_for_log(f"Successfully registered with parent validator as {name}")
    return config, parent, children


def jobs(config):
    done = subprocess.run([sys.executable, ROOT / "validator.py", "jobs", "--config", config,
                           "--json"], capture_output=True, text=True, check=True)
    return {job["job_id"]: job for job in json.loads(done.stdout)}


def settled(config, job_id=1):
    job = jobs(config).get(job_id)
    return job if job and job["status"] in ("completed", "failed") else None


def test_exit_75_once_is_retried_on_another_child_and_completes(
        tmp_path, parent_config, child_config, processes):
    # A backoff of 1 s: for 1 s after it, the job is for c2 only, which a busy machine needs.
    config, parent, _ = start(tmp_path, parent_config, child_config, processes, 75, 1,
                              jobs={"retry_backoff_seconds": 1.0, "max_retries": 2})
    job = wait_until(lambda: settled(config), 60, "job 1 settled")
    assert job["status"] == "completed"
    first, second = job["attempts"]
    assert (first["outcome"], second["outcome"]) == ("retryable", "completed")
    assert first["child_id"] != second["child_id"]  # another child was free: it went there
    assert "evaluator exited with code 75" in first["reason"]
    assert json.loads(job["result"]) == {"score": 0.5, "child": second["child_id"]}
    runs = (tmp_path / "runs-1").read_text().split()
    assert runs == [first["child_id"], "1", second["child_id"], "2"]
    parent.wait_for_log(rf"Job 1 failed transiently on child {first['child_id']} \(attempt 1 "
                        r"of 3\): evaluator exited with code 75")


def test_exit_75_every_time_fails_after_max_retries_with_every_reason(
        tmp_path, parent_config, child_config, processes):
    config, parent, _ = start(tmp_path, parent_config, child_config, processes, 75, 99)
    job = wait_until(lambda: settled(config), 60, "job 1 settled")
    assert job["status"] == "failed"
    assert [a["outcome"] for a in job["attempts"]] == ["retryable"] * 3  # max_retries 2
    result = json.loads(job["result"])
    assert result["error"].startswith("gave up after 3 attempts")
    assert [a["reason"] for a in result["attempts"]] == \
        ["evaluator exited with code 75 (EX_TEMPFAIL: a transient failure)"] * 3
    parent.wait_for_log("Job 1 failed after 3 attempts, every one transient")


def test_exit_1_is_the_miners_failure_and_final_at_once(
        tmp_path, parent_config, child_config, processes):
    config, _, _ = start(tmp_path, parent_config, child_config, processes, 1, 1)
    job = wait_until(lambda: settled(config), 60, "job 1 settled")
    assert job["status"] == "failed"
    assert [a["outcome"] for a in job["attempts"]] == ["failed"]
    assert json.loads(job["result"]) == {"error": "evaluator exited with code 1"}


def test_a_child_whose_evaluations_all_fail_transiently_rests_and_comes_back(
        tmp_path, parent_config, child_config, processes):
    config, parent, children = start(
        tmp_path, parent_config, child_config, processes, 75, 1, names=("c1",), commitments=2,
        unhealthy_after=2, rest_seconds=1.0)
    parent.wait_for_log(r"Child c1 rests for 1s: its last 2 evaluations failed transiently")
    parent.wait_for_log("Child c1 rested; it gets jobs again")
    wait_until(lambda: settled(config, 1) and settled(config, 2), 60, "both jobs settled")
    assert {job["status"] for job in jobs(config).values()} == {"completed"}


def test_the_example_evaluator_retries_a_failed_download_then_gives_up(
        tmp_path, parent_config, child_config, processes, monkeypatch):
    monkeypatch.setenv("MODEL_URL", f"file://{tmp_path}/missing/{{repo}}/{{revision}}")
    write_chain(tmp_path / "chain.json", 100, [commitment(1)])
    config = parent_config(jobs={"retry_backoff_seconds": 0.2, "max_retries": 1})
    processes(["parent.py", "--config", config], tmp_path / "parent.log")
    path = child_config("c1", common.load_config(config).parent_port, evaluator={
        "command": [sys.executable, str(ROOT / "examples" / "evaluator.py")]})
    processes(["child.py", "--config", path], tmp_path / "c1.log")
    job = wait_until(lambda: settled(config), 60, "job 1 settled")
    assert (job["status"], [a["outcome"] for a in job["attempts"]]) == \
        ("failed", ["retryable", "retryable"])
