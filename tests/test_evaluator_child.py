"""The evaluator contract through real child validators: a flood of logs on a small disk, the
disk guard, GPUs shared out, a shutdown the evaluator cleans up after, the example evaluator,
and a failure that is not the miner's reported as such and signed."""

import json
import os
import shutil
import signal
import sys
import textwrap
import threading
import types
import urllib.request
from pathlib import Path

from conftest import free_port, wait_until
from test_child import start_both

import test_child
import test_security as security

import auth
import child
import common
import evaluator

ROOT = Path(__file__).resolve().parent.parent
# The fixtures: a parent and a child configured (cluster), the tests' hotkeys (wallets).
cluster, wallets = test_child.cluster, security.wallets

FLOOD = """
import json, sys
job = json.load(sys.stdin)
chunk = ("tqdm " * 13107 + "\\n")[:65536]
for _ in range(int(sys.argv[1]) // 65536):
    sys.stderr.write(chunk)
print(json.dumps({"score": 1}))
"""


def write(path, code):
    path.write_text(textwrap.dedent(code))
    return str(path)


def test_a_flood_of_stderr_on_a_small_disk_completes_every_job_with_its_log_capped(
        cluster, tmp_path, tmpfs):
    """Six evaluators writing 20 MB of stderr each, on a 48 MB data_dir: each log is capped,
    the logs' total too, and the disk never fills."""
    data = tmpfs("48m")
    c = cluster(6, data_dir=str(data), max_concurrent_jobs=3, min_free_disk_mb=8, evaluator={
        "command": [sys.executable, write(tmp_path / "flood.py", FLOOD), str(20 << 20)],
        "max_log_bytes": 1 << 20, "max_logs_total_mb": 4})
    lowest, done = [shutil.disk_usage(data).free], threading.Event()

    def watch():
        while not done.wait(0.01):
            lowest.append(min(lowest[-1], shutil.disk_usage(data).free))
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        start_both(c)
        wait_until(lambda: set(c.parent_status().values()) == {"completed"}, 120,
                   "every job completed")
    finally:
        done.set()
        watcher.join()
    logs = list((data / "logs").iterdir())
    assert logs and all(path.stat().st_size <= 1 << 20 for path in logs)
    assert sum(path.stat().st_size for path in logs) <= 4 << 20
    assert all(b"bytes of this log here (max_log_bytes is 1048576)" in path.read_bytes()
               for path in logs)
    assert min(lowest) > 30 << 20  # 3 logs open of 1 MiB, 4 MiB kept: the disk never filled
    assert c.child.wait_for_log("Deleted the .* oldest evaluator logs")


def child_stats(rpc, c):
    port = common.load_config(c.paths["child"]).child_port
    return json.loads(child.RpcClient(rpc, "127.0.0.1", port).call("getStats")["json"])


def test_the_disk_guard_keeps_jobs_away_and_takes_them_again_once_there_is_room(
        cluster, tmp_path, tmpfs, rpc):
    data = tmpfs("64m")
    metrics_port = free_port()
    c = cluster(3, data_dir=str(data), min_free_disk_mb=32, metrics_port=metrics_port)
    ballast = data / "ballast"
    ballast.write_bytes(b"\0" * (40 << 20))  # 24 MB left
    start_both(c)
    c.child.wait_for_log(r"Disk low: \d+ MB free on .*, under min_free_disk_mb \(32\); taking "
                         "no new jobs until there is room")
    stats = child_stats(rpc, c)
    assert stats["disk_low"] is True and stats["disk_free_mb"] < 32
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read().decode()
    assert "validator_disk_low 1.0" in metrics
    # Polls go on (heartbeats), and ask for nothing.
    seen = c.query("parent", "select last_seen from children")[0]["last_seen"]
    wait_until(lambda: c.query("parent", "select last_seen from children")[0]["last_seen"] >
               seen + 0.5, 30, "two more polls")
    assert set(c.parent_status().values()) == {"pending"}

    ballast.unlink()
    c.child.wait_for_log(r"Disk has room again: \d+ MB free on .* \(min_free_disk_mb is 32\); "
                         "taking jobs again")
    wait_until(lambda: set(c.parent_status().values()) == {"completed"}, 60,
               "every job completed")
    assert child_stats(rpc, c)["disk_low"] is False


