"""[weights]: evaluation scores become weights on chain, through the real bittensor SDK's
SetWeights intent on the fake substrate of test_bittensor_chain (which answers the queries the
intent makes and records what compose/submit receive), with a real PostgreSQL.

Time is a clock the test moves: the WeightSetter never sleeps, it schedules its next check."""

import json
import threading
import logging
import subprocess
import sys

import bittensor
import prometheus_client
import pytest
from bittensor.sp_core import Keypair
from conftest import ROOT, free_port, wait_until, write_chain, write_toml
from test_bittensor_chain import NETUID, FakeSubstrate, Neuron, hotkey

import chain as chains
import common
import parent

pytestmark = pytest.mark.usefixtures("token_symbol_cache")
U16 = 65535


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def wallet(tmp_path):
    wallet = bittensor.Wallet(name="test", hotkey="parent", path=str(tmp_path / "wallets"))
    wallet.create_new_hotkey(use_password=False, overwrite=True, suppress=True)
    return wallet


@pytest.fixture
def weights_db(make_dsn, tmp_path, wallet):
    """make(**weights_keys) -> (cfg, db): a parent's config with [weights] and its database."""
    dsn, made = make_dsn(), []

    def make(**keys):
        path = write_toml(tmp_path / "weights.toml", {
            "pg_database": dsn, "is_parent_validator": True, "auth": "off",
            "wallet_path": str(tmp_path / "wallets"), "wallet_name": "test",
            "hotkey_name": "parent",
            "subtensor": {"network": "local", "netuid": NETUID},
            "weights": {"enabled": True, "every_blocks": 10, **keys}})
        db = common.Database(dsn, parent.SCHEMA)
        made.append(db)
        return common.load_config(path), db

    yield make
    for db in made:
        db.close()


def add_job(db, hotkey_, commit_block, result, finished=0, status="completed"):
    """A finished job of `hotkey_`; `finished`: seconds after an hour ago."""
    db.query(
        """insert into jobs (fingerprint, submission_id, miner_hotkey, miner_uid, hf_repo_id,
               hf_repo_commit, commit_block, env_provider, env_name, random_seed, max_retries,
               status, success, result, finished_at)
           values (md5(random()::text), 1, %s, 0, 'org/m', 'rev', %s, 'demo', 'demo-env', 1, 3,
               %s, %s, %s, now() - interval '1 hour' + make_interval(secs => %s))""",
        (hotkey_, commit_block, status, status == "completed", result, finished))


def score(value):
    return json.dumps({"score": value, "evaluator": "test"})


def subnet_of(wallet, miners, block=1000, **ours):
    """A fake subnet at `block`: our validator at uid 0, then the miners (uids 1...)."""
    return FakeSubstrate(block, [Neuron(wallet.hotkey.ss58_address, 50_000.0, validator=True,
                                        **ours)] + list(miners))


def settle(setter):
    """Run the setter's checks until its submission (if any) is answered and recorded."""
    setter.maybe_set()
    wait_until(lambda: setter.maybe_set() or setter.submission is None, timeout=30,
               what="the submission's answer")


def attempts(db):
    return db.query("select block, uids, weights, commit_reveal, success, message "
                    "from weight_attempts order by attempt_id")


def sent(fake):
    """(function, params) of each call submitted, its signature checked against our hotkey."""
    return [(name, args[0].function, args[0].params) for name, args in fake.calls
            if name == "submit"]


