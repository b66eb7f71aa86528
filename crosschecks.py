"""Cross-checks: the parent evaluates a sample of jobs twice, on two children, and compares.

A signature proves which child said a score, not that the score is right: a child with a broken
GPU, a stale environment or a tampered evaluator signs wrong scores as well as right ones. So,
with [jobs] cross_check above 0:
- **A twin.** When a child's result completes a job, the parent draws (from its own randomness:
  secrets.SystemRandom) whether the job is checked, with the child's fraction (fraction()). A
  checked job gets a twin: a new job of the same submission, suite entry, repeat and seed
  (check_round 1), queued ahead of new jobs, that the child of the original never gets
  (PendingQueue.never). On the wire a twin is a job like any other.
- **Settled** once both are final (settle(), from the parent's upkeep): their scores ([weights]
  score_key) within cross_check_tolerance agree. Beyond it they disagree: the parent logs both
  scores and hands a third job (round 2) to a child that did neither, if one is active; the
  median of the three then counts, and the child farthest from it (beyond the tolerance) is
  marked. With no third child both are marked ("disagreed"), and the submission's score says
  it is disputed (scores.py). A check whose twin failed, was cancelled, or has no score is void.
- **The record.** Each settled check gives each of its children a row of child_checks: agreed,
  or marked. scores.py counts a checked job once: the median of its members' scores, those of a
  quarantined child left out while another member has one.
- **Quarantine.** A child with more than cross_check_max_disagreement x cross_check_window marks
  among its last cross_check_window checks is quarantined: it gets no new job and gives back
  those it holds, and its results since its last agreement that no check covers get twins for
  other children. It lasts, across restarts and takeovers (the children table), until the
  operator releases it (`validator.py release CHILD_ID`: release()), which starts its record
  anew.
- **An adaptive fraction.** A child with marks among its last window is checked more (the
  fraction doubles per mark, up to 1); one whose last checks all agreed, less (the fraction
  times window / (window + agreements in a row)), never below cross_check_floor.

The parts: CrossChecks (drawn(), in the transaction that records results; settle(); the
quarantine), fraction(), judge() (one check's outcome), release().
"""

import secrets
import statistics
import time
from typing import NamedTuple

import scores
from common import Refused, log

SCHEMA = """
-- Cross-checks (crosschecks.py): a checked job and its twin (check_round 1), and on a
-- disagreement a third (round 2), share check_group, the checked job's id.
alter table jobs add column if not exists check_group bigint;
alter table jobs add column if not exists check_round integer not null default 0;
create unique index if not exists jobs_submission_check
    on jobs (fingerprint, suite_entry, suite_repeat, check_round);
drop index if exists jobs_submission_job;
create index if not exists jobs_check_group on jobs (check_group) where check_group is not null;
create table if not exists cross_checks (
    check_group bigint primary key,
    opened_at   timestamptz not null default now(),
    settled_at  timestamptz,
    outcome     text check (outcome in ('agreed', 'settled', 'disagreed', 'void'))  -- null: open
);
create index if not exists cross_checks_open on cross_checks (check_group) where outcome is null;
-- Each settled check, as each of its children did: agreed, or marked.
create table if not exists child_checks (
    check_group bigint not null references cross_checks,
    child_id    text not null references children,
    score       double precision not null,
    agreed      boolean not null,
    at          double precision not null,  -- unix seconds
    primary key (check_group, child_id)
);
create index if not exists child_checks_child on child_checks (child_id, at);
alter table children add column if not exists quarantined_at double precision;  -- unix seconds
alter table children add column if not exists quarantine_reason text;
-- A release starts the child's record anew: checks before this time no longer count.
alter table children add column if not exists checks_from double precision not null default 0;
"""

GROUPS_PER_SETTLE = 16  # checks settled in one transaction (each reads up to 3 results)
MAX_RECHECKS = 10_000  # a quarantined child's results checked again, at most (the newest)
CLEAN_RECORD_CHECKS = 1000  # the longest clean record fraction() reads
SETTLE_EVERY = 60.0  # seconds: a look for checks whose jobs ended otherwise than by a result

# The columns a twin copies from its original; check_group, check_round and position are its own.
COPIED = ("fingerprint, submission_id, miner_hotkey, miner_uid, hf_repo_id, hf_repo_commit, "
          "commit_block, env_provider, env_name, random_seed, max_retries, priority, "
          "suite_entry, suite_repeat, suite_weight")


class Member(NamedTuple):
    """One job of a check, as settled: its child and its score (None: no score)."""
    job_id: int
    round: int
    child_id: str | None
    status: str
    score: float | None


