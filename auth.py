"""Who a peer is: what the parent and child validators sign, check and encrypt.

Its parts, in order:
- What each signature covers: signed_message (the bytes), then one *_fields function per kind
  of message (docs/security.md, "What is signed").
- Identity, this validator's hotkey, which signs; Verifier, which checks signatures, times and
  nonces; NonceLedger, the nonces already used, in the validator's database.
- tls_contexts (TLS 1.3, mutual with tls_ca) and hotkey_auth, a role's (identity, verifier).

Everything here is synchronous.
"""

import hashlib
import json
import secrets
import ssl
import threading
import time
from pathlib import Path

import prometheus_client

from common import ConfigError, Refused, log

AUTH_FAILURES = prometheus_client.Counter(
    "validator_auth_failures", "Calls refused because their hotkey signature did not hold")


# ---------------------------------------------------------------------------------------------
# What is signed: validators prove who they are as Bittensor operators do, by sr25519 signatures
# ---------------------------------------------------------------------------------------------

def signed_message(*fields):
    """The bytes a signature covers: the fields as a compact JSON list, so no two differ."""
    return json.dumps(list(fields), separators=(",", ":")).encode()


# What each signed message covers (docs/security.md, "What is signed"). The first field names
# the kind of message, so that a signature of one kind is never valid as another.
JOB_FIELDS = {  # every field of an EvaluationJobData the child acts on, with its unsent value
    "jobId": 0, "attempt": 0, "submissionId": 0, "minerHotkey": "", "hfRepoId": "",
    "hfRepoCommit": "", "envProvider": "", "envName": "", "logsPath": "", "randomSeed": 0,
    "maxRetries": 0, "retryCount": 0, "createdAt": 0}


def job_fields(child_id, job):
    """The parent's signature over a job it hands to child_id (pulled or pushed)."""
    return ["job", child_id, *(job.get(name, unsent) for name, unsent in JOB_FIELDS.items())]


def result_fields(child_id, job_id, attempt, success, result, retryable=False):
    """The child's signature over its result of one attempt at a job. A retryable failure
    (not the miner's fault) adds one field, so that a result signed before the flag existed
    reads as final, and the flag cannot be turned either way without the child's key."""
    return ["result", child_id, job_id, attempt, bool(success),
            hashlib.sha256(result.encode()).hexdigest(), *(["retryable"] if retryable else [])]


def reply_fields(child_id, job_id, attempt, acknowledged, message):
    """The parent's signature over its answer to one result."""
    return ["reply", child_id, job_id, attempt, bool(acknowledged), message]


def revocation_fields(child_id, job_id, attempt, reason):
    """The parent's signature over taking back one attempt at a job from child_id."""
    return ["revoke", child_id, job_id, attempt, reason]


def push_fields(child_id, job_id):
    """The parent's signature over the call that pushes a job (receiveJob), with its time and
    nonce; the job inside carries its own (job_fields)."""
    return ["receiveJob", child_id, job_id]


def registration_fields(child_id, endpoint, parent_hotkey, challenge):
    """A child's registration, bound to the challenge the parent chose for this connection."""
    return ["registerChild", child_id, endpoint, parent_hotkey, bytes(challenge).hex()]


# ---------------------------------------------------------------------------------------------
# Signing and checking: this validator's hotkey, and the checks of a peer's
# ---------------------------------------------------------------------------------------------

class Identity:
    """This validator's wallet hotkey (wallet_path, wallet_name, hotkey_name), which signs."""

    def __init__(self, cfg):
        import bittensor
        path = Path(cfg.wallet_path).expanduser()
        try:
            self.keypair = bittensor.Wallet(name=cfg.wallet_name, hotkey=cfg.hotkey_name,
                                            path=str(path)).hotkey
        except Exception as e:
            raise ConfigError(f"{cfg.config_path}: cannot load hotkey '{cfg.hotkey_name}' of "
                              f"wallet '{cfg.wallet_name}' under {path}: {e}") from None
        self.hotkey = self.keypair.ss58_address

    def sign(self, *fields):
        """(timestamp in unix ms, nonce, signature) over the fields, the time and the nonce."""
        timestamp, nonce = int(time.time() * 1000), secrets.token_hex(16)
        return timestamp, nonce, self.keypair.sign(signed_message(*fields, timestamp, nonce))

    def seal(self, fields):
        """The signature over the fields alone: for what carries its own freshness (a job's
        attempt, a result's attempt)."""
        return self.keypair.sign(signed_message(*fields))