def test_known_scores_become_the_exact_u16_weights_sent_signed_by_our_hotkey(
        make_chain, weights_db, wallet):
    cfg, db = weights_db()
    m = [hotkey(i) for i in range(1, 5)]
    fake = subnet_of(wallet, [Neuron(h, 100.0) for h in m])
    add_job(db, m[0], 900, score(3.0))
    add_job(db, m[1], 900, score(2.0))
    add_job(db, m[2], 900, score(1.0))  # m[3]: no job, no weight
    clock = Clock()
    setter = chains.WeightSetter(cfg, db, make_chain(fake), wallet.hotkey, clock)
    metric = prometheus_client.REGISTRY.get_sample_value
    set_before = metric("validator_weight_attempts_total", {"outcome": "set"}) or 0

    settle(setter)

    assert metric("validator_weight_attempts_total", {"outcome": "set"}) == set_before + 1
    assert metric("validator_weights_last_set_block") == 1000
    assert sent(fake) == [("submit", "set_mechanism_weights", {
        "netuid": NETUID, "mecid": 0, "dests": [1, 2, 3],
        "weights": [U16, 43690, 21845], "version_key": 0})]
    call, signature = fake.submitted[0]
    assert Keypair(ss58_address=wallet.hotkey.ss58_address).verify(repr(call).encode(),
                                                                    signature)
    submit_options = [args[2] for name, args in fake.calls if name == "submit"][0]
    assert submit_options["wait_for_inclusion"] and not submit_options["wait_for_finalization"]
    [row] = attempts(db)
    assert row["block"] == 1000 and row["uids"] == [1, 2, 3] and row["success"] is True
    assert row["weights"] == pytest.approx([0.5, 1 / 3, 1 / 6])
    assert row["commit_reveal"] is False and row["message"] == "included"
    # The next check is every_blocks later; until then nothing reaches the chain.
    calls = len(fake.calls)
    for _ in range(20):
        setter.maybe_set()
    assert len(fake.calls) == calls
    assert setter.next_check == pytest.approx(clock.now + 10 * 12.0)


