"""A smoke test of the benchmark (tests/bench.py, run as `validator.py bench`): its quick run
ends well and reports every figure as a number. It asserts nothing about speed: the figures
are for docs/benchmark.md, not a gate."""

import json
import math
import subprocess
import sys

from conftest import ROOT

import common
import parent

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
    # 3. RPC overhead: rpc.RpcClient vs bare pycapnp
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
    "chain_wire_connect_requests", "chain_wire_requests_per_sync",
    "chain_wire_requests_per_sync_1_miner", "chain_wire_requests_ratio",
    "chain_wire_requests_idle_sync", "chain_wire_requests_idle_sync_1_miner",
    # 6. utilization of 2 children x 4 slots on jobs of long-tailed durations
    "utilization_jobs", "utilization_slots", "utilization_median_job_s",
    "utilization_longest_job_s", "utilization_makespan_s", "utilization_ideal_s",
    "utilization_ratio", "utilization_fifo_ideal_s", "utilization_fifo_ratio",
    "utilization_prefetch_jobs", "utilization_prefetch_makespan_s", "utilization_prefetch_ratio",
    "utilization_run_ms", "utilization_gap_ms", "utilization_report_ms",
    "utilization_prefetch_run_ms", "utilization_prefetch_gap_ms",
    # 7. recovery from kill -9: of a child holding jobs, of the parent, of the active of two
    "recovery_child_timeout_s", "recovery_child_kill_s", "recovery_child_kill_ratio",
    "recovery_parent_serving_s", "recovery_parent_registered_s",
    "recovery_parent_registered_ratio", "recovery_parent_job_s", "recovery_parent_job_ratio",
    "recovery_standby_leader_timeout_s", "recovery_standby_retry_s", "recovery_standby_active_s",
    "recovery_standby_active_ratio", "recovery_standby_registered_s",
    "recovery_standby_registered_ratio", "recovery_standby_job_s", "recovery_standby_job_ratio",
    # 8. idle footprint of a parent and two children
    "idle_footprint_seconds", "idle_total_cpu_percent", "idle_parent_cpu_percent",
    "idle_child_1_cpu_percent", "idle_child_2_cpu_percent", "idle_postgres_cpu_percent",
    "idle_postgres_alone_cpu_percent", "idle_parent_rss_mb", "idle_child_1_rss_mb",
    "idle_child_2_rss_mb", "idle_postgres_pss_mb",
    # 9. hotkey signatures: end to end with 2 children, auth on vs auth off, and the CPU per job
    "auth_on_jobs_per_s", "auth_off_jobs_per_s", "auth_ratio",
    "auth_on_cpu_ms_per_job", "auth_off_cpu_ms_per_job", "auth_cpu_ratio",
    "auth_on_cpu_ms_per_job_parent", "auth_on_cpu_ms_per_job_children",
    "auth_on_cpu_ms_per_job_postgres", "auth_off_cpu_ms_per_job_parent",
    "auth_off_cpu_ms_per_job_children", "auth_off_cpu_ms_per_job_postgres",
    # 10. the dashboard: page loads with 10,000 jobs, and the ping while browsers load pages
    "pages_jobs", "pages_browsers", "pages_getstats_ms", "pages_overview_ms",
    "pages_overview_ratio", "pages_children_ms", "pages_jobs_ms", "pages_jobs_failed_ms",
    "pages_job_ms", "pages_miners_ms", "pages_ping_idle_p50_ms", "pages_ping_p50_ms",
    "pages_ping_p50_ratio", "pages_ping_idle_p99_ms", "pages_ping_p99_ms",
    "pages_ping_p99_ratio",
    # 11. suites: the first sync of a suite, and the database's growth per 1,000 jobs
    "suite_jobs", "suite_sync_s", "suite_jobs_per_s", "suite_one_job_jobs_per_s",
    "suite_jobs_per_s_ratio", "suite_db_kb_per_1000_pending", "suite_db_kb_per_1000_completed",
    # 12. cross-checks: evaluations per job, and the parent's time per job, on and off
    "checks_jobs", "checks_made", "checks_evaluations_per_job", "checks_evaluations_ratio",
    "checks_parent_ms_per_job", "checks_off_parent_ms_per_job", "checks_parent_ms_ratio",
]
# The figures that have a target, and their targets, as the issues set them.
TARGETS = {"end_to_end_2_children_jobs_per_s": "ratio >= 0.5",
           "utilization_makespan_s": "ratio >= 0.95", "idle_total_cpu_percent": "< 1 %",
           "auth_on_jobs_per_s": "ratio >= 0.85"}


