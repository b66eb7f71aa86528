"""From commitments to jobs: parsing, the file chain, and the parent's job creation on a real
PostgreSQL (filters, dedupe, lookback, restart)."""

import logging

import pytest
from conftest import commitment, write_chain

import chain as chains


@pytest.mark.parametrize("text, expected", [
    ('{"provider": "HF", "repo_id": "org/model", "revision": "abc123"}', ("org/model", "abc123")),
    ('{"version": "1.0", "provider": "HF", "repo_id": "org/model"}', ("org/model", "")),
    ("org/model@abc123", ("org/model", "abc123")),
    ('  {"repo_id": "org/model.v2", "revision": "main"}  ', ("org/model.v2", "main")),
])
def test_commitment_texts_that_are_accepted(text, expected):
    assert chains.parse_commitment(text) == expected


@pytest.mark.parametrize("text, reason", [
    ("hello world", "neither JSON nor repo_id@revision"),
    ("{not json", "not valid JSON"),
    ("[1, 2]", "neither JSON"),
    ('{"provider": "S3", "repo_id": "org/model"}', "unsupported provider"),
    ('{"provider": "HF", "repo_id": "no-slash"}', "invalid repo_id"),
    ('{"provider": "HF", "repo_id": "org/model", "revision": "a b"}', "invalid revision"),
    ('{"provider": "HF", "repo_id": 5}', "invalid repo_id"),
    ("org/../../etc@x", "invalid repo_id"),
])
def test_commitment_texts_that_are_refused(text, reason):
    with pytest.raises(ValueError, match=reason):
        chains.parse_commitment(text)


def test_file_chain_reads_a_snapshot_and_reports_missing_or_broken_files(tmp_path):
    path = tmp_path / "chain.json"
    chain = chains.FileChain(path)
    with pytest.raises(chains.ChainUnavailable, match="does not exist"):
        chain.read()
    write_chain(path, 120, [commitment(1, block=110)])
    snapshot = chain.read()
    assert snapshot.block == 120
    assert snapshot.commitments == [chains.Commitment(
        "5Miner001", 1, 110, 5000.0, commitment(1)["data"])]
    path.write_text('{"block": 120, "commitm')  # a writer that did not rename
    with pytest.raises(chains.ChainUnavailable, match="malformed"):
        chain.read()
    path.write_text('{"block": 120, "commitments": [{"hotkey": "x"}]}')
    with pytest.raises(chains.ChainUnavailable, match="malformed"):
        chain.read()


def snapshot(block, commitments):
    return chains.ChainSnapshot(block, [chains.Commitment(**c) for c in commitments])


def jobs(state):
    return state.db.query("select job_id, miner_hotkey, hf_repo_commit, status from jobs "
                          "order by job_id")


def test_one_job_per_new_eligible_commitment(make_state, caplog):
    state = make_state(neuron={"min_stake_threshold": 1000.0,
                               "allowed_validators": ["5Miner002"]})
    caplog.set_level(logging.INFO, logger="validator")
    new = state.intake.add_commitments(snapshot(100, [
        commitment(1), commitment(2), commitment(3, stake=999.0), commitment(1),
        commitment(4, data="just some text"), commitment(5, data="org/five@rev5")]))
    assert [j["miner_hotkey"] for j in jobs(state)] == ["5Miner001", "5Miner005"]
    assert new == [j["job_id"] for j in jobs(state)]
    assert state.queue.ids() == new
    assert "Skipping commitment of 5Miner004 at block 100: commitment is neither JSON" \
        in caplog.text
    # The same snapshot again: no new job, no second warning, no job id spent.
    caplog.clear()
    assert state.intake.add_commitments(snapshot(101, [
        commitment(1), commitment(4, data="just some text"),
        commitment(5, data="org/five@rev5")])) == []
    assert "5Miner004" not in caplog.text
    # A new revision is a new submission: a new job, with the next id.
    [job_id] = state.intake.add_commitments(
        snapshot(102, [commitment(1, block=102, revision="f" * 40)]))
    assert job_id == new[-1] + 1
    assert [j["hf_repo_commit"] for j in jobs(state)][-1] == "f" * 40


def test_a_hotkey_past_64_characters_makes_no_job(make_state, caplog):
    """A file chain's hotkey may be any text; a job's texts are bounded, and so are answers."""
    state = make_state()
    long_hotkey = "5" + "x" * 63  # 64: at the limit
    too_long = "5" + "x" * 100_000
    state.intake.add_commitments(snapshot(100, [dict(commitment(1), hotkey=long_hotkey),
                                         dict(commitment(2), hotkey=too_long)]))
    assert [j["miner_hotkey"] for j in jobs(state)] == [long_hotkey]
    assert f"Skipping commitment of {too_long[:64]} at block 100: a hotkey of 100001 " \
        "characters" in caplog.text