class Verifier:
    """Checks signatures. A signed call (check) carries a timestamp that must be within
    auth_window_seconds of ours, give or take auth_max_clock_skew_seconds, and a nonce never
    used before: each is kept in the database (NonceLedger) past the window, so a replay is
    refused after a restart too, and by every parent sharing that database. Refusals are
    counted, and logged at most once every ten seconds."""

    def __init__(self, window, skew, nonces):
        self.window, self.skew, self.nonces = window, skew, nonces
        self.lock = threading.Lock()
        self.failures, self.last_log = 0, 0.0

    def check(self, hotkey, fields, timestamp, nonce, signature):
        """None if the call is good, else the reason (for our log, not for the caller)."""
        age = time.time() - timestamp / 1000
        if not -self.skew <= age <= self.window + self.skew:
            return (f"its time is {age:+.0f}s off this validator's clock, over the "
                    f"{self.window:g}s window and {self.skew:g}s of clock skew allowed: check "
                    "both clocks (NTP)")
        if not 8 <= len(nonce) <= 64:
            return "no nonce"
        if not self.holds(hotkey, [*fields, timestamp, nonce], signature):
            return f"bad signature for hotkey {hotkey!r}"
        # Only a good signature spends a nonce: nobody else can fill the ledger.
        if not self.nonces.first_use(nonce, self.window + 2 * self.skew):
            return "nonce already used (a replay)"
        return None

    @staticmethod
    def holds(hotkey, fields, signature):
        """True if `signature` is hotkey's over the fields."""
        from bittensor.sp_core import Keypair
        try:
            return Keypair(ss58_address=hotkey).verify(signed_message(*fields), bytes(signature))
        except Exception:  # not an ss58 address, a signature of the wrong length...
            return False

    def refuse(self, what, reason, peer):
        """Count and log a refused call from `peer`, then raise the one answer an attacker
        gets."""
        self.count(what, reason, peer)
        raise Refused("not allowed")

    def count(self, what, reason, peer):
        """Count a refusal, and log it unless one was logged in the last ten seconds."""
        AUTH_FAILURES.inc()
        with self.lock:
            self.failures += 1
            log_it = time.monotonic() - self.last_log >= 10.0
            if log_it:
                self.last_log = time.monotonic()
        if log_it:
            log.warning("Refused %s from %s: %s (%d refused so far)", what, peer, reason,
                        self.failures)


# The nonces of signed calls, one table per validator database (a step of each role's schema).
NONCES_SCHEMA = """
-- Nonces of signed calls already taken, kept past the window in which their signature is
-- valid, so that a replay is refused after a restart too (auth.NonceLedger).
create table if not exists used_nonces (
    nonce      text primary key,
    expires_at timestamptz not null
);
create index if not exists used_nonces_expiry on used_nonces (expires_at);
"""


class NonceLedger:
    """The nonces already used, in the validator's database: durable, and shared by the
    parents of a pair. Only calls whose signature held come here, so its size is bounded by
    what allowed hotkeys sign within a window."""

    def __init__(self, db):
        self.db = db

    def first_use(self, nonce, seconds):
        """Record the nonce for `seconds`; False if it was used already (a replay)."""
        rows = self.db.query(
            """with expired as (delete from used_nonces where expires_at < now())
               insert into used_nonces values (%s, now() + make_interval(secs => %s))
               on conflict (nonce) do nothing returning 1""", (nonce, seconds))
        return bool(rows)


# ---------------------------------------------------------------------------------------------
# TLS, and a role's identity and verifier
# ---------------------------------------------------------------------------------------------

def tls_contexts(cfg):
    """(server context, client context) for TLS 1.3 from tls_cert and tls_key, or (None, None)
    without them. With tls_ca both sides must show a certificate that CA signed (mutual TLS);
    without it, a client checks the server against the system's CAs."""
    if not cfg.tls_cert:
        return None, None
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # checks the certificate and host name
    try:
        for context in (server, client):
            context.minimum_version = ssl.TLSVersion.TLSv1_3
            context.load_cert_chain(cfg.tls_cert, cfg.tls_key)
            if cfg.tls_ca:
                context.load_verify_locations(cfg.tls_ca)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"{cfg.config_path}: keys 'tls_cert', 'tls_key', 'tls_ca': {e}") from None
    if cfg.tls_ca:
        server.verify_mode = ssl.CERT_REQUIRED
    else:
        client.load_default_certs()
    return server, client


def hotkey_auth(cfg, port, db):
    """(identity, verifier) for this validator, or (None, None) with auth = "off"; `db` keeps
    the nonces the verifier has seen."""
    if cfg.auth == "off":
        log.warning('AUTH IS OFF (auth = "off"): anyone who reaches port %d can %s', port,
                    "register, take jobs and report results" if cfg.is_parent_validator
                    else "push jobs to this child")
        return None, None
    return Identity(cfg), Verifier(cfg.auth_window_seconds, cfg.auth_max_clock_skew_seconds,
                                   NonceLedger(db))