def test_the_quick_bench_reports_every_figure_as_a_number():
    result = subprocess.run([sys.executable, str(ROOT / "validator.py"), "bench", "--quick",
                             "--json"], cwd=ROOT, capture_output=True, text=True, timeout=420)
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
    assert (figures["utilization_jobs"], figures["utilization_slots"]) == (40, 8)
    assert figures["recovery_child_timeout_s"] == figures["settings"]["recovery_child_timeout"]
    # The quick run kills the active of two parents once, with the default leader timeout;
    # the new commitment's job can start only once the standby is active.
    assert figures["settings"]["recovery_standby_kills"] == 1
    assert len(figures["repeats"]["recovery_standby_active_s"]) == 1
    assert (figures["recovery_standby_leader_timeout_s"], figures["recovery_standby_retry_s"]) \
        == (common.CONFIG_KEYS["leader_timeout_seconds"][1], parent.STANDBY_RETRY_SECONDS)
    assert 0 < figures["recovery_standby_active_s"] < figures["recovery_standby_job_s"]
    assert figures["targets"].items() >= TARGETS.items()
    # The makespan cannot beat the ideal; the idle total is the sum of its parts.
    assert figures["utilization_makespan_s"] >= figures["utilization_fifo_ideal_s"] \
        >= figures["utilization_ideal_s"] > 0
    parts = ("parent", "child_1", "child_2", "postgres")
    assert math.isclose(figures["idle_total_cpu_percent"],
                        sum(figures[f"idle_{name}_cpu_percent"] for name in parts))
    # Figure 9 measures auth on and off in the same run; each total is the sum of its parts.
    assert math.isclose(figures["auth_ratio"],
                        figures["auth_on_jobs_per_s"] / figures["auth_off_jobs_per_s"])
    for mode in ("on", "off"):
        assert math.isclose(figures[f"auth_{mode}_cpu_ms_per_job"], sum(
            figures[f"auth_{mode}_cpu_ms_per_job_{name}"]
            for name in ("parent", "children", "postgres")))
    assert figures["chain_calls_per_sync"] >= 1
    assert all(len(v) >= 2 for key, v in figures["repeats"].items()
               if isinstance(v, list) and not key.startswith("recovery_standby_"))
    assert "WARNING" not in result.stderr, result.stderr[-5000:]  # every validator stopped


def test_only_runs_the_named_sections_and_an_unknown_name_is_refused():
    # A section of a few seconds (the chain's waits out the SDK's 12-s checks: 40 s).
    result = subprocess.run([sys.executable, str(ROOT / "validator.py"), "bench", "--quick",
                             "--json", "--only", "checks"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-5000:]
    figures = json.loads(result.stdout)
    measured = {key for key in FIGURES if key in figures}
    assert measured == {key for key in FIGURES if key.startswith("checks_")}
    assert "12. evaluations per job" in result.stderr  # the table, that section's rows only
    assert "1. end to end" not in result.stderr and "5. substrate" not in result.stderr

    result = subprocess.run([sys.executable, str(ROOT / "validator.py"), "bench", "--only",
                             "chain,nosuch"], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert "no section 'nosuch'; the sections: idle, chain, rpc," in result.stderr