def test_max_weight_limit_is_applied_by_the_sdk(make_chain, weights_db, wallet):
    cfg, db = weights_db()
    m = [hotkey(i) for i in range(1, 5)]
    fake = subnet_of(wallet, [Neuron(h, 100.0) for h in m])
    fake.hyperparameters["MaxWeightsLimit"] = U16 // 2  # no uid above about half the total
    for h, value in zip(m, (8.0, 1.0, 1.0, 1.0)):
        add_job(db, h, 900, score(value))
    setter = chains.WeightSetter(cfg, db, make_chain(fake), wallet.hotkey, Clock())

    settle(setter)

    [(_, _, params)] = sent(fake)
    values = params["weights"]
    assert params["dests"] == [1, 2, 3, 4] and max(values) == U16
    # The chain's own check: max / sum <= max_weight_limit / 65535 (8 / 11 was far above).
    assert max(values) / sum(values) <= (U16 // 2) / U16 + 1e-4
    assert attempts(db)[0]["success"] is True


def test_rate_limited_it_waits_for_the_block_without_failing_or_polling(
        make_chain, weights_db, wallet, caplog):
    cfg, db = weights_db(every_blocks=1)
    m = hotkey(1)
    fake = subnet_of(wallet, [Neuron(m, 100.0)], block=1000, last_update=990)
    fake.hyperparameters["WeightsSetRateLimit"] = 100
    add_job(db, m, 900, score(1.0))
    clock = Clock()
    setter = chains.WeightSetter(cfg, db, make_chain(fake), wallet.hotkey, clock)

    setter.maybe_set()
    calls = len(fake.calls)
    for _ in range(50):  # the main loop calls it every second: no chain call until the block
        setter.maybe_set()
    clock.now += 89 * 12.0
    setter.maybe_set()
    assert len(fake.calls) == calls and sent(fake) == [] and attempts(db) == []

    clock.now += 12.0
    fake.block = 1090  # the rate limit's block: 100 after our last update
    settle(setter)

    assert [params["dests"] for _, _, params in sent(fake)] == [[1]]
    assert [row["success"] for row in attempts(db)] == [True]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_the_sdks_rate_limit_refusal_is_a_wait_not_a_failure(make_chain, weights_db, wallet,
                                                            caplog):
    """Another setter with our hotkey landed between our read and our submission: the intent
    refuses (RATE_LIMITED) before signing; the next check reads the wait."""
    cfg, db = weights_db(every_blocks=1)
    m = hotkey(1)
    fake = subnet_of(wallet, [Neuron(m, 100.0)], block=1000)
    add_job(db, m, 900, score(1.0))
    clock = Clock()
    setter = chains.WeightSetter(cfg, db, make_chain(fake), wallet.hotkey, clock)
    real_metagraph = fake.metagraph

    def metagraph_then_someone_sets():
        graph = real_metagraph()
        fake.neurons[0].last_update = fake.block  # after our read, before the intent's
        return graph
    fake.metagraph = metagraph_then_someone_sets

    settle(setter)

    assert sent(fake) == []
    [row] = attempts(db)
    assert row["success"] is False and "rate limit is 100 blocks" in row["message"]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert setter.next_check == pytest.approx(clock.now + 12.0)  # one block, then re-read
    fake.metagraph = real_metagraph
    clock.now += 12.0
    setter.maybe_set()
    assert setter.next_check == pytest.approx(clock.now + 100 * 12.0)


def test_commit_reveal_on_uses_the_timelocked_commit(make_chain, weights_db, wallet):
    cfg, db = weights_db()
    m = hotkey(1)
    fake = subnet_of(wallet, [Neuron(m, 100.0), Neuron(hotkey(2), 100.0)])
    fake.hyperparameters["CommitRevealWeightsEnabled"] = True
    add_job(db, m, 900, score(0.7))
    add_job(db, hotkey(2), 900, score(0.3))
    setter = chains.WeightSetter(cfg, db, make_chain(fake), wallet.hotkey, Clock())

    settle(setter)

    [(_, function, params)] = sent(fake)
    assert function == "commit_timelocked_mechanism_weights"
    assert params["netuid"] == NETUID and params["reveal_round"] > 0 and params["commit"]
    assert "dests" not in params  # the weights travel sealed
    [row] = attempts(db)
    assert row["commit_reveal"] is True and row["success"] is True
    assert "timelocked: revealed at drand round" in row["message"]


def test_a_failure_on_chain_is_logged_once_and_tried_again_next_interval(
        make_chain, weights_db, wallet, caplog):
    cfg, db = weights_db(every_blocks=10)
    fake = subnet_of(wallet, [Neuron(hotkey(1), 100.0)])
    fake.hyperparameters["WeightsSetRateLimit"] = 0
    fake.answer = bittensor.ExtrinsicResult(success=False,
                                            message="NotEnoughStakeToSetWeights\n  at block")
    add_job(db, hotkey(1), 900, score(1.0))
    clock = Clock()
    setter = chains.WeightSetter(cfg, db, make_chain(fake), wallet.hotkey, clock)

    settle(setter)

    [row] = attempts(db)
    assert row["success"] is False and row["message"] == "NotEnoughStakeToSetWeights at block"
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == ["Weights not set (tried again in 10 blocks): NotEnoughStakeToSetWeights "
                        "at block"]
    for _ in range(20):
        setter.maybe_set()
    assert len(sent(fake)) == 1
    clock.now += 10 * 12.0
    fake.block += 10
    fake.answer = None
    settle(setter)
    assert [r["success"] for r in attempts(db)] == [False, True] and len(sent(fake)) == 2


def test_a_deregistered_hotkey_and_a_uid_that_changed_hands_get_nothing(
        make_chain, weights_db, wallet):
    cfg, db = weights_db()
    kept, gone, old_owner, new_owner, again = (hotkey(i) for i in range(1, 6))
    # uid 2 was old_owner's when it scored; new_owner took it at block 950 and has no job.
    # `again` registered anew at block 950: its score from block 900 was its last life's.
    fake = subnet_of(wallet, [Neuron(kept, 100.0), Neuron(new_owner, 100.0, registered_at=950),
                              Neuron(again, 100.0, registered_at=950)])
    add_job(db, kept, 900, score(2.0))
    add_job(db, gone, 900, score(5.0))
    add_job(db, old_owner, 900, score(5.0))
    add_job(db, again, 900, score(5.0))
    setter = chains.WeightSetter(cfg, db, make_chain(fake), wallet.hotkey, Clock())

    settle(setter)

    [(_, _, params)] = sent(fake)
    assert params["dests"] == [1] and params["weights"] == [U16]
    add_job(db, again, 960, score(1.0))  # a submission of its new life counts
    rows = chains.weight_table(db, cfg.weights, setter.chain.subnet(setter.hotkey).neurons,
                               set())
    assert [(r.uid, r.hotkey, r.score) for r in rows] == [(1, kept, 2.0), (3, again, 1.0)]


def test_latest_and_ema_against_hand_computed_scores(weights_db, caplog):
    cfg, db = weights_db()
    m = hotkey(1)
    # Completion order differs from submission order: 1.0, then 0.0, then 0.5.
    add_job(db, m, 903, score(1.0), finished=0)
    add_job(db, m, 901, score(0.0), finished=10)
    add_job(db, m, 902, score(0.5), finished=20)
    add_job(db, m, 904, "evaluator crashed: no JSON", finished=30)
    add_job(db, m, 905, score(float("nan")), finished=40)
    add_job(db, m, 906, score(-1.0), finished=50)
    add_job(db, m, 907, score(9.0), finished=60, status="failed")  # not a completed result
    neurons = [chains.Neuron(7, m, 0)]
    skipped = set()

    # Each job here is a submission of its own (a suite of one entry, one repeat). With
    # failed_scores = "skip" a submission without a valid score counts nothing.
    cfg.weights.failed_scores = "skip"
    [latest] = chains.weight_table(db, cfg.weights, neurons, skipped)
    cfg.weights.aggregation, cfg.weights.ema_alpha = "ema", 0.5
    [ema] = chains.weight_table(db, cfg.weights, neurons, skipped)

    assert (latest.uid, latest.score, latest.weight) == (7, 1.0, 1.0)  # block 903's
    # 0.5*1.0 = 0.5; 0.5*0.0 + 0.5*0.5 = 0.25; 0.5*0.5 + 0.5*0.25 = 0.375
    assert ema.score == pytest.approx(0.375)
    # With "zero" (the default), the four without a valid score count 0: the latest is block
    # 907's 0, and the moving average goes on from 0.375 through four halvings.
    cfg.weights.failed_scores = "zero"
    [ema_zero] = chains.weight_table(db, cfg.weights, neurons, skipped)
    cfg.weights.aggregation = "latest"
    [latest_zero] = chains.weight_table(db, cfg.weights, neurons, skipped)
    assert (latest_zero.score, ema_zero.score) == (0.0, pytest.approx(0.375 / 16))
    bad = [r.getMessage() for r in caplog.records if "contributes no score" in r.getMessage()]
    assert len(bad) == 3  # each bad job once, though read twice
    assert any("not JSON" in line for line in bad) and any("-1.0" in line for line in bad)
    assert any("nan" in line for line in bad)


def test_a_restart_does_not_set_again_within_the_rate_limit(make_chain, weights_db, wallet):
    cfg, db = weights_db(every_blocks=1)
    fake = subnet_of(wallet, [Neuron(hotkey(1), 100.0)])
    add_job(db, hotkey(1), 900, score(1.0))
    chain = make_chain(fake)
    settle(chains.WeightSetter(cfg, db, chain, wallet.hotkey, Clock()))
    assert len(sent(fake)) == 1

    fake.block += 5
    restarted = chains.WeightSetter(*weights_db(every_blocks=1), chain, wallet.hotkey, Clock())
    settle(restarted)

    assert len(sent(fake)) == 1 and len(attempts(db)) == 1
    assert restarted.next_check == pytest.approx(Clock().now + 95 * 12.0)


def test_a_submission_that_times_out_but_lands_is_not_sent_again(make_chain, weights_db,
                                                                 wallet, caplog):
    cfg, db = weights_db(every_blocks=1)
    fake = subnet_of(wallet, [Neuron(hotkey(1), 100.0)])
    fake.seconds_per_block, fake.submit_seconds = 0.05, 5.0  # a 0.2 s deadline
    add_job(db, hotkey(1), 900, score(1.0))
    clock = Clock()
    setter = chains.WeightSetter(cfg, db, make_chain(fake), wallet.hotkey, clock)

    settle(setter)

    [row] = attempts(db)
    assert row["success"] is False and row["message"].startswith("no answer within 0.2s")
    clock.now += 1.0
    fake.block += 1
    setter.maybe_set()  # it landed: the chain's LastUpdate says wait out the rate limit
    assert len(sent(fake)) == 1 and setter.submission is None
    assert setter.next_check == pytest.approx(clock.now + 99 * 0.05)


def test_nothing_to_set_sets_nothing_and_says_so_once(make_chain, weights_db, wallet, caplog):
    cfg, db = weights_db(every_blocks=1)
    fake = subnet_of(wallet, [Neuron(hotkey(1), 100.0)])
    add_job(db, hotkey(1), 900, score(0.0))
    add_job(db, hotkey(9), 900, score(1.0))  # not registered
    clock = Clock()
    setter = chains.WeightSetter(cfg, db, make_chain(fake), wallet.hotkey, clock)
    caplog.set_level(logging.INFO)

    for _ in range(3):
        setter.maybe_set()
        clock.now += 12.0

    assert sent(fake) == [] and attempts(db) == []
    said = [r.getMessage() for r in caplog.records if "nothing set" in r.getMessage()]
    assert said == ["Weights: nothing set at block 1000: no registered miner has a score above 0"]


def test_weights_on_a_file_chain_is_a_config_error_and_off_is_none(tmp_path, make_dsn):
    path = write_toml(tmp_path / "p.toml", {
        "pg_database": make_dsn(), "is_parent_validator": True,
        "subtensor": {"network": "file", "commitments_file": "c.json"},
        "weights": {"enabled": True}})
    cfg = common.load_config(path)
    with pytest.raises(common.ConfigError, match=r"p\.toml: key 'weights\.enabled' needs"):
        chains.open_weights(cfg, chains.open_chain(cfg), None)
    cfg.weights.enabled = False
    assert chains.open_weights(cfg, chains.open_chain(cfg), None) is None


@pytest.mark.parametrize("key, value, message", [
    ("aggregation", "mean", "must be \"latest\" or \"ema\""),
    ("ema_alpha", 0.0, "must be above 0 and at most 1"),
    ("ema_alpha", 1.5, "must be above 0 and at most 1"),
    ("every_blocks", -1, "must be 0 \\(the subnet's tempo\\) or more"),
    ("enabled", "yes", "must be true or false"),
])
def test_bad_weights_keys_are_named(tmp_path, key, value, message):
    path = write_toml(tmp_path / "p.toml", {"pg_database": "x", "is_parent_validator": True,
                                             "weights": {key: value}})
    with pytest.raises(common.ConfigError, match=rf"p\.toml: key 'weights\.{key}' {message}"):
        common.load_config(path)


def test_the_weights_command_on_a_file_chain(tmp_path, make_dsn):
    dsn = make_dsn()
    db = common.Database(dsn, parent.SCHEMA)
    add_job(db, "5Miner001", 90, score(3.0))
    add_job(db, "5Miner002", 90, score(1.0))
    add_job(db, "5Miner003", 90, score(4.0))
    add_job(db, "5Gone", 90, score(9.0))
    db.close()
    # Miner 3 is registered and has a score, but no commitment now: it is weighed too.
    write_chain(tmp_path / "chain.json", 120, [
        {"hotkey": "5Miner001", "uid": 1, "block": 90, "stake": 1.0, "data": "org/a@1"},
        {"hotkey": "5Miner002", "uid": 2, "block": 90, "stake": 1.0, "data": "org/b@2"}],
        [{"hotkey": f"5Miner00{uid}", "uid": uid} for uid in (1, 2, 3)])
    config = write_toml(tmp_path / "p.toml", {
        "pg_database": dsn, "is_parent_validator": True,
        "subtensor": {"network": "file", "commitments_file": str(tmp_path / "chain.json")}})

    def run(*args):
        result = subprocess.run([sys.executable, "validator.py", "weights", "--config",
                                 str(config), *args], cwd=ROOT, capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0, result.stderr
        return result.stdout

    report = json.loads(run("--json"))
    text = run()

    assert report["block"] == 120 and report["attempts"] == []
    assert [(r["uid"], r["hotkey"], r["score"], r["weight"], r["u16"])
            for r in report["rows"]] == [(1, "5Miner001", 3.0, 0.375, None),
                                         (2, "5Miner002", 1.0, 0.125, None),
                                         (3, "5Miner003", 4.0, 0.5, None)]
    assert "no chain to set these weights on" in report["note"]
    assert "5Miner001" in text and "0.3750" in text and "no chain to set" in text


def test_the_weights_report_on_a_chain_shows_the_sdks_u16_values(make_chain, weights_db,
                                                                 wallet):
    cfg, db = weights_db()
    fake = subnet_of(wallet, [Neuron(hotkey(1), 100.0), Neuron(hotkey(2), 100.0)])
    add_job(db, hotkey(1), 900, score(3.0))
    add_job(db, hotkey(2), 900, score(1.0))

    report = chains.weights_report(cfg, db, make_chain(fake))

    assert [(r["uid"], r["weight"], r["u16"]) for r in report["rows"]] == [
        (1, 0.75, U16), (2, 0.25, 21845)]
    assert report["note"] == "" and sent(fake) == []  # a dry run: nothing submitted


@pytest.mark.parametrize("enabled", [False, True])
def test_the_parent_writes_to_the_chain_only_with_weights_enabled(
        make_chain, weights_db, wallet, monkeypatch, enabled):
    """parent.run as the process runs it, on the fake chain: without [weights] it reads the
    chain as before and never writes; with it, it sets weights from its loop."""
    cfg, db = weights_db(enabled=enabled, every_blocks=1)
    cfg.listen_host, cfg.parent_port, cfg.neuron.sync_frequency = "127.0.0.1", free_port(), 0.2
    fake = subnet_of(wallet, [Neuron(hotkey(1), 100.0)])
    add_job(db, hotkey(1), 900, score(1.0))
    monkeypatch.setattr(chains, "open_chain", lambda cfg: make_chain(fake))
    stop = threading.Event()
    thread = threading.Thread(target=parent.run, args=(cfg, stop))
    thread.start()
    try:
        wait_until(lambda: fake.names().count("runtime_call") >= 4, what="a few chain reads")
        if enabled:
            wait_until(lambda: [a["success"] for a in attempts(db)] == [True],
                       what="weights set")
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive()
    if enabled:
        assert [params["dests"] for _, _, params in sent(fake)] == [[1]]
        assert attempts(db)[0]["success"] is True
    else:
        assert {"query", "compose", "submit"}.isdisjoint(fake.names())
        assert attempts(db) == []


def test_the_weights_report_within_the_rate_limit_says_why_there_are_no_u16_values(
        make_chain, weights_db, wallet):
    cfg, db = weights_db()
    fake = subnet_of(wallet, [Neuron(hotkey(1), 100.0)], block=1000, last_update=995)
    add_job(db, hotkey(1), 900, score(3.0))

    report = chains.weights_report(cfg, db, make_chain(fake))

    assert [(r["uid"], r["weight"], r["u16"]) for r in report["rows"]] == [(1, 1.0, None)]
    assert report["note"].startswith("the SDK's dry run failed: ChainError: Weights on netuid 2 "
                                     "were last set 5 blocks ago")
