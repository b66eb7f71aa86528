"""The dashboard: read-only HTML pages of what a validator is doing, served on
dashboard_host:dashboard_port when dashboard_port is set (docs/operations.md, "Dashboard").

The parent's pages are the overview (role, chain, the queue, throughput, weights, the alerts
that hold now), the children, the jobs (filtered, paged), one job's journey with its proof,
and the miners with their scores and weights; a child has one page: its queue, its running
evaluations with the tail of their logs, and its last results with the parent's
acknowledgement. Nothing here writes: the command line changes things (validator.py).

Its parts, in order:
- serve_parent() and serve_child(): what each role's run() calls. The server runs in a daemon
  thread; a port it cannot bind is one ConfigError naming the key.
- Server and Handler: http.server's, bounded. At most MAX_CONNECTIONS requests at once (one
  past it is answered 503 at once, on the accepting thread), one request per connection,
  REQUEST_SECONDS to send the request and WRITE_SECONDS to take the answer, a request target
  of at most MAX_TARGET characters, GET only (anything else: 405).
- PageDatabase: the pages' own connection, read-only, each statement under a timeout; apart
  from the role's Database, so a page never waits for the protocol nor holds it up. Pages
  take turns on it: one that waits longer than DB_WAIT_SECONDS is answered 503.
- The request's parameters: each page names those it takes and checks them (400 otherwise).
- HTML: every text goes through esc(); the frame with its one stylesheet, figures, tables
  (each cell marked data-k, with its raw value in data-v where the text is formatted, so that
  tests read what a page says), and the SVG bar chart.
- ParentPages: one reader (bounded queries) and one renderer per page: overview, children,
  jobs, job, miners.
- ChildPages: the child's page.

Standard library only, besides what the roles import already; synchronous: one thread per
request. A page shows the columns its reader's rows carry, so that a column another part adds
to getStats' children or to the assignments table shows up without a change here.
"""

import contextlib
import datetime
import errno
import html
import http.server
import io
import json
import re
import shlex
import socket
import threading
import time
import types
import urllib.parse
from pathlib import Path

import prometheus_client
import psycopg

import chain as chains
import common
import evaluator
from common import log

MAX_CONNECTIONS = 16        # requests served at once; one more is answered 503 at once
REQUEST_SECONDS = 5.0       # to send the request line and headers, all of them
WRITE_SECONDS = 10.0        # to take the answer
MAX_TARGET = 2048           # characters of the request target (path and query)
MAX_PARAMETERS = 8
STATEMENT_TIMEOUT_MS = 2000  # each statement of a page
DB_WAIT_SECONDS = 5.0       # a page waits this long for its turn on the pages' connection
REFRESH_SECONDS = 5         # the overview, children and child pages reload themselves
PAGE_SIZE = 50              # jobs on one page of the jobs list
ROWS_PER_PAGE = 100         # children or miners on one page
MAX_OFFSET = 100_000        # the furthest page of children or miners
MAX_ASSIGNMENTS = 100       # a job's hand-overs shown, the latest
RESULT_SHOWN = 64 << 10     # characters of a job's result on its page
RESULT_EXCERPT = 120        # characters of a result in a list
LOG_TAIL_BYTES = 4096       # of a running evaluation's log file
MAX_RUNNING = 32            # running evaluations shown on a child's page
LAST_RESULTS = 50           # a child's last results shown
STALL_SECONDS = 600         # a queue with nothing finished this long is an alert
MINERS_CACHE_SECONDS = 10.0  # the scores are computed again at most this often
STATUSES = ("pending", "assigned", "completed", "failed", "cancelled")


# ---------------------------------------------------------------------------------------------
# The hooks: each role's run() calls one of these
# ---------------------------------------------------------------------------------------------

def serve_parent(cfg, dsn, state, weights=None):
    """With dashboard_port: serve the parent's pages, from its ParentState (the role, the last
    chain sync) and its WeightSetter (when the next check is due), reading `dsn`."""
    if cfg.dashboard_port:
        return serve(cfg, ParentPages(cfg, PageDatabase(dsn), state, weights))
    return None


def serve_child(cfg, dsn, store, logs_dir):
    """With dashboard_port: serve the child's page, reading `dsn`; `store` is its ChildStore
    (whose counts getStats answers with), `logs_dir` where its evaluators' logs are."""
    if cfg.dashboard_port:
        return serve(cfg, ChildPages(cfg, PageDatabase(dsn), store, logs_dir))
    return None


def serve(cfg, pages):
    host, port = cfg.dashboard_host, cfg.dashboard_port
    try:
        server = Server((host, port), pages)
    except OSError as e:
        raise listen_error(cfg, host, port, e) from None
    threading.Thread(target=server.serve_forever, name="dashboard", daemon=True).start()
    log.info("Dashboard on http://%s:%d/", host if ":" not in host else f"[{host}]", port)
    return server


def listen_error(cfg, host, port, error):
    """The one line an operator reads (as rpc.listen_error words it for the RPC port)."""
    if isinstance(error, socket.gaierror) or error.errno == errno.EADDRNOTAVAIL:
        key, hint = "dashboard_host", ""
    else:
        key = "dashboard_port"
        hint = ", or stop the process that holds the port" if error.errno == errno.EADDRINUSE \
            else ""
    reason = (error.strerror or str(error)).lower()
    return common.ConfigError(f"{cfg.config_path}: cannot listen on {host}:{port}: {reason}; "
                              f"change key '{key}'{hint}")


# ---------------------------------------------------------------------------------------------
# The server: http.server's, with a bound on everything a client can make it spend
# ---------------------------------------------------------------------------------------------

BUSY = ("HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
        "Retry-After: 1\r\nConnection: close\r\n\r\n"
        f"busy: {MAX_CONNECTIONS} requests are being served; try again\n").encode()


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64

    def __init__(self, address, pages):
        self.pages = pages
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, Handler)

    def server_bind(self):
        # HTTPServer's looks the host's name up (socket.getfqdn), which may wait on DNS.
        http.server.socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def process_request(self, request, client_address):
        if self.slots.acquire(blocking=False):
            return super().process_request(request, client_address)  # a thread for it
        # Answered here, without blocking: what the client sent already is read first, since
        # closing a socket with unread data resets the connection, answer and all.
        with contextlib.suppress(OSError):
            request.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                request.recv(1 << 16)
            request.send(BUSY)
        self.shutdown_request(request)
        return None

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


class DeadlineReader(io.RawIOBase):
    """A socket's reads, all within one deadline: a client that sends its headers a byte at a
    time (slowloris) is dropped when the deadline passes, however often it sends."""

    def __init__(self, sock, deadline):
        super().__init__()
        self.sock, self.deadline = sock, deadline

    def readable(self):
        return True

    def readinto(self, buffer):
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"the request was not sent within {REQUEST_SECONDS:g}s")
        self.sock.settimeout(left)
        return self.sock.recv_into(buffer)