class Twin(NamedTuple):
    """A job made to check another: its queue entry, the children it avoids, its check."""
    entry: tuple
    avoid: frozenset
    group: int


class Verdict(NamedTuple):
    """judge()'s answer: the outcome (None: a third is needed), each scored child's
    (score, agreed) and the median that counts."""
    outcome: str | None
    children: dict
    median: float | None


def fraction(jobs, record):
    """The share of a child's completed jobs that get a twin, from its record (agreed: True or
    False per check, newest first)."""
    base = jobs.cross_check
    if not base:
        return 0.0
    marks = sum(not agreed for agreed in record[:jobs.cross_check_window])
    if marks:
        return min(1.0, base * 2.0 ** marks)
    clean = next((n for n, agreed in enumerate(record) if not agreed), len(record))
    return max(min(jobs.cross_check_floor, base),
               base * jobs.cross_check_window / (jobs.cross_check_window + clean))


def judge(members, tolerance):
    """The outcome of a check whose jobs are all final: Members, the checked job's first."""
    scored = [m for m in members if m.score is not None]
    children = {m.child_id for m in scored}
    if len(scored) < 2 or len(children) < len(scored) or any(
            m.status == "cancelled" for m in members):
        return Verdict("void", {}, None)
    median = statistics.median(m.score for m in scored)
    if len(scored) == 2:
        a, b = scored
        if abs(a.score - b.score) <= tolerance + 1e-12:
            return Verdict("agreed", {m.child_id: (m.score, True) for m in scored}, median)
        if not any(m.round == 2 for m in members):
            return Verdict(None, {}, median)  # a third child decides, if there is one
        return Verdict("disagreed", {m.child_id: (m.score, False) for m in scored}, median)
    farthest = max(abs(m.score - median) for m in scored)
    return Verdict("settled", {m.child_id: (m.score, not (
        abs(m.score - median) == farthest and farthest > tolerance + 1e-12)) for m in scored},
        median)