def test_lookback_is_counted_from_the_last_processed_block(make_state):
    state = make_state(neuron={"load_old_nodes": False, "max_commitment_lookback": 3})
    # First start without load_old_nodes: only commitments within 3 blocks of the head.
    state.intake.add_commitments(snapshot(100, [commitment(1, block=96), commitment(2, block=97)]))
    assert [j["miner_hotkey"] for j in jobs(state)] == ["5Miner002"]
    # Later syncs take whatever was committed since the last processed block, however long ago.
    state.intake.add_commitments(snapshot(150, [commitment(3, block=96), commitment(4, block=120)]))
    assert [j["miner_hotkey"] for j in jobs(state)] == ["5Miner002", "5Miner004"]


def test_load_old_nodes_takes_every_commitment_on_first_start(make_state):
    state = make_state(neuron={"load_old_nodes": True, "max_commitment_lookback": 3})
    state.intake.add_commitments(snapshot(100, [commitment(1, block=5), commitment(2, block=99)]))
    assert len(jobs(state)) == 2


def test_a_restart_reloads_pending_jobs_and_keeps_the_processed_block(make_state):
    state = make_state(neuron={"load_old_nodes": True})
    ids = state.intake.add_commitments(snapshot(100, [commitment(i) for i in range(1, 5)]))
    state.db.query("insert into children (child_id, endpoint, last_seen) values ('c', 'h:1', 0)")
    state.request_jobs("c", 1)
    state.db.close()
    restarted = make_state(neuron={"load_old_nodes": True, "max_commitment_lookback": 3})
    assert restarted.queue.ids() == ids[1:]
    # Old commitments are not taken again after a restart: the lookback is from block 100.
    restarted.intake.add_commitments(snapshot(200, [commitment(9, block=50)]))
    assert len(jobs(restarted)) == 4


def test_job_messages_carry_the_seed_fields(make_state):
    state = make_state()
    state.intake.add_commitments(snapshot(100, [commitment(7)]))
    state.db.query("insert into children (child_id, endpoint, last_seen) values ('c', 'h:1', 0)")
    [job] = state.request_jobs("c", 5)
    assert job["minerHotkey"] == "5Miner007"
    assert (job["hfRepoId"], job["hfRepoCommit"]) == ("org/model-7", f"{7:040x}")
    assert (job["envProvider"], job["envName"], job["maxRetries"], job["retryCount"]) == \
        ("demo", "demo-env", 3, 0)
    assert job["logsPath"] == f"job-{job['jobId']}.log"
    assert 0 < job["submissionId"] < 2**63 and 0 <= job["randomSeed"] < 2**32
    assert job["createdAt"] > 1.7e12  # unix milliseconds


def test_seeds_come_from_the_parents_randomness_and_survive_a_restart(make_state, make_dsn,
                                                                      tmp_path):
    """A seed derived from the commitment could be computed by the miner before it commits,
    and two parents reading one chain would evaluate with the same seed."""
    import hashlib
    import common
    import parent
    from conftest import write_toml

    commitments = [commitment(i) for i in range(1, 21)]
    first = make_state()
    first.intake.add_commitments(snapshot(100, commitments))
    seeds = {r["miner_hotkey"]: r["random_seed"] for r in seeded(first)}
    path = write_toml(tmp_path / "other.toml", {
        "pg_database": make_dsn(), "is_parent_validator": True, "auth": "off",
        "subtensor": {"network": "file", "commitments_file": "unused.json"}})
    other = parent.ParentState(common.Database(common.load_config(path).pg_database,
                                               parent.SCHEMA), common.load_config(path))
    other.intake.add_commitments(snapshot(100, commitments))
    other_seeds = {r["miner_hotkey"]: r["random_seed"] for r in seeded(other)}
    assert set(seeds) == set(other_seeds) and len(seeds) == 20
    assert all(0 <= seed < 2**32 for seed in seeds.values())
    assert sum(seeds[k] == other_seeds[k] for k in seeds) <= 1  # 20 draws of 32 bits
    assert len(set(seeds.values())) == 20
    for row in seeded(first):  # no function of the commitment that the seed once was
        digest = hashlib.sha256(f"{row['miner_hotkey']}\n{row['hf_repo_id']}\n"
                                f"{row['hf_repo_commit']}".encode()).hexdigest()
        assert row["random_seed"] != int(digest[16:24], 16)
    first.db.close()
    restarted = make_state()
    restarted.intake.add_commitments(snapshot(101, commitments))  # the same, read again
    assert {r["miner_hotkey"]: r["random_seed"] for r in seeded(restarted)} == seeds


def seeded(state):
    return state.db.query("select miner_hotkey, hf_repo_id, hf_repo_commit, random_seed "
                          "from jobs order by job_id")