class Handler(http.server.BaseHTTPRequestHandler):
    server_version = "validator-dashboard"
    sys_version = ""
    protocol_version = "HTTP/1.0"  # one request per connection

    def setup(self):
        super().setup()
        self.rfile = io.BufferedReader(
            DeadlineReader(self.connection, time.monotonic() + REQUEST_SECONDS))

    def do_GET(self):
        if len(self.path) > MAX_TARGET:
            status, body = 414, error_page(414, f"the request target is over {MAX_TARGET} "
                                                "characters")
        else:
            status, body = self.server.pages.answer(self.path)
        self.answer(status, body)

    def __getattr__(self, name):  # do_POST, do_HEAD, do_ANYTHING: refused
        if name.startswith("do_"):
            return self.refuse
        raise AttributeError(name)

    def refuse(self):
        self.answer(405, error_page(405, "the dashboard is read-only: GET only; the command "
                                         "line (validator.py) changes things"), {"Allow": "GET"})

    def answer(self, status, body, headers=None):
        data = body.encode()
        self.connection.settimeout(WRITE_SECONDS)
        self.send_response(status)
        for name, value in {**SECURITY_HEADERS, "Content-Length": str(len(data)),
                            **(headers or {})}.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":  # its answer is the headers alone
            self.wfile.write(data)

    def log_message(self, format, *args):
        log.debug("Dashboard: %s %s", self.address_string(), format % args)