def test_a_queued_job_the_disk_guard_refuses_is_a_transient_failure_signed_as_such(
        tmp_path, child_config, wallets):
    """Refused at its start (the disk went low after it was queued): failed, retryable, and
    the child's signature covers the flag, so nobody can turn it into the miner's failure."""
    cfg = common.load_config(child_config("c1", 8001, min_free_disk_mb=1 << 40))
    disk = common.DiskGuard(cfg.min_free_disk_mb, [tmp_path])
    store = child.ChildStore(cfg.pg_database, 2, disk=disk)
    store.add_jobs([{"jobId": 7, "hfRepoId": "org/model", "hfRepoCommit": "abc",
                     "attempt": 1}])
    child.evaluate_job(cfg, store, evaluator.Evaluations(), evaluator.LogsDirectory(tmp_path),
                       threading.Event(), 7, 1)
    [row] = store.outgoing.unreported()
    assert (row["status"], row["retryable"]) == ("failed", True)
    assert json.loads(row["result"])["error"].startswith("refused by the disk guard: ")
    identity = auth.Identity(types.SimpleNamespace(config_path="test",
                                                   **security.identity(wallets, "c1")))
    message = child.Seals("c1", identity).result(row)
    assert message["retryable"] is True
    verifier = auth.Verifier
    assert verifier.holds(identity.hotkey, auth.result_fields(
        "c1", 7, 1, False, row["result"], True), message["signature"])
    assert not verifier.holds(identity.hotkey, auth.result_fields(
        "c1", 7, 1, False, row["result"], False), message["signature"])
    store.db.close()


GPU_EVALUATOR = """
import json, os, sys, time
from pathlib import Path
job = json.load(sys.stdin)
began = time.time()
time.sleep(0.4)
Path(sys.argv[1], f"gpu-{job['jobId']}.json").write_text(json.dumps({
    "devices": os.environ["CUDA_VISIBLE_DEVICES"], "began": began, "ended": time.time()}))
print(json.dumps({"score": 1}))
"""


def test_concurrent_evaluations_never_share_a_gpu(cluster, tmp_path):
    c = cluster(9, max_concurrent_jobs=5, evaluator={
        "command": [sys.executable, write(tmp_path / "gpu.py", GPU_EVALUATOR), str(tmp_path)],
        "gpus": ["0", "1", "2"]})
    start_both(c)
    c.child.wait_for_log(r"Running at most 3 evaluations at once, not max_concurrent_jobs "
                         r"\(5\): 3 GPUs, 1 per evaluation")
    wait_until(lambda: set(c.parent_status().values()) == {"completed"}, 60,
               "every job completed")
    runs = [json.loads(path.read_text()) for path in tmp_path.glob("gpu-*.json")]
    assert len(runs) == 9 and {run["devices"] for run in runs} <= {"0", "1", "2"}
    for a in runs:
        at_once = [b for b in runs if b["began"] < a["ended"] and a["began"] < b["ended"]]
        assert len(at_once) <= 3
        assert sorted(b["devices"] for b in at_once) == sorted({b["devices"] for b in at_once})


TRAPS_SIGTERM = """
import json, signal, sys, time
from pathlib import Path
here = Path(sys.argv[1])
def clean_up(*_):
    (here / "cleaned-up").write_text("stopped my container")
    sys.exit(1)
signal.signal(signal.SIGTERM, clean_up)
json.load(sys.stdin)
(here / "running").touch()
time.sleep(120)
"""


def test_a_shutdown_lets_the_evaluator_clean_up_and_its_job_stays_queued(cluster, tmp_path):
    c = cluster(1, shutdown_grace_seconds=0.5, evaluator={
        "command": [sys.executable, write(tmp_path / "trap.py", TRAPS_SIGTERM), str(tmp_path)],
        "stop_grace_seconds": 30})
    start_both(c)
    wait_until((tmp_path / "running").exists, 30, "the evaluator running")
    c.child.proc.send_signal(signal.SIGTERM)
    assert c.child.proc.wait(30) == 0  # long before the 30 s grace: the evaluator was quick
    assert (tmp_path / "cleaned-up").read_text() == "stopped my container"
    [row] = c.child_rows()
    assert (row["status"], row["finished_at"]) == ("queued", None)


def test_the_example_evaluator_through_a_real_child(cluster, tmp_path, monkeypatch):
    """examples/evaluator.py downloads the model (here from files), scores it, and exits 75
    when the download fails: that failure is reported as not the miner's."""
    models = tmp_path / "models"
    (models / "org" / "model-1").mkdir(parents=True)
    (models / "org" / "model-1" / f"{1:040x}").write_text('{"architectures": ["Policy"]}')
    monkeypatch.setenv("MODEL_URL", f"file://{models}/{{repo}}/{{revision}}")
    c = cluster(2, evaluator={"command": [sys.executable, str(ROOT / "examples" / "evaluator.py")]})
    start_both(c)
    c.parent.wait_for_log("Child c1 completed job 1")
    wait_until(lambda: any(r["job_id"] == 2 and r["finished_at"] for r in c.child_rows()), 30,
               "job 2 evaluated")
    rows = {r["job_id"]: r for r in c.child_rows()}
    assert set(json.loads(rows[1]["result"])) == {"score", "seed"}
    assert (rows[2]["status"], rows[2]["retryable"]) == ("failed", True)
    assert json.loads(rows[2]["result"]) == {
        "error": "evaluator exited with code 75 (EX_TEMPFAIL: a transient failure)"}
    log = next((c.tmp_path / "c1" / "logs").glob("job-2.log")).read_text()
    assert "download of file://" in log and os.path.basename(str(models)) in log
