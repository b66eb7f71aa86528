"""A smoke test of the benchmark (tests/bench.py, run as `validator.py bench`): its quick run
ends well and reports every figure as a number. It asserts nothing about speed: the figures
are for the README, not a gate."""

import json
import math
import subprocess
import sys

from conftest import ROOT

FIGURES = [
    # 1. end-to-end throughput, and pgqueuer's consumer alone
    "pgqueuer_jobs_per_s",
    "end_to_end_1_child_jobs_per_s", "end_to_end_1_child_ratio",
    "end_to_end_2_children_jobs_per_s", "end_to_end_2_children_ratio", "end_to_end_ratio",
    "end_to_end_4_children_jobs_per_s", "end_to_end_4_children_ratio",
    "end_to_end_2_children_no_prefetch_jobs_per_s", "end_to_end_2_children_no_prefetch_ratio",
    "pgqueuer_cpu_ms_per_job", "end_to_end_cpu_ms_per_job", "end_to_end_cpu_ms_per_job_parent",
    "end_to_end_cpu_ms_per_job_children", "end_to_end_cpu_ms_per_job_postgres",
    "end_to_end_cpu_ratio",
    # 2. dispatch latency, push and pull, and pgqueuer's own enqueue -> start
    "dispatch_pgqueuer_p50_ms", "dispatch_pgqueuer_p99_ms",
    "dispatch_push_p50_ms", "dispatch_push_p99_ms", "dispatch_push_ratio",
    "dispatch_push_parent_p50_ms",
    "dispatch_pull_p50_ms", "dispatch_pull_p99_ms", "dispatch_pull_ratio",
    # 3. RPC overhead: common.RpcClient vs bare pycapnp
    "rpc_ping_us", "rpc_ping_bare_us", "rpc_ping_ratio",
    "rpc_request_jobs_100_us", "rpc_request_jobs_100_bare_us", "rpc_request_jobs_100_ratio",
    # 4. scale: many children; many pending jobs
    "scale_children", "scale_ping_p50_ms", "scale_ping_p99_ms", "scale_ping_idle_p99_ms",
    "scale_ping_p99_ratio", "scale_heartbeat_p99_ms", "scale_parent_cpu_percent",
    "scale_parent_cpu_idle_percent", "scale_parent_cpu_ratio", "scale_postgres_cpu_percent",
    "scale_postgres_cpu_idle_percent",
    "pending_jobs", "pending_restart_s", "pending_restart_empty_s", "pending_restart_ratio",
    "pending_rss_mb", "pending_rss_empty_mb", "pending_rss_ratio", "pending_peak_rss_mb",
    "pending_heartbeat_ms", "pending_heartbeat_empty_ms", "pending_heartbeat_ratio",
    "pending_parent_cpu_percent", "pending_postgres_cpu_percent",
    "pending_postgres_cpu_empty_percent",
    # 5. chain reads per sync
    "chain_miners", "chain_calls_per_sync", "chain_calls_per_sync_1_miner", "chain_calls_ratio",
    "chain_read_ms", "chain_read_1_miner_ms", "chain_read_ratio",
]


def test_the_quick_bench_reports_every_figure_as_a_number():
    result = subprocess.run([sys.executable, str(ROOT / "validator.py"), "bench", "--quick",
                             "--json"], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-5000:]
    figures = json.loads(result.stdout)

    missing = [key for key in FIGURES if key not in figures]
    assert missing == []
    not_numbers = {key: figures[key] for key in FIGURES
                   if isinstance(figures[key], bool) or not isinstance(figures[key], (int, float))
                   or not math.isfinite(figures[key]) or figures[key] < 0}
    assert not_numbers == {}
    # Every ratio the bench prints is one of the figures above, each named ..._ratio.
    ratios = {key for key, value in figures.items() if key.endswith("_ratio")}
    assert ratios == {key for key in FIGURES if key.endswith("_ratio")}
    # The sizes are the quick run's, the substrate seam was counted, and the repeats are there.
    assert (figures["scale_children"], figures["chain_miners"]) == (20, 256)
    assert figures["chain_calls_per_sync"] >= 1
    assert all(len(v) >= 2 for v in figures["repeats"].values() if isinstance(v, list))
    assert "WARNING" not in result.stderr, result.stderr[-5000:]  # every validator stopped
