"""The evaluator contract, on real processes (README, "The evaluator"): a bounded log, a
graceful stop, GPUs of its own, what it is told, and which failures are the miner's."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest
from conftest import wait_until

import child
import common
import evaluator

JOB = {"jobId": 5, "hfRepoId": "org/model", "hfRepoCommit": "abc", "randomSeed": 7,
       "logsPath": "job-5.log", "attempt": 2, "retryCount": 1}


def config(command=(), timeout=30.0, max_result_bytes=1000, **evaluator_keys):
    """The keys evaluate() reads, as load_config gives them: the defaults, and these."""
    keys = {key: rule[1] for key, rule in common.CONFIG_KEYS["evaluator"].items()}
    keys.update(command=list(command), timeout_seconds=timeout, demo_seconds=0.0,
                **evaluator_keys)
    return types.SimpleNamespace(max_result_bytes=max_result_bytes,
                                 evaluator=types.SimpleNamespace(**keys))


def python(code):
    return [sys.executable, "-c", code]


@pytest.fixture
def logs(tmp_path):
    (tmp_path / "logs").mkdir()
    return evaluator.LogsDirectory(tmp_path / "logs")


# -- bounded logs -------------------------------------------------------------------------------

LIMIT = 8192
KEPT = LIMIT - evaluator.DROPPED_ROOM  # what fits without a line about dropped bytes


def writer(size):
    """An evaluator that writes `size` bytes of numbered lines to stderr, then succeeds."""
    return python(f"import sys\ndata = b''.join(b'%07d\\n' % i for i in range({size} // 8 + 1))"
                  f"[:{size}]\nsys.stderr.buffer.write(data)\nprint('{{\"score\": 1}}')")


def written(size):
    return b"".join(b"%07d\n" % i for i in range(size // 8 + 1))[:size]


def test_a_log_that_fits_is_kept_whole(tmp_path, logs):
    ended = evaluator.evaluate(config(writer(KEPT), max_log_bytes=LIMIT), JOB, logs)
    assert ended == (True, '{"score": 1}', False)
    assert (tmp_path / "logs" / "job-5.log").read_bytes() == written(KEPT)


@pytest.mark.parametrize("size", [KEPT + 1, 3_000_000])
def test_a_log_past_max_log_bytes_keeps_its_first_and_newest_halves(tmp_path, logs, size):
    ended = evaluator.evaluate(config(writer(size), max_log_bytes=LIMIT), JOB, logs)
    assert ended.success
    kept = (tmp_path / "logs" / "job-5.log").read_bytes()
    assert len(kept) <= LIMIT
    data, head, tail = written(size), LIMIT // 2, KEPT - LIMIT // 2
    line = (f"\n[... the child validator dropped {size - KEPT} bytes of this log here "
            f"(max_log_bytes is {LIMIT}) ...]\n").encode()
    assert kept == data[:head] + line + data[-tail:]


def test_a_log_that_cannot_be_written_costs_the_evaluator_nothing(tmpfs):
    """On a full disk the evaluator's writes to stderr still succeed (the child reads the
    pipe), and the evaluation ends as the evaluator says."""
    full = tmpfs("1m")
    with open(full / "ballast", "wb") as ballast:
        with pytest.raises(OSError):
            while True:
                ballast.write(b"\0" * 65536)
                ballast.flush()
    logs = evaluator.LogsDirectory(full)
    code = ("import sys\nfor _ in range(64): sys.stderr.write('x' * 65536)\n"
            "print('{\"score\": 0.5}')")
    ended = evaluator.evaluate(config(python(code), max_log_bytes=1 << 20), JOB, logs)
    assert ended == (True, '{"score": 0.5}', False)


def test_the_logs_directory_deletes_its_oldest_logs_past_its_total(tmp_path, caplog):
    directory = tmp_path / "logs"
    directory.mkdir()
    now = time.time()
    for n in range(10):  # 10 old logs of 100 kB, oldest first
        path = directory / f"job-{100 + n}.log"
        path.write_bytes(b"x" * 100_000)
        os.utime(path, (now - 1000 + n, now - 1000 + n))
    logs = evaluator.LogsDirectory(directory, total_limit=500_000)
    ended = evaluator.evaluate(config(writer(50_000), max_log_bytes=1 << 20), JOB, logs)
    assert ended.success
    left = sorted(path.name for path in directory.iterdir())
    total = sum(path.stat().st_size for path in directory.iterdir())
    assert total <= 500_000 * 0.9
    assert "job-5.log" in left  # the newest stays
    assert left == sorted(["job-5.log"] + [f"job-{100 + n}.log" for n in range(10 - len(left) + 1,
                                                                                   10)])
    assert "Deleted the 6 oldest evaluator logs (0.6 MB): the logs directory was over " \
        "max_logs_total_mb" in caplog.text


def test_a_log_being_written_is_never_deleted(tmp_path):
    directory = tmp_path / "logs"
    directory.mkdir()
    logs = evaluator.LogsDirectory(directory, total_limit=10_000)
    with logs.open(9, {"logsPath": "job-9.log"}, 1 << 20) as open_log:
        open_log._take(b"y" * 50_000)
        logs.added(50_000)  # another evaluation ended: the directory is over its total
        assert (directory / "job-9.log").exists()
    logs.added(0)
    assert not (directory / "job-9.log").exists()  # closed, and over the total alone


def test_logs_older_than_retention_days_are_deleted(tmp_path):
    directory = tmp_path / "logs"
    directory.mkdir()
    old, new = directory / "job-1.log", directory / "job-2.log"
    old.write_text("old")
    new.write_text("new")
    os.utime(old, (time.time() - 8 * 86400,) * 2)
    assert evaluator.LogsDirectory(directory).prune(7) == 1
    assert [path.name for path in directory.iterdir()] == ["job-2.log"]


def test_a_log_name_from_the_parent_stays_inside_the_logs_directory(tmp_path, logs):
    for name in ("../../escape/job-5.log", "..", ".", ""):
        assert logs.file_of(5, {"logsPath": name}).parent == tmp_path / "logs"


# -- what an evaluator is told ------------------------------------------------------------------

TELL = """
import json, os, sys
from pathlib import Path
job = json.load(sys.stdin)
scratch = Path(os.environ["VALIDATOR_SCRATCH_DIR"])
(scratch / "work").write_text("mine")
print(json.dumps({"score": 1, "files": sorted(p.name for p in scratch.iterdir()),
                  **{k: v for k, v in os.environ.items() if k.startswith("VALIDATOR_")
                     or k.endswith("VISIBLE_DEVICES")}}))