# No script, no asset from anywhere: even a text that escaped esc() could run nothing.
SECURITY_HEADERS = {
    "Content-Type": "text/html; charset=utf-8",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
                               "img-src data:; base-uri 'none'; form-action 'self'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


# ---------------------------------------------------------------------------------------------
# The pages' own connection to the role's database
# ---------------------------------------------------------------------------------------------

class Unavailable(Exception):
    """The page cannot be read now (503): the database is down, slow, or busy with pages."""


class BadRequest(Exception):
    """A parameter the page does not take, or a value it refuses (400)."""


class NotFound(Exception):
    """No such page, or no such job (404)."""


class PageDatabase:
    """One connection of the pages' own, opened at the first page and again after a failure,
    in read-only transactions, each statement under STATEMENT_TIMEOUT_MS: whatever a page
    asks, it writes nothing, and neither waits for the protocol's connection nor holds it.
    transaction() and query() are those of common.Database, which chain.weight_table takes."""

    def __init__(self, dsn, timeout_ms=STATEMENT_TIMEOUT_MS):
        self.dsn, self.timeout_ms = dsn, timeout_ms
        self.lock = threading.RLock()
        self.conn = None

    @contextlib.contextmanager
    def transaction(self):
        if not self.lock.acquire(timeout=DB_WAIT_SECONDS):
            raise Unavailable("busy: other pages are being read; try again")
        try:
            if self.conn is None or self.conn.closed or self.conn.broken:
                self.conn = common.connect(
                    self.dsn, application_name="validator dashboard",
                    options=f"-c statement_timeout={self.timeout_ms} "
                            "-c default_transaction_read_only=on "
                            f"-c idle_in_transaction_session_timeout={self.timeout_ms * 5}")
            with self.conn.transaction():
                yield self.conn
        except common.DatabaseUnavailable as e:
            raise Unavailable(str(e)) from None
        except psycopg.errors.QueryCanceled:
            raise Unavailable(f"the page's query took over {self.timeout_ms} ms (its "
                              "statement_timeout): try again") from None
        except psycopg.OperationalError as e:
            self.close()
            raise Unavailable(f"lost the connection to PostgreSQL: {first_line(e)}") from None
        finally:
            self.lock.release()

    def query(self, sql, params=None):
        with self.transaction() as conn:
            cursor = conn.execute(sql, params)
            return cursor.fetchall() if cursor.description else []

    def close(self):
        with self.lock:
            if self.conn is not None:
                self.conn.close()


def first_line(error):
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


# ---------------------------------------------------------------------------------------------
# A request's parameters
# ---------------------------------------------------------------------------------------------

def parameters(query, allowed):
    """{name: value} of the query string, each value checked by allowed[name] (a function that
    returns it converted or raises ValueError); BadRequest for anything else."""
    try:
        pairs = urllib.parse.parse_qsl(query, max_num_fields=MAX_PARAMETERS)
    except ValueError:
        raise BadRequest(f"more than {MAX_PARAMETERS} parameters") from None
    found = {}
    for name, value in pairs:
        if name not in allowed:
            raise BadRequest(f"this page takes no parameter {name!r}"
                             + (f"; it takes {', '.join(allowed)}" if allowed else ""))
        if name in found:
            raise BadRequest(f"parameter {name!r} given twice")
        try:
            found[name] = allowed[name](value)
        except ValueError as e:
            raise BadRequest(f"parameter {name!r}: {e}") from None
    return found


def job_id_value(text):
    if not re.fullmatch(r"[0-9]{1,19}", text) or not 0 < int(text) < 2**63:
        raise ValueError("must be a job id")
    return int(text)


def offset_value(text):
    if not re.fullmatch(r"[0-9]{1,6}", text) or int(text) > MAX_OFFSET:
        raise ValueError(f"must be a number from 0 to {MAX_OFFSET}")
    return int(text)


def status_value(text):
    if text not in STATUSES:
        raise ValueError("must be " + ", ".join(STATUSES))
    return text


def name_value(text):
    if not 1 <= len(text) <= 64:
        raise ValueError("must be 1 to 64 characters")
    return text


# ---------------------------------------------------------------------------------------------
# HTML: escaping, the frame, figures, tables, the bar chart
# ---------------------------------------------------------------------------------------------

STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:0;color:#1c2630;background:#f6f7f9}
header{background:#22303c;color:#fff;padding:.45em 1em;display:flex;gap:1.4em;flex-wrap:wrap;
align-items:baseline}header b{margin-right:1em}header a{color:#b8c7d3;text-decoration:none}
header a.here{color:#fff;border-bottom:2px solid #6cb4ee}
main{padding:.2em 1em 1em}h1{font-size:20px;margin:.5em 0}h2{font-size:15px;margin:1.1em 0 .3em}
a{color:#1565c0}table{border-collapse:collapse;background:#fff;margin:.3em 0}
th,td{padding:.22em .6em;border-bottom:1px solid #e3e7eb;text-align:left;vertical-align:top}
th{background:#eef1f4;font-weight:600;font-size:13px}td.n{text-align:right}
dl{display:flex;flex-wrap:wrap;gap:.5em;margin:.3em 0}dl div{background:#fff;
border:1px solid #e3e7eb;padding:.3em .8em;min-width:7em}dt{color:#5f7282;font-size:12px}
dd{margin:0;font-size:18px}.alert{background:#fdecea;border-left:4px solid #c62828;
padding:.35em .8em;margin:.3em 0}.calm{background:#e9f5ea;border-left:4px solid #2e7d32;
padding:.35em .8em;margin:.3em 0}.note{color:#5f7282}.failed,.expired{color:#c62828}
.completed{color:#2e7d32}.assigned,.running{color:#1565c0}.cancelled,.withdrawn{color:#7b6b00}
pre{background:#1c2630;color:#e8edf1;padding:.5em .7em;overflow:auto;max-height:24em;
white-space:pre-wrap;word-break:break-all;margin:.3em 0}code{font-size:12px;word-break:break-all}
nav.pages{margin:.5em 0;display:flex;gap:1.5em}form{margin:.3em 0}
svg{background:#fff;border:1px solid #e3e7eb}svg .ok{fill:#43a047}svg .bad{fill:#e53935}
svg text{font-size:10px;fill:#5f7282}
"""


def esc(value):
    """Text for HTML: everything a miner, a peer or an evaluator wrote goes through here."""
    return "–" if value is None else html.escape(str(value), quote=True)


def frame(title, body, nav, here, refresh=False, name=""):
    links = "".join(f'<a href="{esc(href)}"{" class=here" if href == here else ""}>{esc(text)}</a>'
                    for href, text in nav)
    meta = f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">' if refresh else ""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width">{meta}'
            f"<title>{esc(title)} · {esc(name)}</title><style>{STYLE}</style></head><body>"
            f"<header><b>{esc(name)}</b>{links}</header><main><h1>{esc(title)}</h1>{body}"
            f'<p class="note">Read-only{f"; reloads every {REFRESH_SECONDS} s" if refresh else ""}'
            f"; read at {now}.</p></main></body></html>")


def error_page(status, message):
    title = f"{status} {http.HTTPStatus(status).phrase}"
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f"<style>{STYLE}</style></head><body><main><h1>{title}</h1>"
            f'<p class="alert" data-k="error">{esc(message)}</p><p><a href="/">overview</a></p>'
            "</main></body></html>")


def attr(name, value):
    return "" if value is None else f' {name}="{esc(value)}"'


def figure(key, label, text, raw=None, href=None):
    """One figure of a dl: `text` is HTML (escaped by the caller), `raw` the value in data-v."""
    shown = f'<a href="{esc(href)}">{text}</a>' if href else text
    return (f"<div><dt>{esc(label)}</dt><dd data-k=\"{esc(key)}\"{attr('data-v', raw)}>"
            f"{shown}</dd></div>")


def figures(items):
    return "<dl>" + "".join(items) + "</dl>"


class Column(types.SimpleNamespace):
    """A table's column: `key` of the rows (and the cells' data-k), `heading`, and `show`, the
    cell's HTML from the row (default: the value as text); `raw`: the value goes in data-v."""

    def __init__(self, key, heading=None, show=None, raw=False, number=False):
        super().__init__(key=key, heading=heading or key.replace("_", " "), show=show,
                         raw=raw, number=number)

    def cell(self, row):
        value = row.get(self.key)
        shown = self.show(row) if self.show else esc(value)
        raw = attr("data-v", value if not isinstance(value, datetime.datetime)
                   else value.timestamp()) if self.raw else ""
        return f'<td data-k="{esc(self.key)}"{raw}{" class=n" if self.number else ""}>{shown}</td>'


def table(name, columns, rows, row_id):
    """A table (data-table=name) of `rows` (dicts), one data-row=row_id(row) per row."""
    head = "".join(f"<th>{esc(c.heading)}</th>" for c in columns)
    body = "".join(f'<tr data-row="{esc(row_id(row))}">'
                   f'{"".join(column.cell(row) for column in columns)}</tr>' for row in rows)
    if not rows:
        body = f'<tr><td colspan="{len(columns)}" class="note">none</td></tr>'
    return f'<table data-table="{esc(name)}"><tr>{head}</tr>{body}</table>'


def extra_columns(rows, known):
    """A Column for each key the rows carry beyond `known`: what a newer reader adds shows."""
    keys = []
    for row in rows:
        keys += [key for key in row if key not in known and key not in keys]
    return [Column(key, raw=True) for key in keys]


def link(href, text):
    return f'<a href="{esc(href)}">{esc(text)}</a>'


def href(path, **params):
    query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
    return path + ("?" + query if query else "")


def duration(seconds):
    seconds = abs(float(seconds))
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def ago(moment, now=None):
    """'12 s ago' of a datetime or unix time, with the moment itself as its title."""
    if moment is None:
        return "–"
    stamp = moment.timestamp() if isinstance(moment, datetime.datetime) else float(moment)
    exact = datetime.datetime.fromtimestamp(stamp, datetime.timezone.utc)
    return (f'<span title="{exact:%Y-%m-%d %H:%M:%S} UTC">'
            f"{duration((now or time.time()) - stamp)} ago</span>")


def status_text(status):
    return f'<span class="{esc(status)}">{esc(status)}</span>'


def excerpt(text, limit=RESULT_EXCERPT):
    if text is None:
        return "–"
    return esc(text[:limit]) + ("…" if len(text) > limit else "")


def bar_chart(name, bars, label):
    """An SVG chart of `bars`, [(ok, bad)] oldest first, one a slot; each bar is a <g> with
    data-i (its index), data-ok and data-bad, and a title that a pointer shows."""
    width, height, slot = 600, 120, 600 // max(1, len(bars))
    peak = max((ok + bad for ok, bad in bars), default=0) or 1
    parts = []
    for i, (ok, bad) in enumerate(bars):
        x, ok_h, bad_h = i * slot, ok / peak * (height - 20), bad / peak * (height - 20)
        parts.append(
            f'<g data-i="{i}" data-ok="{ok}" data-bad="{bad}"><title>{esc(label(i))}: {ok} '
            f"completed, {bad} failed</title>"
            f'<rect class="ok" x="{x + 1}" y="{height - 12 - ok_h:.1f}" width="{slot - 2}" '
            f'height="{ok_h:.1f}"/><rect class="bad" x="{x + 1}" '
            f'y="{height - 12 - ok_h - bad_h:.1f}" width="{slot - 2}" height="{bad_h:.1f}"/></g>')
    return (f'<svg data-chart="{esc(name)}" viewBox="0 0 {width} {height}" width="{width}" '
            f'height="{height}" role="img" aria-label="{esc(name)}">'
            f'<text x="2" y="10">{peak} a bar at most</text>'
            f'<text x="2" y="{height - 1}">{esc(label(0))}</text>'
            f'<text x="{width - 2}" y="{height - 1}" text-anchor="end">{esc(label(len(bars) - 1))}'
            f"</text>{''.join(parts)}</svg>")


# ---------------------------------------------------------------------------------------------
# The pages of a role: routing a request to its page
# ---------------------------------------------------------------------------------------------

class Pages:
    """What a role's pages share: `routes`, [(path pattern, page method, parameters it takes)];
    a page method returns (title, body HTML, whether it reloads itself)."""

    routes, nav, name = [], [], ""

    def answer(self, target):
        """(status, HTML) for a request target."""
        parts = urllib.parse.urlsplit(target)
        for pattern, page, allowed in self.routes:
            match = re.fullmatch(pattern, parts.path)
            if not match:
                continue
            try:
                title, body, refresh = page(self, *match.groups(),
                                            **parameters(parts.query, allowed))
            except BadRequest as e:
                return 400, error_page(400, str(e))
            except NotFound as e:
                return 404, error_page(404, str(e))
            except Unavailable as e:
                return 503, error_page(503, str(e))
            except Exception:  # a bug: the server goes on, and the log says where
                log.exception("Dashboard: the page %s failed", parts.path)
                return 500, error_page(500, "the page failed; the validator's log has why")
            here = "/" + parts.path.split("/")[1] if parts.path != "/" else "/"
            return 200, frame(title, body, self.nav, here, refresh, self.name)
        return 404, error_page(404, "no such page: " + ", ".join(
            path for path, _ in self.nav) + " are")


# ---------------------------------------------------------------------------------------------
# The parent's pages
# ---------------------------------------------------------------------------------------------

class ParentPages(Pages):
    """The parent's pages, read from its database on the pages' own connection, and from the
    parent's memory: its role (Leadership), its last chain sync (ChainIntake.last_sync) and
    when its WeightSetter checks next."""

    nav = [("/", "overview"), ("/children", "children"), ("/jobs", "jobs"), ("/miners", "miners")]

    def __init__(self, cfg, db, state, weights=None):
        self.cfg, self.db, self.state, self.weights = cfg, db, state, weights
        self.name = f"parent {cfg.parent_host}:{cfg.parent_port}"
        # getStats' own statistics (parent.Statistics), on the pages' connection.
        self.statistics = type(state.statistics)(db, cfg, state.verifier, state.leadership)
        self.started = time.time()
        self.miners_cache = (0.0, None, None)  # (monotonic time, key, rows)
        self.skipped = weights.skipped if weights else set()  # bad scores, logged once

    def overview(self):
        data = read_overview(self.db, self.statistics, self.cfg.weights.enabled)
        data["chain"] = self.chain_state(data)
        data["next_weights"] = self.next_weights()
        return "Overview", render_overview(data, self.alerts(data)), True

    def chain_state(self, data):
        """(block, unix time of the last sync or None, commitments, neurons): this parent's
        last sync, or the block its database reached (a standby syncs nothing)."""
        if self.state.intake.last_sync:
            moment, snapshot = self.state.intake.last_sync
            return snapshot.block, moment, len(snapshot.commitments), len(snapshot.neurons)
        return data["last_block"], None, None, None

    def next_weights(self):
        """Seconds until the WeightSetter checks next (0: due, or a submission in flight), or
        None when weights are off."""
        if not self.weights:
            return None
        return max(0.0, self.weights.next_check - self.weights.clock())

    def alerts(self, data):
        """What needs the operator now, derived from what the parent knows."""
        stats, alerts = data["stats"], []
        if stats["role"] != "active":
            return alerts  # a standby's only duty is to wait; the overview says so
        if stats["active_children"] == 0:
            alerts.append("no active child: no job is evaluated (a child is active when seen "
                          f"within child_timeout_seconds, {self.cfg.child_timeout_seconds:g} s)")
        idle = data["last_finished_age"]
        oldest = stats["oldest_pending_age"] or 0
        if stats["pending_jobs"] and oldest > STALL_SECONDS and (idle is None
                                                                 or idle > STALL_SECONDS):
            alerts.append(f"{stats['pending_jobs']} jobs pending (the oldest for "
                          f"{duration(oldest)}) and none finished in the last "
                          f"{duration(STALL_SECONDS)}")
        block, moment, _, _ = data["chain"]
        quiet = time.time() - (moment or self.started)
        if quiet > max(3 * self.cfg.neuron.sync_frequency, 60.0):
            alerts.append(f"no chain read has succeeded for {duration(quiet)} "
                          f"({chain_failures():.0f} failed since the start): see the log's "
                          "'Chain sync failed'")
        attempt = data["last_attempt"]
        if attempt and attempt["success"] is False:
            alerts.append(f"the last attempt to set weights (block {attempt['block']}) failed: "
                          f"{attempt['message']}")
        return alerts

    def children(self, offset=0):
        rows = read_children(self.db, self.statistics, offset)
        return "Children", render_children(rows, offset), True

    def jobs(self, status=None, miner=None, child=None, before=None, after=None):
        if before and after:
            raise BadRequest("give 'before' or 'after', not both")
        rows, newer, older = read_jobs(self.db, status, miner, child, before, after)
        return "Jobs", render_jobs(rows, newer, older, status, miner, child), False

    def job(self, job_id):
        data = read_job(self.db, job_id_value(job_id))
        return f"Job {job_id}", render_job(data, self.cfg.config_path), False

    def miners(self, offset=0):
        return "Miners", render_miners(*self.read_miners(offset), self.cfg.weights), False

    def read_miners(self, offset):
        """The miners of the last sync (else those of the jobs table), their scores and
        weights as `validator.py weights` computes them (chain.weight_table, over every
        completed job: computed at most every MINERS_CACHE_SECONDS), and the latest job of
        each one on this page."""
        last = self.state.intake.last_sync
        key = last and (last[0], last[1].block)
        moment, cached_key, rows = self.miners_cache
        if rows is None or cached_key != key or time.monotonic() - moment > MINERS_CACHE_SECONDS:
            neurons, source = miners_of(self.db, last)
            if len(self.skipped) > MAX_OFFSET:
                self.skipped.clear()
            scores = {row.hotkey: row for row in
                      chains.weight_table(self.db, self.cfg.weights, neurons, self.skipped)}
            rows = (source, [(n, scores.get(n.hotkey)) for n in sorted(neurons,
                                                                      key=lambda n: n.uid)])
            self.miners_cache = (time.monotonic(), key, rows)
        source, everyone = rows
        shown = everyone[offset:offset + ROWS_PER_PAGE]
        hotkeys = [neuron.hotkey for neuron, _ in shown]
        latest = read_latest_jobs(self.db, hotkeys)
        for hotkey, submission in latest_submissions(self.db, self.cfg.weights,
                                                     hotkeys).items():
            latest[hotkey]["entries"] = submission
        return source, shown, latest, offset, len(everyone)

    routes = [
        (r"/", overview, {}),
        (r"/children", children, {"offset": offset_value}),
        (r"/jobs", jobs, {"status": status_value, "miner": name_value, "child": name_value,
                          "before": job_id_value, "after": job_id_value}),
        (r"/jobs/([0-9]{1,19})", job, {}),
        (r"/miners", miners, {"offset": offset_value}),
    ]


def chain_failures():
    """Failed chain reads since this parent started (parent.py's counter, read in-process)."""
    return prometheus_client.REGISTRY.get_sample_value("validator_chain_read_failures_total") or 0


# -- the overview ---------------------------------------------------------------------------

def read_overview(db, statistics, weights_enabled):
    """getStats' statistics, the jobs by status, the jobs finished in each of the last 24
    hours, and the last attempt and the last success at setting weights; in one transaction."""
    with db.transaction():
        stats = statistics.stats()
        counts = dict.fromkeys(STATUSES, 0)
        counts.update({row["status"]: row["n"] for row in db.query(
            "select status, count(*) as n from jobs group by status")})
        hours = db.query(
            """select least(23, floor(extract(epoch from now() - finished_at) / 3600))::int as ago,
                      count(*) filter (where status = 'completed') as ok,
                      count(*) filter (where status = 'failed') as bad,
                      extract(epoch from now() - max(finished_at)) as newest
               from jobs where finished_at > now() - interval '24 hours'
                 and status in ('completed', 'failed') group by 1""")
        last_block = db.query("select value from chain_state where key = 'last_block'")
        attempts = db.query(
            """(select attempt_id, attempted_at, block, cardinality(uids) as uids, success,
                       message from weight_attempts order by attempt_id desc limit 1)
               union all
               (select attempt_id, attempted_at, block, cardinality(uids) as uids, success,
                       message from weight_attempts where success order by attempt_id desc
                limit 1)""")
    by_hour = {row["ago"]: (row["ok"], row["bad"]) for row in hours}
    return {
        "stats": stats, "counts": counts,
        "hours": [by_hour.get(ago, (0, 0)) for ago in range(23, -1, -1)],  # oldest first
        "last_finished_age": min((float(row["newest"]) for row in hours), default=None),
        "last_block": last_block[0]["value"] if last_block else None,
        "weights_enabled": weights_enabled,
        "last_attempt": attempts[0] if attempts else None,
        "last_set": next((row for row in attempts if row["success"]), None),
    }


def render_overview(data, alerts):
    stats, counts = data["stats"], data["counts"]
    parts = ["".join(f'<p class="alert" data-row="{i}" data-k="alert">{esc(text)}</p>'
                     for i, text in enumerate(alerts))
             or '<p class="calm" data-k="calm">Nothing needs attention.</p>']
    if stats["role"] == "active":
        role = f"active, epoch {stats['leadership_epoch']}"
    else:
        role = f"standby; the active parent is {stats['active_parent'] or 'unknown'}"
    block, moment, commitments, neurons = data["chain"]
    parts.append(figures([
        figure("role", "role", esc(role), stats["role"]),
        figure("epoch", "leadership epoch", esc(stats["leadership_epoch"])),
        figure("block", "chain block", esc(block)),
        figure("last_sync", "last chain sync", ago(moment) if moment else "not by this parent",
               moment),
        figure("chain_failures", "chain reads failed", f"{chain_failures():.0f}"),
        *([figure("commitments", "commitments / neurons", f"{commitments} / {neurons}")]
          if commitments is not None else [])]))
    parts.append("<h2>Jobs</h2>" + figures(
        [figure(f"status-{status}", status, esc(counts[status]), counts[status],
                href("/jobs", status=status)) for status in STATUSES]
        + [figure("oldest_pending_age", "oldest pending",
                  duration(stats["oldest_pending_age"]) if stats["oldest_pending_age"] is not None
                  else "–", stats["oldest_pending_age"]),
           figure("children", "children active / known",
                  f"{stats['active_children']} / {stats['total_children']}",
                  stats["active_children"], "/children")]))
    hours = data["hours"]
    parts.append("<h2>Finished jobs, per hour, over the last day</h2>" + figures([
        figure("finished_hour", "in the last hour", esc(sum(hours[-1])), sum(hours[-1])),
        figure("finished_day", "in the last day", esc(sum(map(sum, hours))),
               sum(map(sum, hours))),
        figure("per_hour_day", "per hour, over the day", f"{sum(map(sum, hours)) / 24:.1f}")]))
    parts.append(bar_chart("finished-per-hour", hours,
                           lambda i: "this hour" if i == 23 else f"{23 - i} h ago"))
    parts.append("<h2>Weights</h2>" + render_weights(data))
    return "".join(parts)


def render_weights(data):
    if not data["weights_enabled"]:
        return '<p class="note" data-k="weights">off ([weights] enabled = false)</p>'
    last, attempt, due = data["last_set"], data["last_attempt"], data["next_weights"]
    items = [figure("weights_block", "last set at block", esc(last["block"]) if last else "never"),
             figure("weights_uids", "uids", esc(last["uids"]) if last else "–"),
             figure("weights_when", "set", ago(last["attempted_at"]) if last else "–",
                    last and last["attempted_at"].timestamp()),
             figure("weights_next", "next check", "now" if due == 0 else
                    f"in {duration(due)}" if due is not None else "–", due)]
    if attempt and attempt["success"] is not True:
        items.append(figure("weights_last_attempt", "last attempt",
                            f"{'failed' if attempt['success'] is False else 'no answer yet'}: "
                            f"{excerpt(attempt['message'])}"))
    return figures(items)


# -- the children -----------------------------------------------------------------------------

CHILD_COLUMNS = [
    Column("child_id", "child"),
    Column("endpoint"),
    Column("hotkey", show=lambda row: f"<code>{esc(row.get('hotkey') or '–')}</code>"),
    Column("active", show=lambda row: "yes" if row["active"] else "no", raw=True),
    Column("last_seen", "last seen", show=lambda row: ago(row["last_seen"]), raw=True),
    Column("active_jobs", "held", show=lambda row: link(
        href("/jobs", child=row["child_id"], status="assigned"), row["active_jobs"]),
        raw=True, number=True),
    Column("total_jobs_sent", "sent", raw=True, number=True),
    Column("total_jobs_completed", "finished", raw=True, number=True),
    Column("failed_jobs", "of them failed", show=lambda row: link(
        href("/jobs", child=row["child_id"], status="failed"), row["failed_jobs"]),
        raw=True, number=True),
    Column("expired_jobs", "expired", raw=True, number=True),
    Column("retryable_jobs", "transient", raw=True, number=True),
    Column("transient_in_a_row", "in a row", raw=True, number=True),
    Column("resting_seconds", "resting", show=lambda row: f"{row['resting_seconds']:.0f} s more"
           if row.get("resting_seconds") else "no", raw=True),
    Column("cross_checks", "checked", raw=True, number=True),
    Column("cross_check_agreements", "agreed", raw=True, number=True),
    Column("cross_check_disagreements", "disagreed", raw=True, number=True),
    Column("quarantined", show=lambda row: f"yes: {esc(row.get('quarantine_reason') or '')}"
           if row.get("quarantined") else "no", raw=True),
    Column("registered_at", "registered", show=lambda row: ago(row.get("registered_at")),
           raw=True),
]


def read_children(db, statistics, offset):
    """getStats' children (parent.Statistics.children: the same numbers; parent.MAX_CHILDREN
    at most), one page of them, with each one's hotkey, registration, failed and expired
    hand-overs."""
    with db.transaction():
        rows = statistics.children()[offset:offset + ROWS_PER_PAGE]
        more = db.query(
            """select c.child_id, c.hotkey, c.registered_at,
                 (select count(*) from assignments a where a.child_id = c.child_id
                   and a.outcome = 'failed') as failed_jobs,
                 (select count(*) from assignments a where a.child_id = c.child_id
                   and a.outcome = 'expired') as expired_jobs,
                 (select count(*) from assignments a where a.child_id = c.child_id
                   and a.outcome = 'retryable') as retryable_jobs
               from children c where c.child_id = any(%s)""",
            ([row["child_id"] for row in rows],))
    by_id = {row["child_id"]: row for row in more}
    return [{**row, **by_id.get(row["child_id"], {})} for row in rows]


def render_children(rows, offset):
    columns = CHILD_COLUMNS + extra_columns(rows, {c.key for c in CHILD_COLUMNS}
                                            | {"quarantine_reason"})
    pages = offset_links("/children", offset, len(rows) == ROWS_PER_PAGE)
    return (table("children", columns, rows, lambda row: row["child_id"]) + pages
            + '<p class="note">held: the jobs the child holds now; sent: every hand-over; '
              "finished: hand-overs that ended with a result, completed or failed (getStats' "
              "total_jobs_completed); expired: hand-overs whose lease ran out; transient: "
              "hand-overs that ended in a failure not the miner's (retried), in a row: such "
              "failures since the child's last other result; resting: how long the child gets "
              "no new job (unhealthy_after, rest_seconds); checked, agreed, disagreed: its "
              "settled cross-checks (a job evaluated again by another child), and quarantined: "
              "whether too many disagreed, until <code>validator.py release</code>.</p>")


def offset_links(path, offset, more):
    links = []
    if offset:
        links.append(link(href(path, offset=max(0, offset - ROWS_PER_PAGE) or None),
                          "← previous"))
    if more and offset + ROWS_PER_PAGE <= MAX_OFFSET:
        links.append(link(href(path, offset=offset + ROWS_PER_PAGE), "next →"))
    return f'<nav class="pages">{"".join(links)}</nav>' if links else ""


# -- the jobs ---------------------------------------------------------------------------------

JOB_COLUMNS = [
    Column("job_id", "job", show=lambda row: link(f"/jobs/{row['job_id']}", row["job_id"]),
           raw=True),
    Column("miner_hotkey", "miner", show=lambda row: link(
        href("/jobs", miner=row["miner_hotkey"]), row["miner_hotkey"])),
    Column("miner_uid", "uid", number=True),
    Column("repository", show=lambda row: f"{esc(row['hf_repo_id'])}@"
                                           f"{esc(row['hf_repo_commit'][:12] or 'default')}"),
    Column("status", show=lambda row: f'<a class="{esc(row["status"])}" '
                                      f'href="{esc(href("/jobs", status=row["status"]))}">'
                                      f'{esc(row["status"])}</a>'),
    Column("child_id", "child", show=lambda row: link(
        href("/jobs", child=row["child_id"]), row["child_id"]) if row["child_id"] else "–"),
    Column("attempts", number=True),
    Column("created_at", "created", show=lambda row: ago(row["created_at"]), raw=True),
    Column("finished_at", "finished", show=lambda row: ago(row["finished_at"]), raw=True),
    Column("result", show=lambda row: excerpt(row["result"])),
]


def read_jobs(db, status, miner, child, before, after):
    """One page of jobs, newest first, filtered; keyset paging on the job id: `before` the
    page below an id, `after` the page above one. Returns (rows, whether newer ones exist,
    whether older ones do)."""
    newest_first = after is None
    rows = db.query(
        f"""select job_id, miner_hotkey, miner_uid, hf_repo_id, hf_repo_commit, status,
                   child_id, attempts, created_at, finished_at,
                   left(result, {RESULT_EXCERPT + 1}) as result
            from jobs
            where (%(status)s::text is null or status = %(status)s)
              and (%(miner)s::text is null or miner_hotkey = %(miner)s)
              and (%(child)s::text is null or child_id = %(child)s)
              and job_id {'<' if newest_first else '>'} %(edge)s
            order by job_id {'desc' if newest_first else 'asc'} limit {PAGE_SIZE + 1}""",
        {"status": status, "miner": miner, "child": child,
         "edge": (before or 2**63 - 1) if newest_first else after})
    beyond = len(rows) > PAGE_SIZE
    rows = rows[:PAGE_SIZE]
    if newest_first:
        return rows, before is not None, beyond
    return rows[::-1], beyond, True


def render_jobs(rows, newer, older, status, miner, child):
    filters = {"status": status, "miner": miner, "child": child}
    shown = [f"{name} {esc(value)} ({link(href('/jobs', **{**filters, name: None}), 'all')})"
             for name, value in filters.items() if value is not None]
    options = "".join(f'<option value="{s}"{" selected" if s == status else ""}>{s}</option>'
                      for s in STATUSES)
    form = (f'<form method="get" action="/jobs"><select name="status"><option value="">any '
            f'status</option>{options}</select> <input name="miner" placeholder="miner hotkey" '
            f'value="{esc(miner or "")}" maxlength="64"> <input name="child" placeholder="child '
            f'id" value="{esc(child or "")}" maxlength="64"> <button>filter</button></form>')
    links = []
    if newer and rows:
        links.append(link(href("/jobs", **filters, after=rows[0]["job_id"]), "← newer"))
    if older and rows:
        links.append(link(href("/jobs", **filters, before=rows[-1]["job_id"]), "older →"))
    nav = f'<nav class="pages">{"".join(links)}</nav>'
    return (f'<p data-k="filters">{"; ".join(shown) or "all jobs, newest first"}</p>' + form
            + nav + table("jobs", JOB_COLUMNS, rows, lambda row: row["job_id"]) + nav
            + f'<p class="note">{PAGE_SIZE} jobs a page.</p>')


# -- one job ----------------------------------------------------------------------------------

def read_job(db, job_id):
    """The job's row (its result cut at RESULT_SHOWN characters) and its latest hand-overs."""
    with db.transaction():
        rows = db.query(
            f"""select job_id, fingerprint, submission_id, miner_hotkey, miner_uid, hf_repo_id,
                       hf_repo_commit, commit_block, env_provider, env_name, random_seed,
                       max_retries, status, priority, child_id, attempts, created_at,
                       assigned_at, finished_at, success, cancel_reason,
                       left(result, {RESULT_SHOWN}) as result, length(result) as result_chars,
                       result_signature, result_hotkey, result_attempt, result_sha256,
                       result_score, result_pruned_at, check_group, check_round
                from jobs where job_id = %s""", (job_id,))
        if not rows:
            raise NotFound(f"no job {job_id}")
        # Its cross-check (crosschecks.py): the jobs of its check, a handful at most.
        check = db.query(
            """select j.job_id, j.check_round, j.child_id, j.status, x.outcome
               from jobs j join cross_checks x on x.check_group = j.check_group
               where j.check_group = %s order by j.check_round, j.job_id limit 10""",
            (rows[0]["check_group"],)) if rows[0]["check_group"] is not None else []
        assignments = db.query(
            f"""select * from (select * from assignments where job_id = %s
                               order by attempt desc limit {MAX_ASSIGNMENTS}) a
                order by attempt""", (job_id,))
    return {"job": rows[0], "assignments": assignments, "check": check}


ASSIGNMENT_COLUMNS = [
    Column("attempt", number=True),
    Column("child_id", "child", show=lambda row: link(href("/jobs", child=row["child_id"]),
                                                      row["child_id"])),
    Column("assigned_at", "assigned", show=lambda row: ago(row["assigned_at"]), raw=True),
    Column("finished_at", "finished", show=lambda row: ago(row["finished_at"]), raw=True),
    Column("outcome", show=lambda row: status_text(row["outcome"] or "open")),
    Column("reason", "why it ended", show=lambda row: excerpt(row.get("reason"))),
]


def render_job(data, config_path):
    job, assignments = data["job"], data["assignments"]
    made = figures([
        figure("status", "status", status_text(job["status"]), job["status"]),
        figure("miner_hotkey", "miner", link(href("/jobs", miner=job["miner_hotkey"]),
                                             job["miner_hotkey"])),
        figure("miner_uid", "uid", esc(job["miner_uid"])),
        figure("repository", "repository", f"{esc(job['hf_repo_id'])}@"
                                           f"{esc(job['hf_repo_commit'] or 'default')}"),
        figure("commit_block", "committed at block", esc(job["commit_block"])),
        figure("created_at", "job made", ago(job["created_at"]), job["created_at"].timestamp()),
        figure("priority", "priority", esc(job["priority"])),
        figure("attempts", "hand-overs", esc(job["attempts"])),
        *([figure("cancel_reason", "cancelled", esc(job["cancel_reason"]))]
          if job["cancel_reason"] else [])])
    known = {"job_id"} | {c.key for c in ASSIGNMENT_COLUMNS}
    columns = ASSIGNMENT_COLUMNS + extra_columns(assignments, known)
    journey = (f"<p>Made from the commitment of <code>{esc(job['miner_hotkey'])}</code> at block "
               f"{esc(job['commit_block'])} (submission {esc(job['submission_id'])}, "
               f"fingerprint <code>{esc(job['fingerprint'][:16])}</code>; environment "
               f"{esc(job['env_provider'])}/{esc(job['env_name'])}, seed "
               f"{esc(job['random_seed'])}, max retries {esc(job['max_retries'])}).</p>")
    return (made + journey + "<h2>Hand-overs</h2>"
            + table("assignments", columns, assignments, lambda row: row["attempt"])
            + render_check(data.get("check")) + render_result(job)
            + render_proof(job, config_path))


CHECK_ROUNDS = {0: "the job checked", 1: "its twin", 2: "the third child's"}


def render_check(check):
    """The job's cross-check, if it has one: its jobs, their children, and the outcome."""
    if not check:
        return ""
    outcome = check[0]["outcome"] or "open (not every job of it is final)"
    jobs = ", ".join(link(f"/jobs/{row['job_id']}", f"job {row['job_id']}")
                     + f" ({CHECK_ROUNDS.get(row['check_round'], row['check_round'])}, "
                     f"{esc(row['child_id'] or 'no child yet')}, {esc(row['status'])})"
                     for row in check)
    return (f'<h2>Cross-check</h2><p>Evaluated on more than one child: {jobs}. '
            f'Outcome: <span data-k="check_outcome">{esc(outcome)}</span>.</p>')


def render_result(job):
    if job.get("result_pruned_at"):
        return (f"<h2>Result</h2><p>{'succeeded' if job['success'] else 'failed'}, "
                f"{ago(job['finished_at'])}, reported by {esc(job['child_id'])}; its text was "
                f"deleted {ago(job['result_pruned_at'])} (result_retention_days): it scored "
                f'<span data-k="result_score">{esc(job["result_score"])}</span>, and the '
                f'SHA-256 of its text was <code data-k="result_sha256">'
                f'{esc(job["result_sha256"])}</code></p>')
    if job["result"] is None:
        return '<h2>Result</h2><p class="note" data-k="result">none yet</p>'
    cut = job["result_chars"] > RESULT_SHOWN
    note = (f'<p class="note">The first {RESULT_SHOWN:,} of {job["result_chars"]:,} characters; '
            "`validator.py jobs --json` has it whole.</p>" if cut else "")
    return (f"<h2>Result</h2><p>{'succeeded' if job['success'] else 'failed'}, "
            f"{ago(job['finished_at'])}, reported by {esc(job['child_id'])}</p>"
            f'<pre data-k="result">{esc(job["result"])}</pre>' + note)


def proof_command(job_id, config_path, pruned=False):
    """The shell command that checks a recorded result's signature from the parent's database:
    run in the validator's directory, it prints True if the proof holds. The signature covers
    the text's SHA-256 (auth.result_fields): once the text is pruned, the digest kept does."""
    fields = ('["result", j["child_id"], j["job_id"], j["result_attempt"], j["success"], '
              'j["result_sha256"]]') if pruned else (
        'auth.result_fields(j["child_id"], j["job_id"], j["result_attempt"], j["success"], '
        'j["result"])')
    program = (f"import auth, validator as v; j = v.parent_database(v.parent_config("
               f"{json.dumps(str(config_path))})).query(\"select * from jobs where job_id = "
               f"{int(job_id)}\")[0]; print(auth.Verifier.holds(j[\"result_hotkey\"], "
               f"{fields}, j[\"result_signature\"]))")
    return "python -c " + shlex.quote(program)


def render_proof(job, config_path):
    pruned = bool(job.get("result_pruned_at"))
    if job["result"] is None and not pruned:
        return ""
    if job["result_signature"] is None:
        return ('<h2>Proof</h2><p class="note" data-k="proof">none: recorded with auth off, so '
                "no hotkey vouches for it</p>")
    return ("<h2>Proof</h2>" + figures([
        figure("result_hotkey", "signed by", f"<code>{esc(job['result_hotkey'])}</code>"),
        figure("result_attempt", "for attempt", esc(job["result_attempt"]))])
        + f'<p>Signature (sr25519, over auth.result_fields): <code data-k="result_signature">'
          f'{bytes(job["result_signature"]).hex()}</code></p>'
        + ('<p class="note" data-k="proof_pruned">The signature covers the text\'s SHA-256, '
           "kept above: it still proves which child vouched for a result of that digest. The "
           "score kept was read from the text before it was deleted; a copy of the text with "
           "that digest shows it.</p>" if pruned else "")
        + "<p>To check it (in the validator's directory; prints True if it holds):</p>"
          f'<pre data-k="proof_command">'
          f'{esc(proof_command(job["job_id"], config_path, pruned))}</pre>')


# -- the miners -------------------------------------------------------------------------------

def miners_of(db, last_sync):
    """The neurons to score ([chain.Neuron]) and where they come from: the last sync's, or
    the miners of the jobs table (a standby, or before the first sync)."""
    if last_sync:
        snapshot = last_sync[1]
        return ([chains.Neuron(uid, hotkey, 0) for hotkey, uid in snapshot.neurons.items()
                 if uid is not None], f"the neurons of this parent's last sync (block "
                                      f"{snapshot.block})")
    rows = db.query(f"""select distinct on (miner_hotkey) miner_hotkey, miner_uid from jobs
                        where miner_uid is not null order by miner_hotkey, job_id desc
                        limit {MAX_OFFSET}""")
    return ([chains.Neuron(row["miner_uid"], row["miner_hotkey"], 0) for row in rows],
            "the miners of the jobs table (this parent has not read the chain)")


def read_latest_jobs(db, hotkeys):
    """{hotkey: its latest job} for the hotkeys of one page."""
    rows = db.query("""select distinct on (miner_hotkey) miner_hotkey, job_id, hf_repo_id,
                              hf_repo_commit, commit_block, status
                       from jobs where miner_hotkey = any(%s)
                       order by miner_hotkey, job_id desc""", (hotkeys,))
    return {row["miner_hotkey"]: row for row in rows}


def latest_submissions(db, settings, hotkeys):
    """{hotkey: its latest submission (scores.Submission)} for the hotkeys of one page."""
    import scores
    latest = {}
    for submission in scores.submission_scores(db, settings, hotkeys).values():
        latest[submission.hotkey] = submission  # in commit order: the last one stays
    return latest


def entries_text(submission):
    """Each suite entry of a submission: its mean ± standard error (count)."""
    if submission is None:
        return "–"
    return "; ".join(
        f"{e.env} {e.mean:.3f} ± {e.stderr:.3f} ({e.count})" if e.scores else
        f"{e.env} – ({e.open} not finished)" for e in sorted(submission.entries.values(),
                                                              key=lambda e: e.entry))


def render_miners(source, shown, latest, offset, total, settings):
    rows = []
    for neuron, score in shown:
        job = latest.get(neuron.hotkey) or {}
        rows.append({"uid": neuron.uid, "hotkey": neuron.hotkey, "job_id": job.get("job_id"),
                     "submission": job and f"{job['hf_repo_id']}@{job['hf_repo_commit'][:12]}",
                     "commit_block": job.get("commit_block"), "status": job.get("status"),
                     "entries": entries_text(job.get("entries")),
                     "score": score and score.score, "weight": score and score.weight})
    columns = [
        Column("uid", number=True),
        Column("hotkey", show=lambda row: link(href("/jobs", miner=row["hotkey"]), row["hotkey"])),
        Column("job_id", "latest job", show=lambda row: link(
            f"/jobs/{row['job_id']}", row["job_id"]) if row["job_id"] else "–"),
        Column("submission", show=lambda row: esc(row["submission"] or "–")),
        Column("commit_block", "committed at", number=True),
        Column("status", show=lambda row: status_text(row["status"]) if row["status"] else "–"),
        Column("entries", "per suite entry: mean ± error (scores)"),
        Column("score", show=lambda row: "–" if row["score"] is None else f"{row['score']:.6g}",
               raw=True, number=True),
        Column("weight", show=lambda row: "–" if row["weight"] is None
               else f"{row['weight']:.4f}", raw=True, number=True),
    ]
    how = (f"each miner's {esc(settings.aggregation)} submission score (of "
           f"<code>{esc(settings.score_key)}</code>: per suite entry the mean of its jobs, "
           "weighted over entries, once every job is final)" + (
               f" (EMA alpha {settings.ema_alpha:g})" if settings.aggregation == "ema" else ""))
    return (f'<p data-k="source">{total} miners: {esc(source)}.</p>'
            + table("miners", columns, rows, lambda row: row["uid"])
            + offset_links("/miners", offset, offset + ROWS_PER_PAGE < total)
            + f'<p class="note">Score: {how}; weight: the score over the sum of the scores, as '
              "<code>validator.py weights</code> computes them (chain.weight_table). On a real "
              "chain the weights count a score only from a commitment made since its hotkey "
              "took the uid, which this page does not read: <code>validator.py weights</code> "
              "does.</p>")


# ---------------------------------------------------------------------------------------------
# The child's page
# ---------------------------------------------------------------------------------------------

class ChildPages(Pages):
    """A child's one page: its queue (the counts its getStats answers with), its running
    evaluations with the tail of each one's log, and its last results with whether the parent
    acknowledged them."""

    nav = [("/", "queue")]

    def __init__(self, cfg, db, store, logs_dir):
        self.cfg, self.db, self.logs_dir = cfg, db, Path(logs_dir)
        self.name = f"child {cfg.validator_id}"
        # getStats' own counts (child.ChildStore.counts), on the pages' connection.
        self.counts = lambda: type(store).counts(types.SimpleNamespace(db=db))
        self.disk = store.disk

    def queue(self):
        data = read_child(self.db, self.counts)
        for row in data["running"]:
            row["log"] = log_tail(log_path(self.logs_dir, row["job_id"], row["job"]))
        return (f"Child {self.cfg.validator_id}",
                render_child(data, evaluation_slots(self.cfg), self.disk.low()), True)

    routes = [(r"/", queue, {})]


def read_child(db, counts):
    with db.transaction():
        return {
            "counts": counts(),
            "running": db.query(
                f"""select job_id, job, attempts, started_at, evaluator->'gpus' as gpus,
                           extract(epoch from now() - started_at) as elapsed
                    from child_jobs where status = 'running'
                    order by started_at limit {MAX_RUNNING}"""),
            "results": db.query(
                f"""select job_id, job->>'hfRepoId' as repository, status, finished_at,
                           reported_at, left(result, {RESULT_EXCERPT + 1}) as result
                    from child_jobs where finished_at is not null
                    order by finished_at desc, job_id desc limit {LAST_RESULTS}"""),
        }


def log_path(logs_dir, job_id, job):
    """The log file of a job's evaluator, as evaluator.evaluate opens it."""
    return evaluator.LogsDirectory(logs_dir).file_of(job_id, job)


def log_tail(path, limit=LOG_TAIL_BYTES):
    """The last `limit` bytes of a log file as text (from its first whole line), or None."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            f.seek(max(0, size - limit))
            data = f.read(limit)
    except OSError:
        return None
    if size > limit and b"\n" in data:
        data = data.split(b"\n", 1)[1]
    return data.decode("utf-8", "replace")


RESULT_COLUMNS = [
    Column("job_id", "job", raw=True),
    Column("repository"),
    Column("status", show=lambda row: status_text(row["status"])),
    Column("finished_at", "finished", show=lambda row: ago(row["finished_at"]), raw=True),
    Column("reported_at", "acknowledged by the parent",
           show=lambda row: ago(row["reported_at"]) if row["reported_at"] else "not yet",
           raw=True),
    Column("result", show=lambda row: excerpt(row["result"])),
]


def evaluation_slots(cfg):
    """As child.evaluation_slots: max_concurrent_jobs, and no more than the GPUs allow."""
    gpus, per_job = cfg.evaluator.gpus, cfg.evaluator.gpus_per_job
    return min(cfg.max_concurrent_jobs, len(gpus) // per_job) if gpus else cfg.max_concurrent_jobs


def render_child(data, slots, disk_low=False):
    counts = data["counts"]
    parts = [figures([figure(key, key, esc(value), value) for key, value in counts.items()]
                     + [figure("slots", "evaluation slots", esc(slots)),
                        figure("disk_low", "disk", "low: no new job (min_free_disk_mb)"
                               if disk_low else "room", int(disk_low))])]
    parts.append(f"<h2>Running evaluations ({len(data['running'])})</h2>")
    for row in data["running"]:
        job = row["job"]
        parts.append(
            f'<section data-row="{row["job_id"]}">'
            + figures([figure("job_id", "job", esc(row["job_id"])),
                       figure("repository", "repository",
                              f"{esc(job.get('hfRepoId'))}@"
                              f"{esc(job.get('hfRepoCommit') or 'default')}"),
                       figure("miner", "miner", esc(job.get("minerHotkey"))),
                       figure("elapsed", "running for", duration(row["elapsed"]), row["elapsed"]),
                       figure("attempts", "starts", esc(row["attempts"])),
                       figure("gpus", "GPUs", esc(",".join(row["gpus"] or []) or "–"))])
            + (f'<pre data-k="log">{esc(row["log"])}</pre>' if row["log"]
               else '<p class="note" data-k="log">no log: the evaluator wrote nothing to '
                    "stderr (the DEMO evaluator writes none)</p>")
            + "</section>")
    if not data["running"]:
        parts.append('<p class="note">none</p>')
    parts.append(f"<h2>Last results (the latest {LAST_RESULTS})</h2>"
                 + table("results", RESULT_COLUMNS, data["results"], lambda row: row["job_id"]))
    return "".join(parts)
