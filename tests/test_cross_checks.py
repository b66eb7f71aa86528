"""Cross-checks (issue 28, crosschecks.py): a sampled completed job gets a twin, the same job for
another child; the two agree within the tolerance, or a third child decides and the child
farthest from the median is marked; a child with too many marks is quarantined until the
operator releases it, and its scores are replaced by the others'. Most tests run on a real
PostgreSQL through the parent's own calls (the children are the test), with auth off: a result's
signature is checked before any of this (parent.Reports.check). One runs a real parent and
three real children with auth on, one of them cheating."""

import json
import logging
import random
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import prometheus_client
import pytest
from conftest import commitment, wait_until, write_chain

import common
import crosschecks
import parent as parents
import scores
import validator
import test_security as security
from test_queue import add_jobs, ids, job_row, register

wallets = security.wallets  # the fixture: hotkeys made with the SDK

ROOT = Path(__file__).resolve().parent.parent

CHECK_ALL = {"cross_check": 1.0}  # every completed job is checked: the tests decide who cheats


def completed(job_id, score):
    return parents.Result(job_id, True, json.dumps({"score": score}))


def honest(job):
    """The score a job's evaluation earns: a function of its seed, as a seeded episode is."""
    return round((job["randomSeed"] % 1000) / 2000, 4)  # 0 to 0.5: room for +0.4 below 1


def evaluate(state, child_id, score=honest, most=4):
    """One poll of `child_id` and the results of every job it got; returns the jobs."""
    jobs = state.request_jobs(child_id, most)
    if jobs:
        assert all(ok for ok, _ in state.report_completions(
            child_id, [completed(job["jobId"], score(job)) for job in jobs]))
    return jobs


def record(state):
    """{child: (checks, agreements, disagreements, quarantined)}, as getStats says."""
    return {c["child_id"]: (c["cross_checks"], c["cross_check_agreements"],
                            c["cross_check_disagreements"], c["quarantined"])
            for c in state.statistics.stats()["children"]}


def outcomes(state):
    return {row["check_group"]: row["outcome"] for row in state.db.query(
        "select check_group, outcome from cross_checks order by 1")}


def the_score(state):
    """The one submission's (score, disputed checks, its entry's count)."""
    [s] = scores.submission_scores(state.db, state.cfg.weights).values()
    return s.score, s.disputed, s.entries[0].count


def test_a_twin_is_the_same_job_for_another_child_and_looks_like_any_other(make_state, caplog):
    caplog.set_level(logging.INFO, logger="validator")
    state = make_state(jobs=CHECK_ALL)
    add_jobs(state, 2)
    register(state, "c1", "c2")
    [original, unchecked] = state.request_jobs("c1", 2)
    state.report_completions("c1", [completed(1, 0.3)])
    [twin_row] = state.db.query("select * from jobs where check_round = 1")
    assert (twin_row["check_group"], twin_row["random_seed"]) == (1, job_row(state, 1)[
        "random_seed"])
    assert "Cross-checking job 1 as job 3, on another child than c1" in caplog.text
    # Never to the child of its original, before or after a restart; to the other at once,
    # ahead of the jobs made before it.
    add_jobs(state, 3)  # the chain still has the first two
    assert ids(state.request_jobs("c1", 5)) == [4]
    assert make_state(jobs=CHECK_ALL).request_jobs("c1", 5) == []
    state = make_state(jobs=CHECK_ALL)
    [twin] = state.request_jobs("c2", 5)
    assert twin["jobId"] == 3
    # On the wire: the fields of any job, the same values as its original's but its own id.
    own = {"jobId", "logsPath", "createdAt"}
    assert twin.keys() == original.keys() == unchecked.keys()
    assert {k: v for k, v in twin.items() if k not in own} == \
        {k: v for k, v in original.items() if k not in own}


def one_check(make_state, children, *scored):
    """A parent with one job checked: the children (in order) score it as `scored` says."""
    state = make_state(jobs=CHECK_ALL)
    add_jobs(state, 1)
    register(state, *children)
    for child, score in zip(children, scored):
        evaluate(state, child, lambda job, score=score: score)
    state.checks.maybe_settle()
    return state