"""


def test_the_evaluator_is_told_its_job_attempt_scratch_directory_and_deadline(tmp_path, logs):
    (tmp_path / "scratch" / "job-5").mkdir(parents=True)
    (tmp_path / "scratch" / "job-5" / "left-over").write_text("from a run that died")
    began = time.time()
    ended = evaluator.evaluate(config(python(TELL), timeout=600, stop_grace_seconds=7),
                               JOB, logs)
    told = json.loads(ended.result)
    assert told["files"] == ["work"]  # made empty for it
    assert (told["VALIDATOR_JOB_ID"], told["VALIDATOR_ATTEMPT"],
            told["VALIDATOR_RETRY_COUNT"], told["VALIDATOR_STOP_GRACE_SECONDS"]) == \
        ("5", "2", "1", "7")
    assert told["VALIDATOR_SCRATCH_DIR"] == str(tmp_path / "scratch" / "job-5")
    assert began + 600 <= float(told["VALIDATOR_DEADLINE"]) <= time.time() + 600
    assert not (tmp_path / "scratch" / "job-5").exists()  # deleted after
    assert "CUDA_VISIBLE_DEVICES" not in told or told["CUDA_VISIBLE_DEVICES"] == \
        os.environ.get("CUDA_VISIBLE_DEVICES")  # without gpus: the child's environment


def test_gpus_are_handed_out_per_job_and_never_shared(tmp_path, logs):
    pool = evaluator.GpuPool(["0", "1", "2", "3"], 2)
    running = evaluator.Evaluations(gpus=pool)
    results = []
    code = TELL.replace('print(', 'import time; time.sleep(0.5); print(')

    def one(job_id):
        results.append(json.loads(evaluator.evaluate(config(python(code)), JOB | {
            "jobId": job_id, "logsPath": ""}, logs, running).result))

    threads = [threading.Thread(target=one, args=(job_id,)) for job_id in (10, 11)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seen = sorted(r["CUDA_VISIBLE_DEVICES"] for r in results)
    assert seen == ["0,1", "2,3"]
    assert all(r["NVIDIA_VISIBLE_DEVICES"] == r["CUDA_VISIBLE_DEVICES"] for r in results)
    assert sorted(pool.free) == ["0", "1", "2", "3"]  # all given back


# -- what an evaluator's end means --------------------------------------------------------------

@pytest.mark.parametrize("code, reason, retryable", [
    ("import sys; sys.exit(75)",
     "evaluator exited with code 75 (EX_TEMPFAIL: a transient failure)", True),
    ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)",
     "evaluator was killed by SIGKILL, which the child did not send (the kernel's OOM "
     "killer, or an operator)", True),
    ("import sys; sys.exit(1)", "evaluator exited with code 1", False),
    ("print('no json')", "evaluator did not print one JSON object on stdout", False),
])
def test_a_failure_that_is_not_the_miners_is_retryable(logs, code, reason, retryable):
    ended = evaluator.evaluate(config(python(code)), JOB, logs)
    assert ended == (False, json.dumps({"error": reason}), retryable)


def test_a_timeout_is_the_miners_failure_whatever_the_evaluator_exits_with(logs):
    code = ("import signal, sys, time\nsignal.signal(signal.SIGTERM, lambda *_: sys.exit(75))\n"
            "time.sleep(60)")
    ended = evaluator.evaluate(config(python(code), timeout=0.5), JOB, logs)
    assert ended == (False, '{"error": "evaluator timed out after 0.5s"}', False)


# -- a graceful stop ----------------------------------------------------------------------------

TRAPS_SIGTERM = """
import json, signal, sys, time
from pathlib import Path
marker = Path(sys.argv[1])
def clean_up(*_):
    time.sleep(0.3)  # stops its container, say
    marker.write_text("cleaned up")
    sys.exit(0)