class CrossChecks:
    """The parent's cross-checks (see the module's docstring). `queue` is the PendingQueue the
    twins join, `fenced` the parent's fenced transaction, `position` the queue position of a
    job given back (twins are served before new jobs)."""

    def __init__(self, cfg, queue, fenced, position):
        self.cfg, self.jobs, self.queue = cfg, cfg.jobs, queue
        self.fenced, self.position = fenced, position
        self.random = secrets.SystemRandom()
        self.took_over()

    def took_over(self):
        """This parent became the active one: what another parent settled or recorded since
        this one last led is in the database only."""
        self.fractions = {}  # child id -> fraction(): read once, dropped when its record grows
        self.due = True  # a check may be ready to settle
        self.next_look = 0.0  # time.monotonic() of the next settle() whatever `due` says

    # -- drawing twins, in the transaction that records a child's results ----------------------

    def drawn(self, conn, child_id, completed):
        """Of the jobs `completed` (ids) that this child's results completed now, the ones
        drawn for a check get a twin; returns the Twins, to queue once committed (made())."""
        if not self.jobs.cross_check or not completed:
            return []
        rate = self.fraction_of(conn, child_id)
        drawn = [job_id for job_id in completed if self.random.random() < rate]
        if not drawn or not self.other_child(conn, [child_id]):
            return []
        return self.twins(conn, drawn, 1, [child_id])

    def fraction_of(self, conn, child_id):
        if child_id not in self.fractions:
            rows = conn.execute(
                """select k.agreed from child_checks k join children c using (child_id)
                   where k.child_id = %s and k.at >= c.checks_from
                   order by k.at desc limit %s""", (child_id, CLEAN_RECORD_CHECKS)).fetchall()
            self.fractions[child_id] = fraction(self.jobs, [row["agreed"] for row in rows])
        return self.fractions[child_id]

    def other_child(self, conn, excluded):
        """Whether an active child that is not quarantined, nor one of `excluded`, exists."""
        return conn.execute(
            """select exists (select 1 from children where last_seen > %s
                   and quarantined_at is null and not child_id = any(%s)) as found""",
            (time.time() - self.cfg.child_timeout_seconds,
             [child for child in excluded if child])).fetchone()["found"]

    def twins(self, conn, job_ids, check_round, avoid):
        """Make a job of round `check_round` for each checked job of `job_ids` (round 0), not
        for the children `avoid`; returns the Twins made, for made() once committed."""
        rows = conn.execute(
            f"""insert into jobs ({COPIED}, position, check_group, check_round)
                select {COPIED}, %s, job_id, %s from jobs
                where job_id = any(%s) and check_round = 0
                on conflict do nothing
                returning job_id, priority, position, check_group""",
            (self.position(), check_round, list(job_ids))).fetchall()
        groups = [row["check_group"] for row in rows]
        conn.execute("update jobs set check_group = job_id where job_id = any(%s) "
                     "and check_group is null", (groups,))
        conn.execute("insert into cross_checks (check_group) select unnest(%s::bigint[]) "
                     "on conflict do nothing", (groups,))
        avoid = frozenset(child for child in avoid if child)
        return [Twin((-row["priority"], row["position"], row["job_id"]), avoid,
                     row["check_group"]) for row in rows]

    def made(self, twins):
        """Once committed: the twins join the queue, each kept from the children it avoids."""
        if not twins:
            return
        self.queue.push_avoiding([(t.entry, t.avoid) for t in twins])
        pairs = ", ".join(f"job {t.group} as job {t.entry[2]}" for t in twins[:20])
        log.info("Cross-checking %s%s, on another child than %s", pairs,
                 f" and {len(twins) - 20} more" if len(twins) > 20 else "",
                 " or ".join(sorted(twins[0].avoid)))

    # -- settling, from the parent's upkeep ---------------------------------------------------

    def maybe_settle(self):
        """Settle what is due: at once after a check's job got its result (`due`), and every
        SETTLE_EVERY seconds for checks whose jobs ended otherwise (given up, cancelled)."""
        if self.due or time.monotonic() >= self.next_look:
            self.due = False
            self.next_look = time.monotonic() + SETTLE_EVERY
            while self.settle() == GROUPS_PER_SETTLE:
                pass

    def settle(self):
        """Settle up to GROUPS_PER_SETTLE open checks whose jobs are all final, in one
        transaction; returns how many it looked at."""
        later = []
        with self.fenced() as conn:
            groups = [row["check_group"] for row in conn.execute(
                """select c.check_group from cross_checks c where c.outcome is null
                     and not exists (select 1 from jobs j where j.check_group = c.check_group
                                     and j.status in ('pending', 'assigned'))
                   order by c.check_group limit %s for update of c skip locked""",
                (GROUPS_PER_SETTLE,))]
            members = {}
            for row in conn.execute(
                    """select job_id, check_group, check_round, child_id, status, result,
                              result_score, result_pruned_at is not null as pruned, miner_hotkey
                       from jobs where check_group = any(%s) order by check_round, job_id""",
                    (groups,)):
                members.setdefault(row["check_group"], []).append(row)
            marked = set()
            for group in groups:
                later += self._settle_one(conn, group, members[group], marked)
            later += self._quarantine_marked(conn, marked)
        for action in later:  # once committed
            action()
        return len(groups)

    def _settle_one(self, conn, group, rows, marked):
        members = [Member(r["job_id"], r["check_round"], r["child_id"], r["status"],
                          scores.row_score(r, self.cfg.weights)[0]) for r in rows]
        verdict = judge(members, self.jobs.cross_check_tolerance)
        scored = ", ".join(f"child {m.child_id} scored {m.score:g} (job {m.job_id})"
                           for m in members if m.score is not None)
        if verdict.outcome is None:
            done = {m.child_id for m in members}
            if self.other_child(conn, done):
                third = self.twins(conn, [group], 2, done)
                log.warning("Cross-check of job %d disagrees: %s, beyond the tolerance %g; "
                            "a third child evaluates it (job %s)", group, scored,
                            self.jobs.cross_check_tolerance,
                            ", ".join(str(t.entry[2]) for t in third))
                return [lambda: self.made(third)]
            verdict = Verdict("disagreed", {m.child_id: (m.score, False) for m in members
                                            if m.score is not None}, verdict.median)
            log.warning("Cross-check of job %d disagrees: %s, beyond the tolerance %g; no "
                        "third child to decide: both are marked", group, scored,
                        self.jobs.cross_check_tolerance)
        elif verdict.outcome == "settled":
            log.warning("Cross-check of job %d settled by a third child: %s; the median %g "
                        "counts%s", group, scored, verdict.median, "".join(
                            f"; child {child} is marked" for child, (_, agreed)
                            in verdict.children.items() if not agreed))
        conn.execute("update cross_checks set outcome = %s, settled_at = now() "
                     "where check_group = %s", (verdict.outcome, group))
        now = time.time()
        conn.execute(
            """insert into child_checks (check_group, child_id, score, agreed, at)
               select %s, c, s, a, %s from unnest(%s::text[], %s::float8[], %s::boolean[])
                   as r(c, s, a)
               on conflict do nothing""",
            (group, now, list(verdict.children), [s for s, _ in verdict.children.values()],
             [a for _, a in verdict.children.values()]))
        marked.update(child for child, (_, agreed) in verdict.children.items() if not agreed)
        ended = [m.job_id for m in members]
        return [lambda: self.queue.forget_avoiding(ended),
                *[lambda child=child: self.fractions.pop(child, None)
                  for child in verdict.children]]

    # -- quarantine ---------------------------------------------------------------------------

    def _quarantine_marked(self, conn, marked):
        """Quarantine the marked children whose marks among their last window are too many;
        returns what to do once committed."""
        if not marked:
            return []
        window, share = self.jobs.cross_check_window, self.jobs.cross_check_max_disagreement
        later = []
        for row in conn.execute(
                """select r.child_id, count(*) filter (where not r.agreed) as marks
                   from (select k.child_id, k.agreed, row_number() over (
                             partition by k.child_id order by k.at desc) as n
                         from child_checks k join children c using (child_id)
                         where k.child_id = any(%s) and k.at >= c.checks_from
                           and c.quarantined_at is null) r
                   where r.n <= %s group by r.child_id order by r.child_id""",
                (sorted(marked), window)):
            if row["marks"] > share * window:
                later += self._quarantine(conn, row["child_id"], row["marks"], window)
        return later

    def _quarantine(self, conn, child_id, marks, window):
        reason = (f"{marks} of its last {window} cross-checks disagreed, more than "
                  f"{self.jobs.cross_check_max_disagreement:g} of them")
        conn.execute("update children set quarantined_at = %s, quarantine_reason = %s "
                     "where child_id = %s", (time.time(), reason, child_id))
        # What it holds goes back to the queue (its next poll is told to stop them).
        back = conn.execute(
            """with back as (
                   update jobs set status = 'pending', child_id = null, position = %s
                   where child_id = %s and status = 'assigned'
                   returning job_id, priority, position, attempts),
               closed as (
                   update assignments a set finished_at = now(), outcome = 'withdrawn',
                       reason = 'the child is quarantined'
                   from back where a.job_id = back.job_id and a.attempt = back.attempts)
               select job_id, priority, position from back""",
            (self.position(), child_id)).fetchall()
        entries = [(-row["priority"], row["position"], row["job_id"]) for row in back]
        # Its results since its last agreement that no check covers are checked again.
        unchecked = [row["job_id"] for row in conn.execute(
            """select j.job_id from jobs j join children c using (child_id)
               where j.child_id = %s and j.status = 'completed' and j.check_group is null
                 and j.check_round = 0
                 and j.finished_at >= to_timestamp(greatest(c.checks_from, coalesce((
                     select max(k.at) from child_checks k
                     where k.child_id = c.child_id and k.agreed), 0)))
               order by j.finished_at desc limit %s""", (child_id, MAX_RECHECKS + 1))]
        beyond = len(unchecked) > MAX_RECHECKS  # the older ones stay unchecked
        unchecked = unchecked[:MAX_RECHECKS]
        others = bool(unchecked) and self.other_child(conn, [child_id])
        rechecks = self.twins(conn, unchecked, 1, [child_id]) if others else []

        def committed():
            self.queue.push(entries)
            self.made(rechecks)
            self.fractions.pop(child_id, None)
            log.warning("Child %s quarantined: %s; it gets no new job until `validator.py "
                        "release %s`; %d jobs it held went back to the queue; %d of its results "
                        "since its last agreement are checked again%s", child_id, reason,
                        child_id, len(entries), len(rechecks),
                        f" (the newest {MAX_RECHECKS:,}; the older ones stay unchecked)" if beyond and others
                        else f" ({len(unchecked)} unchecked: no other child is active)"
                        if unchecked and not others else "")
        return [committed]


def release(db, child_id):
    """End a child's quarantine (validator.py release): it gets jobs again at its next poll, and
    its record starts anew (its earlier checks no longer count toward a quarantine)."""
    with db.transaction() as conn:
        row = conn.execute("select quarantined_at from children where child_id = %s for update",
                           (child_id,)).fetchone()
        if row is None:
            raise Refused(f"no child {child_id!r}")
        conn.execute("update children set quarantined_at = null, quarantine_reason = null, "
                     "checks_from = %s where child_id = %s", (time.time(), child_id))
    if row["quarantined_at"] is None:
        return f"child {child_id} was not quarantined; its cross-check record starts anew"
    log.info("Child %s released from quarantine", child_id)
    return f"child {child_id} is released: it gets jobs again, and its cross-check record " \
           "starts anew"