def test_twins_that_agree_count_once_and_mark_nobody(make_state):
    state = one_check(make_state, ["c1", "c2"], 0.5, 0.58)  # within the tolerance, 0.1
    assert outcomes(state) == {1: "agreed"}
    assert record(state) == {"c1": (1, 1, 0, False), "c2": (1, 1, 0, False)}
    assert the_score(state) == (pytest.approx(0.54), 0, 1)  # one job, the median of two
    assert state.statistics.stats()["cross_checks"] == {
        "open": 0, "agreed": 1, "settled": 0, "disagreed": 0, "void": 0}


def test_a_disagreement_goes_to_a_third_child_and_the_farthest_is_marked(make_state, caplog):
    caplog.set_level(logging.INFO, logger="validator")
    state = one_check(make_state, ["c1", "c2", "c3"], 0.9, 0.5)
    assert "Cross-check of job 1 disagrees: child c1 scored 0.9 (job 1), child c2 scored 0.5 " \
           "(job 2), beyond the tolerance 0.1; a third child evaluates it (job 3)" in caplog.text
    assert outcomes(state) == {1: None}
    # The submission counts meanwhile (an open check holds nothing back): the median so far.
    assert the_score(state)[0] == pytest.approx(0.7)
    assert state.request_jobs("c1", 5) == [] and state.request_jobs("c2", 5) == []
    evaluate(state, "c3", lambda job: 0.52)
    state.checks.maybe_settle()
    assert outcomes(state) == {1: "settled"}
    assert "the median 0.52 counts; child c1 is marked" in caplog.text
    assert record(state) == {"c1": (1, 0, 1, False), "c2": (1, 1, 0, False),
                             "c3": (1, 1, 0, False)}
    assert the_score(state) == (pytest.approx(0.52), 0, 1)


def test_with_no_third_child_both_are_marked_and_the_score_says_it_is_disputed(make_state):
    state = one_check(make_state, ["c1", "c2"], 0.9, 0.5)
    assert outcomes(state) == {1: "disagreed"}
    assert record(state) == {"c1": (1, 0, 1, False), "c2": (1, 0, 1, False)}
    assert the_score(state) == (pytest.approx(0.7), 1, 1)
    doc = scores.report(state.db, state.cfg.weights)
    assert "1 jobs cross-checked, 1 disputed" in scores.format_report(doc)


def test_a_check_whose_twin_failed_or_was_cancelled_is_void(make_state):
    state = make_state(jobs=CHECK_ALL)
    add_jobs(state, 2)
    register(state, "c1", "c2")
    evaluate(state, "c1", lambda job: 0.4)
    state.report_completions("c2", [])
    [twin, other] = state.request_jobs("c2", 2)
    state.report_completions("c2", [parents.Result(twin["jobId"], False, '{"error": "boom"}')])
    parents.cancel_job(state.db, other["jobId"])
    state.checks.next_look = 0  # the minute's look, now: a cancel is no result
    state.checks.maybe_settle()
    assert set(outcomes(state).values()) == {"void"}
    assert record(state) == {"c1": (0, 0, 0, False), "c2": (0, 0, 0, False)}


def test_no_child_is_checked_without_another_child_to_check_it(make_state):
    state = make_state(jobs=CHECK_ALL)
    add_jobs(state, 3)
    register(state, "c1")
    evaluate(state, "c1")
    assert outcomes(state) == {} and len(state.queue) == 0


def test_a_cheating_child_is_quarantined_after_its_window_and_its_scores_replaced(
        make_state, caplog):
    caplog.set_level(logging.INFO, logger="validator")
    keys = {"jobs": {**CHECK_ALL, "cross_check_window": 4, "cross_check_max_disagreement": 0.25}}
    state = make_state(**keys)
    add_jobs(state, 30)
    register(state, "c1", "c2", "c3")
    cheat = {"c3": lambda job: honest(job) + 0.4}
    for _ in range(50):
        for child in ("c3", "c1", "c2"):
            evaluate(state, child, cheat.get(child, honest), most=2)
        state.checks.maybe_settle()
        if record(state)["c3"][3]:
            break
    checks, agreed, marks, quarantined = record(state)["c3"]
    assert quarantined and marks == 2 and agreed == 0  # more than 0.25 x 4
    assert "Child c3 quarantined: 2 of its last 4 cross-checks disagreed, more than 0.25 of " \
           "them; it gets no new job until `validator.py release c3`" in caplog.text
    assert not state.db.query("select 1 from jobs where child_id = 'c3' and status = 'assigned'")
    # It gets nothing more; the honest children finish everything, the checks included.
    for _ in range(200):
        assert state.request_jobs("c3", 4) == []
        if not any([evaluate(state, "c1"), evaluate(state, "c2")]):
            state.checks.maybe_settle()
            if not len(state.queue):
                break
    assert set(outcomes(state).values()) <= {"agreed", "settled"}
    honest_marks = [record(state)[c][2] for c in ("c1", "c2")]
    assert honest_marks == [0, 0]
    # Every submission scores what the honest children say: c3's scores no longer count.
    seeds = {row["fingerprint"]: row["random_seed"] for row in state.db.query(
        "select fingerprint, random_seed from jobs where check_round = 0")}
    for digest, submission in scores.submission_scores(state.db, state.cfg.weights).items():
        assert submission.score == pytest.approx(honest({"randomSeed": seeds[digest]}))
    assert len(seeds) == 30