signal.signal(signal.SIGTERM, clean_up)
Path(str(marker) + ".started").touch()
time.sleep(60)
"""

IGNORES_SIGTERM = """
import signal, sys, time
from pathlib import Path
signal.signal(signal.SIGTERM, signal.SIG_IGN)
Path(sys.argv[1] + ".started").touch()
time.sleep(60)
"""


def evaluation_in_a_thread(cfg, logs, running, job=JOB):
    outcome = {}

    def run():
        began = time.monotonic()
        try:
            outcome["ended"] = evaluator.evaluate(cfg, job, logs, running)
        except (evaluator.Revoked, evaluator.Abandoned) as e:
            outcome["raised"] = type(e)
        outcome["seconds"] = time.monotonic() - began
    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


@pytest.mark.parametrize("how", ["timeout", "revoke", "shutdown"])
def test_a_stopped_evaluator_gets_sigterm_and_cleans_up_within_the_grace(tmp_path, logs, how):
    marker = tmp_path / "marker"
    cfg = config([*python(TRAPS_SIGTERM), str(marker)], stop_grace_seconds=20,
                 timeout=1.0 if how == "timeout" else 60)
    running = evaluator.Evaluations()
    running.begin(JOB["jobId"])
    thread, outcome = evaluation_in_a_thread(cfg, logs, running)
    wait_until(Path(f"{marker}.started").exists, 20, "the evaluator to start")
    if how == "revoke":
        running.revoke(JOB["jobId"], "cancelled by the operator")
    elif how == "shutdown":
        assert running.abandon() == 1
    thread.join(30)
    assert marker.read_text() == "cleaned up"
    assert outcome["seconds"] < 20  # it did not wait out the grace: its exit ended the stop
    assert outcome.get("raised") == {"timeout": None, "revoke": evaluator.Revoked,
                                     "shutdown": evaluator.Abandoned}[how]
    if how == "timeout":
        assert outcome["ended"] == (False, '{"error": "evaluator timed out after 1s"}', False)


def test_an_evaluator_that_ignores_sigterm_is_killed_after_the_grace(tmp_path, logs):
    marker = tmp_path / "marker"
    cfg = config([*python(IGNORES_SIGTERM), str(marker)], stop_grace_seconds=1.0, timeout=60)
    running = evaluator.Evaluations()
    running.begin(JOB["jobId"])
    thread, outcome = evaluation_in_a_thread(cfg, logs, running)
    wait_until(Path(f"{marker}.started").exists, 20, "the evaluator to start")
    pid = running.processes[JOB["jobId"]].proc.pid
    stopped = time.monotonic()
    running.revoke(JOB["jobId"], "taken back")
    thread.join(30)
    assert time.monotonic() - stopped >= 1.0  # it had its grace
    assert outcome["raised"] is evaluator.Revoked
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)


def test_the_grace_covers_the_evaluators_whole_group(tmp_path, logs):
    """The evaluator exits at once on SIGTERM; a process it started (its container's client)
    takes a while to clean up: the evaluation, and its GPUs, end only when that one has."""
    helper = tmp_path / "helper.py"
    helper.write_text(TRAPS_SIGTERM)
    marker = tmp_path / "marker"
    code = (f"import subprocess, sys, time\nsubprocess.Popen([sys.executable, {str(helper)!r}, "
            f"{str(marker)!r}])\ntime.sleep(60)")
    pool = evaluator.GpuPool(["0"], 1)
    running = evaluator.Evaluations(gpus=pool)
    running.begin(JOB["jobId"])
    thread, outcome = evaluation_in_a_thread(config(python(code), stop_grace_seconds=20),
                                             logs, running)
    wait_until(Path(f"{marker}.started").exists, 20, "the helper to start")
    assert pool.free == []
    running.revoke(JOB["jobId"], "taken back")
    thread.join(30)
    assert marker.read_text() == "cleaned up"  # it had its time, though its parent had gone
    assert pool.free == ["0"]


# -- the child's keys ---------------------------------------------------------------------------

@pytest.mark.parametrize("keys, error", [
    ({"gpus": ["0", "1", "0"]}, "key 'evaluator.gpus' lists GPU '0' twice"),
    ({"gpus": ["0"], "gpus_per_job": 2},
     "key 'evaluator.gpus_per_job' is 2, more than the 1 GPUs of evaluator.gpus"),
    ({"max_log_bytes": 4095}, "key 'evaluator.max_log_bytes' must be between 4096"),
    ({"stop_grace_seconds": -1}, "key 'evaluator.stop_grace_seconds' must be between 0"),
])
def test_a_bad_evaluator_key_names_the_key_and_the_file(tmp_path, keys, error):
    path = tmp_path / "child.toml"
    path.write_text("validator_id = 'c1'\npg_database = 'embedded'\nauth = 'off'\n"
                    "[evaluator]\n" + "".join(
        f"{key} = {json.dumps(value)}\n" for key, value in keys.items()))
    with pytest.raises(common.ConfigError) as raised:
        child.check_limits(common.load_config(path))
    assert str(raised.value).startswith(f"{path}: {error}")


@pytest.mark.parametrize("gpus, per_job, concurrent, slots", [
    ([], 1, 4, 4), (["0", "1", "2"], 1, 4, 3), (["0", "1", "2", "3"], 2, 4, 2),
    (["0", "1", "2", "3"], 1, 2, 2)])
def test_a_child_runs_no_more_evaluations_than_it_has_gpus_for(gpus, per_job, concurrent,
                                                                slots):
    cfg = types.SimpleNamespace(max_concurrent_jobs=concurrent, evaluator=types.SimpleNamespace(
        gpus=gpus, gpus_per_job=per_job))
    assert child.evaluation_slots(cfg) == slots


def test_evaluators_start_without_a_python_preexec_fn(tmp_path, logs, monkeypatch):
    """A preexec_fn makes CPython fork the whole child validator for each evaluator; setpriv
    (util-linux) asks for the parent-death signal instead, after a vfork."""
    assert evaluator.SETPRIV, "setpriv (util-linux) is missing on this machine"
    options = []
    popen = subprocess.Popen

    def recorded(*args, **kwargs):
        options.append((args[0], kwargs.get("preexec_fn")))
        return popen(*args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", recorded)
    # PR_GET_PDEATHSIG (2): the signal the evaluator gets when the child's thread dies.
    code = ("import ctypes, json\nsignal = ctypes.c_int()\n"
            "ctypes.CDLL(None).prctl(2, ctypes.byref(signal))\n"
            "print(json.dumps({'score': 1, 'pdeathsig': signal.value}))")
    ended = evaluator.evaluate(config(python(code)), JOB, logs)
    assert json.loads(ended.result) == {"score": 1, "pdeathsig": signal.SIGKILL}
    [(command, preexec_fn)] = options
    assert command[:4] == [evaluator.SETPRIV, "--pdeathsig", "KILL", "--"]
    assert preexec_fn is None
    # A child that died before setpriv set the signal: its evaluator's parent is no longer
    # the child, and the evaluator does not run.
    ran = tmp_path / "ran"
    assert subprocess.run(["/bin/sh", "-c", evaluator.STILL_OURS, "1", "touch", ran]) \
        .returncode == 1
    assert not ran.exists()
