"""The parent's scores: what a submission is worth, and what a miner's weight is made of.

A submission (a miner's commitment: hotkey, repository, revision) is evaluated on the suite
([[jobs.suite]]): one job per entry and repeat. Its score, in three steps:
- per entry, the mean of its repeats' scores ([weights] score_key of each job's result), with
  their count and standard error (the sample standard deviation over the square root of the
  count; 0 with one repeat);
- the submission's score, the weighted mean of its entries' means (each entry's `weight` as it
  was when the submission was made);
- it counts only once every one of its jobs is final. A job that failed, or completed without
  a valid score, scores 0 with `failed_scores = "zero"` and is left out of its entry's mean
  with "skip" (an entry left with no score is then left out, and a submission with none
  counts nothing). A cancelled job (superseded, deregistered, by the operator) leaves its
  submission without a score.
A job cross-checked (crosschecks.py) counts once: the median of the scores of its check's jobs
(its own, its twin's, a third's), leaving out those of a quarantined child while another has a
score. A check's job that is not final yet holds nothing back; a check that disagreed with no
third child to decide makes its submission "disputed".
A miner's score is then [weights] aggregation over its scored submissions: "latest", the one
committed last; "ema", a moving average in the order they were finished. Only the hotkey that
earned a score gets it, and only from commitments made since it took its uid.

Its parts: submission_scores() (the database read, streamed, and the three steps), miner_scores()
(aggregation), weight_table() (the rows the weights are set from, chain.WeightSetter), and
job_score() (one job's score).
"""

import dataclasses
import json
import math
import statistics

from common import log


@dataclasses.dataclass
class Entry:
    """One entry of a submission's suite: its jobs' scores."""
    entry: int
    env: str  # env_provider/env_name
    weight: float
    scores: list = dataclasses.field(default_factory=list)
    failed: int = 0  # jobs without a score (failed, or no valid score_key)
    open: int = 0  # jobs not final yet

    @property
    def count(self):
        return len(self.scores)

    @property
    def mean(self):
        return sum(self.scores) / len(self.scores) if self.scores else None

    @property
    def stderr(self):
        n = len(self.scores)
        if n < 2:
            return 0.0 if n else None
        mean = self.mean
        return math.sqrt(sum((s - mean) ** 2 for s in self.scores) / (n - 1) / n)


@dataclasses.dataclass
class Submission:
    """A miner's commitment and its entries; `score` is None until it counts (and why_not
    says why)."""
    hotkey: str
    fingerprint: str
    repo: str
    revision: str
    commit_block: int
    entries: dict = dataclasses.field(default_factory=dict)  # entry -> Entry
    finished_at: float = 0.0  # unix seconds: its last job's end
    cancelled: int = 0
    checks: dict = dataclasses.field(default_factory=dict)  # check group -> its jobs' rows
    disputed: int = 0  # its checks that disagreed with no third child to decide

    @property
    def why_not(self):
        if self.cancelled:
            return f"{self.cancelled} of its jobs were cancelled"
        waiting = sum(e.open for e in self.entries.values())
        if waiting:
            return f"{waiting} of its jobs are not finished"
        if not any(e.scores for e in self.entries.values()):
            return "none of its jobs has a score"
        return None

    @property
    def score(self):
        if self.why_not:
            return None
        scored = [e for e in self.entries.values() if e.scores]
        total = sum(e.weight for e in scored)
        return sum(e.weight * e.mean for e in scored) / total

    def as_dict(self):
        return {"hotkey": self.hotkey, "repo": self.repo, "revision": self.revision,
                "commit_block": self.commit_block, "score": self.score,
                "why_not": self.why_not, "cross_checked": len(self.checks),
                "disputed": self.disputed, "entries": [
                    {"entry": e.entry, "env": e.env, "weight": e.weight, "mean": e.mean,
                     "stderr": e.stderr, "count": e.count, "failed": e.failed,
                     "open": e.open} for e in sorted(self.entries.values(),
                                                     key=lambda e: e.entry)]}