def test_quarantine_lasts_across_a_restart_and_a_takeover_until_released(make_state, tmp_path):
    state = make_state(jobs=CHECK_ALL)
    add_jobs(state, 2)
    register(state, "c1", "c2", "c3")
    state.db.query("update children set quarantined_at = extract(epoch from now()), "
                   "quarantine_reason = 'a test' where child_id = 'c3'")
    assert state.request_jobs("c3", 2) == []
    restarted = make_state(jobs=CHECK_ALL)
    restarted.take_over()  # a parent that takes over reads the same database
    assert restarted.request_jobs("c3", 2) == []
    stats = {c["child_id"]: c for c in restarted.statistics.stats()["children"]}
    assert (stats["c3"]["quarantined"], stats["c3"]["quarantine_reason"]) == (True, "a test")
    assert "QUARANTINED: a test" in validator.format_stats(restarted.statistics.stats())
    assert validator.main(["release", "c3", "--config", str(tmp_path / "state.toml")]) == 0
    assert ids(restarted.request_jobs("c3", 2)) == [1, 2]
    assert validator.main(["release", "nobody", "--config", str(tmp_path / "state.toml")]) == 2


def test_honest_children_are_never_marked_over_a_long_run_within_the_tolerance(make_state):
    state = make_state(jobs=CHECK_ALL)
    add_jobs(state, 60)
    register(state, "c1", "c2", "c3")
    noise = random.Random(28)

    def noisy(job):  # any two of them differ by less than the tolerance, 0.1
        return honest(job) + noise.uniform(0, 0.095)
    for _ in range(300):
        busy = [evaluate(state, child, noisy, most=3) for child in ("c1", "c2", "c3")]
        state.checks.maybe_settle()
        if not any(busy) and not len(state.queue):
            break
    # Fewer checks as the record stays clean (the fraction adapts), and all of them agreed.
    checked = list(outcomes(state).values())
    assert checked == ["agreed"] * len(checked) and 30 <= len(checked) < 60
    assert {child: r[2] for child, r in record(state).items()} == {"c1": 0, "c2": 0, "c3": 0}


def test_the_metrics_show_checks_and_quarantine(make_state):
    state = one_check(make_state, ["c1", "c2"], 0.9, 0.1)
    registry = prometheus_client.CollectorRegistry()
    registry.register(parents.QueueMetrics(state.statistics))
    value = registry.get_sample_value
    assert value("validator_cross_checks_total", {"outcome": "disagreed"}) == 1
    assert value("validator_cross_checks_open") == 0
    assert value("validator_child_cross_checks_total",
                 {"child": "c1", "outcome": "disagreed"}) == 1
    assert value("validator_child_quarantined", {"child": "c1"}) == 0


def jobs_keys(**keys):
    defaults = {"cross_check": 0.05, "cross_check_window": 20, "cross_check_floor": 0.01}
    return types.SimpleNamespace(**{**defaults, **keys})


