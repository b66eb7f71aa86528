"""What the parent keeps (issue 28): a finished job's result text for result_retention_days;
after that its score and the SHA-256 of the text its proof covers, so its submission still
counts and a copy of the text can still be checked against the signature."""

import hashlib
import json

import pytest
from bittensor.sp_core import Keypair
from conftest import commitment

import auth
import chain as chains
import pages
import parent as parents
import scores

SUITE = [{"env_provider": "demo", "env_name": "reach", "repeats": 3, "weight": 1.0}]


def test_old_results_keep_their_score_and_digest_and_lose_their_text(make_state, monkeypatch):
    state = make_state(result_retention_days=30.0, jobs={"suite": SUITE})
    state.intake.add_commitments(chains.ChainSnapshot(100, [
        chains.Commitment(**commitment(1)), chains.Commitment(**commitment(2))]))
    texts = {}
    for job in state.db.query("select job_id, miner_hotkey from jobs order by job_id"):
        old = job["miner_hotkey"] == "5Miner001"  # miner 1's results are 40 days old
        texts[job["job_id"]] = json.dumps({"score": job["job_id"] / 10, "log": "x" * 1000})
        state.db.query("update jobs set status = 'completed', success = true, result = %s, "
                       "finished_at = now() - make_interval(days => %s) where job_id = %s",
                       (texts[job["job_id"]], 40 if old else 1, job["job_id"]))
    settings = state.cfg.weights
    before = {s.hotkey: s.score for s in scores.submission_scores(state.db, settings).values()}
    monkeypatch.setattr(parents.Retention, "BATCH", 2)  # three statements for three jobs

    assert state.retention.prune() == 3
    rows = {r["job_id"]: r for r in state.db.query("select * from jobs order by job_id")}
    for job_id, row in rows.items():
        if row["miner_hotkey"] == "5Miner001":
            assert row["result"] is None and row["result_pruned_at"] is not None
            assert row["result_sha256"] == hashlib.sha256(texts[job_id].encode()).hexdigest()
            assert row["result_score"] == pytest.approx(job_id / 10)
        else:
            assert row["result"] == texts[job_id] and row["result_sha256"] is None
    after = {s.hotkey: s.score for s in scores.submission_scores(state.db, settings).values()}
    assert after == before  # the submission still counts, as it did
    assert state.retention.prune() == 0  # nothing left to prune


def test_zero_keeps_every_result_whole(make_state):
    state = make_state(result_retention_days=0.0)
    state.db.query("""insert into jobs (fingerprint, submission_id, miner_hotkey, hf_repo_id,
                          hf_repo_commit, commit_block, env_provider, env_name, random_seed,
                          max_retries, status, success, result, finished_at)
                      values ('f', 1, 'm', 'r', 'c', 1, 'p', 'e', 1, 3, 'completed', true,
                              '{"score": 1}', now() - interval '1000 days')""")
    state.retention.maybe_prune()
    assert state.db.query("select result from jobs")[0]["result"] == '{"score": 1}'


def test_a_pruned_results_proof_still_holds_over_its_digest(make_state):
    """The child signs the SHA-256 of its text (auth.result_fields): the digest kept checks."""
    key = Keypair.create_from_uri("//Alice")
    identity = auth.Identity.__new__(auth.Identity)
    identity.keypair, identity.hotkey = key, key.ss58_address
    text = json.dumps({"score": 0.75})
    signature = identity.seal(auth.result_fields("c1", 1, 1, True, text))
    state = make_state(result_retention_days=1.0)
    state.db.query("""insert into jobs (fingerprint, submission_id, miner_hotkey, hf_repo_id,
                          hf_repo_commit, commit_block, env_provider, env_name, random_seed,
                          max_retries, status, success, result, finished_at, child_id,
                          result_signature, result_hotkey, result_attempt)
                      values ('f', 1, 'm', 'r', 'c', 1, 'p', 'e', 1, 3, 'completed', true, %s,
                              now() - interval '2 days', 'c1', %s, %s, 1)""",
                   (text, signature, key.ss58_address))
    assert state.retention.prune() == 1
    j = state.db.query("select * from jobs")[0]
    assert j["result"] is None
    fields = ["result", j["child_id"], j["job_id"], j["result_attempt"], j["success"],
              j["result_sha256"]]
    assert auth.Verifier.holds(j["result_hotkey"], fields, bytes(j["result_signature"]))
    # The job page's command builds the same fields.
    assert '"result_sha256"' in pages.proof_command(1, "parent.toml", pruned=True)