def job_score(result, key):
    """(score, None) from a completed job's result, a JSON object; else (None, why not)."""
    try:
        doc = json.loads(result or "")
    except ValueError:
        return None, "the result is not JSON"
    value = doc.get(key) if isinstance(doc, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None, f"the result has no number {key!r}"
    if not math.isfinite(value) or value < 0:
        return None, f"its {key!r} is {value!r}, not a finite number >= 0"
    return float(value), None


def row_score(job, settings):
    """(score, why not) of a final job's row: a failed one has neither."""
    if job["status"] != "completed":
        return None, None
    if job["pruned"]:  # its text is gone (result_retention_days); its score was kept
        return job["result_score"], None
    return job_score(job["result"], settings.score_key)


def submission_scores(db, settings, hotkeys=None, skipped=None):
    """{fingerprint: Submission} of the miners `hotkeys` (None: every miner), in the order
    they were committed. A completed job without a valid score is logged once (its id added
    to `skipped`)."""
    submissions = {}
    skipped = set() if skipped is None else skipped
    with db.transaction() as conn:
        # A server-side cursor: the results (each up to max_result_bytes) stream through in
        # batches instead of being held at once.
        rows = conn.cursor(name="submission_scores")
        rows.execute(
            """select j.job_id, j.fingerprint, j.miner_hotkey, j.hf_repo_id, j.hf_repo_commit,
                      j.commit_block, j.suite_entry, j.suite_weight, j.env_provider, j.env_name,
                      j.status, j.result, j.result_score, j.result_pruned_at is not null as pruned,
                      extract(epoch from j.finished_at)::float8 as finished_at,
                      j.check_group, j.check_round, x.outcome as check_outcome,
                      c.quarantined_at is not null as quarantined
               from jobs j left join children c on c.child_id = j.child_id
                    left join cross_checks x on x.check_group = j.check_group
               where %(all)s or j.miner_hotkey = any(%(hotkeys)s)
               order by j.commit_block, j.fingerprint, j.job_id""",
            {"all": hotkeys is None, "hotkeys": list(hotkeys or ())})
        for row in rows:
            submission = submissions.get(row["fingerprint"])
            if submission is None:
                submission = submissions[row["fingerprint"]] = Submission(
                    row["miner_hotkey"], row["fingerprint"], row["hf_repo_id"],
                    row["hf_repo_commit"], row["commit_block"])
            if row["check_group"] is None:
                _add_job(submission, row, settings, skipped)
            else:  # counted once its submission's rows are all read
                score, why_not = row_score(row, settings)
                submission.checks.setdefault(row["check_group"], []).append(
                    {**{key: row[key] for key in CHECK_COLUMNS}, "score": score,
                     "why_not": why_not})
    for submission in submissions.values():
        for rows in submission.checks.values():
            _add_job(submission, checked_job(rows), settings, skipped)
            submission.disputed += rows[0]["check_outcome"] == "disagreed"
    return submissions


# What a check's job keeps of its row (a result's text, up to max_result_bytes, is read once).
CHECK_COLUMNS = ("job_id", "miner_hotkey", "suite_entry", "suite_weight", "env_provider",
                 "env_name", "status", "finished_at", "check_round", "check_outcome",
                 "quarantined")


def checked_job(rows):
    """A cross-checked job as one: its row (round 0) with, as its score, the median of its
    check's scores (those of quarantined children left out while another has one). Its
    other jobs, when none has a score, add nothing."""
    job = dict(rows[0])
    scored = [r for r in rows if r["status"] == "completed" and r["score"] is not None]
    trusted = [r for r in scored if not r["quarantined"]] or scored
    if job["check_round"] == 0 and job["status"] == "completed" and trusted:
        job["score"], job["why_not"] = statistics.median(r["score"] for r in trusted), None
    return job


def _add_job(submission, job, settings, skipped):
    entry = submission.entries.get(job["suite_entry"])
    if entry is None:
        entry = submission.entries[job["suite_entry"]] = Entry(
            job["suite_entry"], f"{job['env_provider']}/{job['env_name']}", job["suite_weight"])
    status = job["status"]
    if status in ("pending", "assigned"):
        entry.open += 1
        return
    if status == "cancelled":
        submission.cancelled += 1
        return
    submission.finished_at = max(submission.finished_at, job["finished_at"] or 0.0)
    score, why_not = (job["score"], job["why_not"]) if "score" in job \
        else row_score(job, settings)
    if score is not None:
        entry.scores.append(score)
        return
    if why_not and job["job_id"] not in skipped:
        skipped.add(job["job_id"])
        log.warning("Job %d of %s contributes no score: %s", job["job_id"], job["miner_hotkey"],
                    why_not)
    entry.failed += 1
    if settings.failed_scores == "zero":
        entry.scores.append(0.0)


def miner_scores(submissions, settings, registered_at=None):
    """{hotkey: score}: [weights] aggregation over each miner's scored submissions, those
    committed since it took its uid (`registered_at`: {hotkey: block}; None: all)."""
    scored = [s for s in submissions.values() if s.score is not None and (
        registered_at is None or s.commit_block >= registered_at.get(s.hotkey, 0))]
    scores = {}
    if settings.aggregation == "latest":  # the submission committed last
        for s in sorted(scored, key=lambda s: (s.commit_block, s.finished_at)):
            scores[s.hotkey] = s.score
    else:  # a moving average in the order they were finished, from 0 (as the template does)
        for s in sorted(scored, key=lambda s: s.finished_at):
            scores[s.hotkey] = (settings.ema_alpha * s.score
                                + (1 - settings.ema_alpha) * scores.get(s.hotkey, 0.0))
    return scores


def weight_table(db, settings, neurons, skipped, row_type):
    """[row_type(uid, hotkey, score, weight)] by uid, for the registered neurons with a
    score; the weight is the score over the sum of the scores."""
    by_hotkey = {n.hotkey: n for n in neurons}
    submissions = submission_scores(db, settings, list(by_hotkey), skipped)
    scores = miner_scores(submissions, settings,
                          {hotkey: n.registered_at for hotkey, n in by_hotkey.items()})
    total = sum(scores.values())
    return [row_type(n.uid, n.hotkey, scores[n.hotkey],
                     scores[n.hotkey] / total if total else 0.0)
            for n in sorted(neurons, key=lambda n: n.uid) if n.hotkey in scores]


def report(db, settings):
    """What `validator.py scores` shows: per miner (by hotkey), its score and the weight it
    would get among the miners of the database (the chain decides who is registered:
    `validator.py weights`), and its latest submission with each entry's figures."""
    submissions = submission_scores(db, settings)
    scores = miner_scores(submissions, settings)
    total = sum(scores.values())
    latest = {}
    for s in submissions.values():  # in commit order: the last one stays
        latest[s.hotkey] = s
    return {"aggregation": settings.aggregation, "failed_scores": settings.failed_scores,
            "miners": [{"hotkey": hotkey, "score": scores.get(hotkey),
                        "weight": scores[hotkey] / total if hotkey in scores and total else None,
                        "submission": s.as_dict()}
                       for hotkey, s in sorted(latest.items())]}


def format_report(doc):
    """The report as text: a miner a paragraph."""
    lines = [f"{len(doc['miners'])} miners; aggregation {doc['aggregation']}, failed jobs "
             f"score {'0' if doc['failed_scores'] == 'zero' else 'nothing'}"]
    for m in doc["miners"]:
        s = m["submission"]
        lines.append(f"{m['hotkey']}  score {figure(m['score'])}  weight {figure(m['weight'])}")
        lines.append(f"  latest submission {s['repo']}@{s['revision'] or 'default'} (block "
                     f"{s['commit_block']}): " + (figure(s["score"]) if s["score"] is not None
                                                  else f"no score yet, {s['why_not']}")
                     + checked(s))
        for e in s["entries"]:
            mean = "-" if e["mean"] is None else f"{e['mean']:.4f} ± {e['stderr']:.4f}"
            extra = "".join(f", {e[key]} {word}" for key, word in
                            (("failed", "failed"), ("open", "not finished")) if e[key])
            lines.append(f"    {e['env']}  weight {e['weight']:g}  {mean}  "
                         f"({e['count']} scores{extra})")
    return "\n".join(lines)


def checked(submission):
    """What the cross-checks say of a submission's score, if any was checked."""
    if not submission.get("cross_checked"):
        return ""
    disputed = submission.get("disputed")
    return f"; {submission['cross_checked']} jobs cross-checked" + (
        f", {disputed} disputed (the children disagreed, and no third child decided)"
        if disputed else "")


def figure(value):
    return "-" if value is None else f"{value:.4f}"