def test_the_fraction_grows_with_marks_and_shrinks_with_a_clean_record_to_its_floor():
    jobs = jobs_keys()
    assert crosschecks.fraction(jobs, []) == 0.05
    assert crosschecks.fraction(jobs, [False]) == 0.1
    assert crosschecks.fraction(jobs, [True, False, False]) == 0.2
    assert crosschecks.fraction(jobs, [False] * 10) == 1.0
    assert crosschecks.fraction(jobs, [True] * 20) == 0.025
    assert crosschecks.fraction(jobs, [True] * 1000) == 0.01
    assert crosschecks.fraction(jobs_keys(cross_check=0.0), [False]) == 0.0
    # A mark older than the window no longer counts as one, but ends the clean record.
    assert crosschecks.fraction(jobs, [True] * 20 + [False]) == 0.025


def test_judge_settles_by_the_median_and_marks_only_the_farthest_beyond_the_tolerance():
    def members(*scores_):
        return [crosschecks.Member(n + 1, n, f"c{n + 1}", "completed", s)
                for n, s in enumerate(scores_)]
    assert crosschecks.judge(members(0.5, 0.55), 0.1).outcome == "agreed"
    assert crosschecks.judge(members(0.5, 0.9), 0.1).outcome is None  # a third decides
    verdict = crosschecks.judge(members(0.9, 0.5, 0.52), 0.1)
    assert (verdict.outcome, verdict.median) == ("settled", 0.52)
    assert verdict.children == {"c1": (0.9, False), "c2": (0.5, True), "c3": (0.52, True)}
    # Noise that spread the first two apart, the third in the middle: nobody is marked.
    assert all(agreed for _, agreed in crosschecks.judge(
        members(0.5, 0.66, 0.58), 0.1).children.values())
    failed = members(0.5, None)
    assert crosschecks.judge(failed, 0.1).outcome == "void"


# The evaluator of the real children: a score that depends only on the seed, plus a bonus (the
# cheat's) given as its argument.
EVALUATOR = """
import json, sys
bonus = float(sys.argv[1])
job = json.load(sys.stdin)
print(json.dumps({"score": (job["randomSeed"] % 1000) / 2000 + bonus}))
"""


def test_real_children_with_auth_quarantine_the_one_that_adds_to_every_score(
        tmp_path, parent_config, child_config, processes, wallets):
    # test_security's hotkeys; the cheat signs with the one it calls the stranger's.
    hotkey = {"parent": "parent", "c1": "c1", "c2": "c2", "c3": "stranger"}
    keys = {name: wallets[key].ss58_address for name, key in hotkey.items()}
    identity = lambda name: security.identity(wallets, hotkey[name])  # noqa: E731
    write_chain(tmp_path / "chain.json", 100, [])
    config = parent_config(auth="on", **identity("parent"), allowed_child_hotkeys=[
        keys[c] for c in ("c1", "c2", "c3")], jobs={
            "cross_check": 1.0, "cross_check_window": 4, "cross_check_max_disagreement": 0.25})
    parent = processes(["parent.py", "--config", config], tmp_path / "parent.log")
    port = common.load_config(config).parent_port
    script = tmp_path / "evaluator.py"
    script.write_text(textwrap.dedent(EVALUATOR))
    for name, bonus in (("c3", 0.4), ("c1", 0.0), ("c2", 0.0)):
        path = child_config(name, port, auth="on", **identity(name),
                            parent_hotkey=keys["parent"], max_concurrent_jobs=1,
                            evaluator={"command": [sys.executable, str(script), str(bonus)]})
        child = processes(["child.py", "--config", path], tmp_path / f"{name}.log")
        child.wait_for_log(f"Successfully registered with parent validator as {name}")
    # The miners commit once the three children are there: a job is checked only when another
    # child is active.
    write_chain(tmp_path / "chain.json", 101, [commitment(i) for i in range(1, 13)])
    parent.wait_for_log("Child c3 quarantined: ", timeout=120)
    db = common.Database(common.load_config(config).pg_database, parents.SCHEMA)

    def settled():
        return db.query("select not exists (select 1 from jobs where status in "
                        "('pending', 'assigned')) and not exists (select 1 from cross_checks "
                        "where outcome is null) as done")[0]["done"]
    wait_until(settled, 120, "every job and every cross-check to be settled")
    done = subprocess.run([sys.executable, ROOT / "validator.py", "scores", "--config", config,
                           "--json"], capture_output=True, text=True, check=True)
    seeds = {row["miner_hotkey"]: row["random_seed"] for row in db.query(
        "select miner_hotkey, random_seed from jobs where check_round = 0")}
    miners = json.loads(done.stdout)["miners"]
    assert len(miners) == 12
    for miner in miners:  # what the honest children say, whoever did the job first
        assert miner["score"] == pytest.approx((seeds[miner["hotkey"]] % 1000) / 2000)
    record = {row["child_id"]: (row["marks"], row["quarantined"]) for row in db.query(
        """select c.child_id, c.quarantined_at is not null as quarantined,
                  (select count(*) from child_checks k where k.child_id = c.child_id
                     and not k.agreed) as marks from children c""")}
    assert record["c1"] == (0, False) and record["c2"] == (0, False)
    assert record["c3"][1] and record["c3"][0] >= 2
    # Every result recorded carries its child's signature (auth on), twins' included.
    assert not db.query("select 1 from jobs where status = 'completed' "
                        "and result_signature is null")
    db.close()


def test_a_jobs_page_shows_its_cross_check(make_state):
    import pages
    state = make_state(jobs=CHECK_ALL)
    add_jobs(state, 1)
    register(state, "c1", "c2")
    evaluate(state, "c1", lambda job: 0.5)
    page = pages.render_job(pages.read_job(state.db, 1), "parent.toml")
    assert '<a href="/jobs/2">job 2</a> (its twin, no child yet, pending)' in page
    assert '<span data-k="check_outcome">open (not every job of it is final)</span>' in page
    evaluate(state, "c2", lambda job: 0.5)
    state.checks.maybe_settle()
    page = pages.render_job(pages.read_job(state.db, 2), "parent.toml")
    assert "job 1</a> (the job checked, c1, completed)" in page
    assert '<span data-k="check_outcome">agreed</span>' in page
    assert "Cross-check" not in pages.render_job(pages.read_job(state.db, 1) | {"check": []},
                                                 "parent.toml")


def test_a_quarantine_made_by_one_parent_holds_for_the_parent_that_takes_over(
        make_dsn, tmp_path):
    from conftest import write_toml
    dsn = make_dsn()
    cfg = common.load_config(write_toml(tmp_path / "p.toml", {
        "pg_database": dsn, "is_parent_validator": True, "auth": "off",
        "jobs": {**CHECK_ALL, "cross_check_window": 1, "cross_check_max_disagreement": 0.0},
        "subtensor": {"network": "file", "commitments_file": "unused.json"}}))
    a, b = (parents.ParentState(common.Database(dsn, parents.SCHEMA), cfg,
                                leadership=parents.Leadership(dsn, f"{name}:1", 4.0))
            for name in ("a", "b"))
    assert a.leadership.take()
    a.take_over()
    add_jobs(a, 3)
    register(a, "c1", "c2", "c3")
    assert ids(evaluate(a, "c3", lambda job: 0.9, most=1)) == [1]  # the cheat, one mark
    evaluate(a, "c1", lambda job: 0.1, most=1)  # the twin
    a.checks.maybe_settle()
    evaluate(a, "c2", lambda job: 0.1, most=1)  # the third
    a.checks.maybe_settle()
    assert record(a)["c3"] == (1, 0, 1, True)
    a.leadership.resign()
    assert b.leadership.take()
    b.take_over()
    assert b.request_jobs("c3", 3) == []
    assert crosschecks.release(b.db, "c3").startswith("child c3 is released")
    assert ids(b.request_jobs("c3", 1)) != []
    b.leadership.resign()
    for state in (a, b):
        state.db.close()


def test_checks_a_child_may_not_take_never_hold_up_the_jobs_behind_them(make_state):
    state = make_state(jobs=CHECK_ALL)
    add_jobs(state, parents.MAX_PASSED_OVER + 50)
    register(state, "c1", "c2")
    # c1 completes more jobs than a poll passes over; each gets a twin ahead of the queue,
    # for c2 only, and c2 takes none yet.
    while len(state.db.query("select 1 from jobs where check_round = 1")) < \
            parents.MAX_PASSED_OVER + 10:
        evaluate(state, "c1", lambda job: 0.5, most=20)
    twins = {row["job_id"] for row in state.db.query(
        "select job_id from jobs where check_round = 1")}
    # c1 still gets the jobs behind them, and none of the twins, before and after a restart.
    [job] = state.request_jobs("c1", 1)
    assert job["jobId"] not in twins
    [job] = make_state(jobs=CHECK_ALL).request_jobs("c1", 1)
    assert job["jobId"] not in twins
    assert set(ids(state.request_jobs("c2", 5))) <= twins


def test_a_quarantined_childs_unchecked_results_are_checked_again_and_replaced(
        make_state, caplog):
    caplog.set_level(logging.INFO, logger="validator")
    state = make_state(jobs={**CHECK_ALL, "cross_check_window": 4,
                             "cross_check_max_disagreement": 0.25})
    add_jobs(state, 8)
    cheat = lambda job: honest(job) + 0.4  # noqa: E731
    register(state, "c3")
    early = ids(evaluate(state, "c3", cheat, most=4))  # alone: nobody to check it
    assert len(early) == 4 and outcomes(state) == {}
    register(state, "c1", "c2")
    for _ in range(20):
        evaluate(state, "c3", cheat, most=1)
        for child in ("c1", "c2"):
            evaluate(state, child, most=1)
            state.checks.maybe_settle()
        if record(state)["c3"][3]:
            break
    assert record(state)["c3"][3]
    assert "4 of its results since its last agreement are checked again" in caplog.text
    rechecked = {row["check_group"] for row in state.db.query(
        "select check_group from jobs where check_round = 1 and check_group = any(%s)",
        (early,))}
    assert rechecked == set(early)
    for _ in range(50):
        if not any([evaluate(state, "c1"), evaluate(state, "c2")]):
            state.checks.maybe_settle()
            if not len(state.queue):
                break
    seeds = {row["fingerprint"]: row["random_seed"] for row in state.db.query(
        "select fingerprint, random_seed from jobs where job_id = any(%s)", (early,))}
    submissions = scores.submission_scores(state.db, state.cfg.weights)
    for digest, seed in seeds.items():
        assert submissions[digest].score == pytest.approx(honest({"randomSeed": seed}))


def test_a_quarantine_rechecks_at_most_max_rechecks_results_the_newest(
        make_state, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="validator")
    monkeypatch.setattr(crosschecks, "MAX_RECHECKS", 3)
    state = make_state(jobs={**CHECK_ALL, "cross_check_window": 1,
                             "cross_check_max_disagreement": 0.0})
    add_jobs(state, 8)
    register(state, "c3")
    for _ in range(4):  # alone: none of these is checked
        evaluate(state, "c3", lambda job: 0.9, most=1)
    early = ids([{"jobId": row["job_id"]} for row in state.db.query(
        "select job_id from jobs where child_id = 'c3' order by finished_at")])
    register(state, "c1", "c2")
    evaluate(state, "c3", lambda job: 0.9, most=1)  # checked: its twin and third disagree
    for child in ("c1", "c2"):
        evaluate(state, child, lambda job: 0.1, most=1)
        state.checks.maybe_settle()
    assert record(state)["c3"][3]
    assert "3 of its results since its last agreement are checked again (the newest 3; the " \
           "older ones stay unchecked)" in caplog.text
    rechecked = [row["check_group"] for row in state.db.query(
        "select check_group from jobs where check_round = 1 and check_group = any(%s) "
        "order by check_group", (early,))]
    assert rechecked == early[1:]  # the oldest is past the limit


def test_more_checks_than_one_transaction_settles_are_all_settled_at_once(make_state):
    state = make_state(jobs=CHECK_ALL)
    jobs = crosschecks.GROUPS_PER_SETTLE + 4
    add_jobs(state, jobs)
    register(state, "c1", "c2")
    while evaluate(state, "c1", lambda job: 0.5, most=jobs):  # 16 at a time at most
        pass
    while evaluate(state, "c2", lambda job: 0.5, most=jobs):
        pass
    assert outcomes(state) == dict.fromkeys(range(1, jobs + 1))  # all open, all ready
    state.checks.maybe_settle()  # one call: the whole backlog, a transaction per 16
    assert list(outcomes(state).values()) == ["agreed"] * jobs


def test_a_cross_check_key_out_of_its_range_is_named_with_the_file(make_state):
    with pytest.raises(common.ConfigError, match=r"state\.toml: key 'jobs\.cross_check' must be "
                                                 r"between 0 and 1"):
        make_state(jobs={"cross_check": 1.5})
    with pytest.raises(common.ConfigError, match="key 'jobs.cross_check_window' must be between"):
        make_state(jobs={"cross_check_window": 0})
