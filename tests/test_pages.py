"""The dashboard (pages.py), opened in a real browser: headless Chromium (Debian's `chromium`;
.ci/run installs it) loads every page of a running parent and of its children, and what each
page shows is compared with what getStats and the databases say. Every page is screenshotted
into the test's tmp_path; with PAGES_SCREENSHOTS=DIR the browser test also writes the PNGs the
docs show (docs/img: `PAGES_SCREENSHOTS=docs/img pytest tests/test_pages.py -k browser`).

Also: what a miner or a peer wrote is shown as text; 10,000 jobs stay paged; hostile requests
(a huge target, ../, other methods, 200 at once, slowloris) get a bounded answer while the
protocol still answers; a slow query is cut by statement_timeout; the pages cannot write; a
taken port is one line naming the key; a job's proof command checks its signature."""

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import psycopg
import pytest

from conftest import ROOT, commitment, free_port, wait_until, write_chain

import auth
import common
import pages
from rpc import RpcClient
from test_security import wallets  # noqa: F401  (a fixture: hotkeys made with the SDK)

HOSTILE = "<script>alert(1)</script>"
DOC_SHOTS = {"overview", "children", "jobs", "job", "miners", "child"}  # docs/img/*.png


# ---------------------------------------------------------------------------------------------
# The browser, and reading what a page shows
# ---------------------------------------------------------------------------------------------

def chromium():
    path = shutil.which("chromium")
    if not path:
        pytest.fail("chromium is not installed: apt-get install -y chromium (.ci/run does it)")
    return path


def browse(url, tmp_path, name, size="1000,700"):
    """The page's DOM as headless Chromium renders it, and a screenshot of it in tmp_path
    (and in $PAGES_SCREENSHOTS, for the docs)."""
    common_flags = [chromium(), "--headless", "--no-sandbox", "--disable-gpu",
                    "--hide-scrollbars", f"--user-data-dir={tmp_path / 'chromium'}"]
    dom = subprocess.run([*common_flags, "--dump-dom", url], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    shot = tmp_path / "screenshots" / f"{name}.png"
    shot.parent.mkdir(exist_ok=True)
    subprocess.run([*common_flags, f"--screenshot={shot}", f"--window-size={size}", url],
                   capture_output=True, timeout=120, check=True)
    assert shot.stat().st_size > 1000
    if os.environ.get("PAGES_SCREENSHOTS") and name in DOC_SHOTS:
        shutil.copy(shot, Path(os.environ["PAGES_SCREENSHOTS"]) / shot.name)
    assert "<script" not in dom.lower(), "a page holds a script element"
    return dom


class Cells(HTMLParser):
    """What a page shows, by its marks: cells[(table, row, key)] is the text of the element
    marked data-k=key (its data-v when it has one), inside data-row=row of data-table=table
    (None outside either). `links` are the hrefs, `bars` the chart's bars' attributes."""

    VOID = {"meta", "br", "input", "img", "hr", "link", "rect", "option"}

    def __init__(self, dom):
        super().__init__()
        self.cells, self.links, self.bars = {}, [], []
        self.stack, self.open = [], []  # open elements' (table, row); open data-k captures
        self.feed(dom)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "a" and "href" in attrs:
            self.links.append(attrs["href"])
        if tag == "g" and "data-i" in attrs:
            self.bars.append(attrs)
        if tag in self.VOID:
            return
        table, row = self.stack[-1] if self.stack else (None, None)
        table = attrs.get("data-table", table)
        row = attrs.get("data-row", row)
        self.stack.append((table, row))
        if "data-k" in attrs:
            self.open.append([len(self.stack), (table, row, attrs["data-k"]),
                              attrs.get("data-v"), []])

    def handle_endtag(self, tag):
        if tag in self.VOID or not self.stack:
            return
        if self.open and self.open[-1][0] == len(self.stack):
            _, key, raw, texts = self.open.pop()
            self.cells[key] = raw if raw is not None else "".join(texts).strip()
        self.stack.pop()

    def handle_data(self, data):
        for capture in self.open:
            capture[3].append(data)

    def rows(self, table):
        """{row: {key: value}} of one table (or of the sections marked data-row)."""
        found = {}
        for (t, row, key), value in self.cells.items():
            if t == table and row is not None:
                found.setdefault(row, {})[key] = value
        return found

    def figure(self, key):
        return self.cells[(None, None, key)]


def fetch(url, method="GET", timeout=30):
    """(status, headers, body) of one request."""
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, answer.headers, answer.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read().decode()


# ---------------------------------------------------------------------------------------------
# A parent with two children, every page in the browser
# ---------------------------------------------------------------------------------------------

# The evaluator of the browser test: its result carries a script tag, its log one too; the
# job of "org/model-7" writes its log and waits for the test's file before it answers.
EVALUATOR = """
import json, os, sys, time
job = json.load(sys.stdin)
number = int(job["hfRepoId"].rsplit("-", 1)[1])
print("evaluating", job["hfRepoId"], "<script>alert('log')</script>", file=sys.stderr, flush=True)
while number == 7 and not os.path.exists(sys.argv[1]):
    time.sleep(0.05)
print(json.dumps({"score": number / 10, "note": "<script>alert('result')</script>"}))
"""


def test_every_page_in_a_browser_shows_what_getstats_and_the_databases_say(
        tmp_path, parent_config, child_config, processes, rpc):
    release = tmp_path / "release"
    (tmp_path / "evaluator.py").write_text(EVALUATOR)
    hostile = {"hotkey": HOSTILE, "uid": 6, "block": 100, "stake": 5000.0,
               "data": json.dumps({"provider": "HF", "repo_id": "org/model-6",
                                   "revision": "6" * 40})}
    write_chain(tmp_path / "chain.json", 100, [commitment(i) for i in range(1, 6)] + [hostile])
    config = parent_config(dashboard_port=free_port())
    cfg = common.load_config(config)
    parent = processes(["validator.py", "--config", config], tmp_path / "parent.log")
    parent.wait_for_log(rf"Dashboard on http://127\.0\.0\.1:{cfg.dashboard_port}/")
    children = {}
    for name in ("c1", "c2"):
        path = child_config(name, cfg.parent_port, dashboard_port=free_port(),
                            evaluator={"command": [sys.executable, str(tmp_path / "evaluator.py"),
                                                   str(release)]})
        children[name] = common.load_config(path)
        proc = processes(["validator.py", "--config", path], tmp_path / f"{name}.log")
        proc.wait_for_log(f"Dashboard on http://127.0.0.1:{children[name].dashboard_port}/")
    db = common.connect(cfg.pg_database)
    count = lambda sql: db.execute(sql).fetchone()["n"]  # noqa: E731
    wait_until(lambda: count("select count(*) as n from jobs where status = 'completed'") == 6,
               60, "6 completed jobs")
    # A repository id the chain refuses (parse_commitment), written into a row all the same.
    db.execute("update jobs set hf_repo_id = %s where job_id = 2", (HOSTILE + "/x",))
    write_chain(tmp_path / "chain.json", 101,
                [commitment(i) for i in range(1, 6)] + [hostile, commitment(7)])
    held = wait_until(lambda: db.execute("select child_id from jobs where job_id = 7 and "
                                         "status = 'assigned'").fetchone(), 30, "job 7 assigned")
    holder = held["child_id"]
    log_file = Path(children[holder].data_dir) / "logs" / "job-7.log"
    wait_until(lambda: log_file.exists() and "org/model-7" in log_file.read_text(), 30,
               "job 7's log")
    stats = json.loads(RpcClient(rpc, "127.0.0.1", cfg.parent_port).call("getStats")["json"])
    base = f"http://127.0.0.1:{cfg.dashboard_port}"

    overview = Cells(browse(base + "/", tmp_path, "overview"))
    by_status = {row["status"]: row["n"] for row in db.execute(
        "select status, count(*) as n from jobs group by status")}
    for status in pages.STATUSES:
        assert int(overview.figure(f"status-{status}")) == by_status.get(status, 0)
    assert (overview.figure("role"), overview.figure("block")) == ("active", "101")
    assert overview.figure("children") == str(stats["active_children"]) == "2"
    assert overview.figure("calm") == "Nothing needs attention."
    assert sum(int(bar["data-ok"]) for bar in overview.bars) == 6  # finished this hour
    assert overview.bars[-1]["data-ok"] == "6" and len(overview.bars) == 24

    # A wide table (each child's hand-overs, rests and cross-checks): a wider window.
    shown = Cells(browse(base + "/children", tmp_path, "children", "1600,500")).rows("children")
    assert set(shown) == {"c1", "c2"}
    for child in stats["children"]:
        row = shown[child["child_id"]]
        for key in ("endpoint", "active", "active_jobs", "total_jobs_sent",
                    "total_jobs_completed", "transient_in_a_row", "resting_seconds",
                    "cross_checks", "cross_check_agreements", "cross_check_disagreements",
                    "quarantined"):
            assert row[key] == str(child[key]), key
        assert float(row["last_seen"]) == pytest.approx(child["last_seen"], abs=5)
    assert shown[holder]["active_jobs"] == "1"

    jobs = Cells(browse(base + "/jobs", tmp_path, "jobs"))
    rows = jobs.rows("jobs")
    assert list(rows) == [str(i) for i in range(7, 0, -1)]
    for job in db.execute("select job_id, status, miner_hotkey, child_id from jobs"):
        row = rows[str(job["job_id"])]
        assert (row["status"], row["miner_hotkey"], row["child_id"]) == \
            (job["status"], job["miner_hotkey"], job["child_id"])
    assert HOSTILE + "/x@" in rows["2"]["repository"]
    assert "<script>alert('result')</script>" in rows["1"]["result"]
    completed = Cells(browse(base + "/jobs?status=completed", tmp_path, "jobs-completed"))
    assert list(completed.rows("jobs")) == [str(i) for i in range(6, 0, -1)]

    running = Cells(browse(base + "/jobs/7", tmp_path, "job-running"))
    assignments = db.execute("select * from assignments where job_id = 7").fetchall()
    assert {row: (r["child_id"], r["outcome"]) for row, r in
            running.rows("assignments").items()} == {
        str(a["attempt"]): (a["child_id"], "open") for a in assignments}
    assert running.figure("status") == "assigned" and running.figure("result") == "none yet"
    done = Cells(browse(base + "/jobs/6", tmp_path, "job"))
    result = db.execute("select result from jobs where job_id = 6").fetchone()["result"]
    assert done.figure("result") == result and done.figure("miner_hotkey") == HOSTILE
    assert done.figure("proof").startswith("none: recorded with auth off")

    miners = Cells(browse(base + "/miners", tmp_path, "miners")).rows("miners")
    report = subprocess.run([sys.executable, ROOT / "validator.py", "weights", "--json",
                             "--config", config], capture_output=True, text=True, timeout=60)
    assert report.returncode == 0, report.stderr
    expected = {str(row["uid"]): row for row in json.loads(report.stdout)["rows"]}
    assert set(miners) == {str(uid) for uid in range(1, 8)}
    for uid, row in miners.items():
        if uid in expected:
            assert float(row["score"]) == pytest.approx(expected[uid]["score"])
            assert float(row["weight"]) == pytest.approx(expected[uid]["weight"])
            assert row["hotkey"] == expected[uid]["hotkey"]
            # One suite entry (the default), its one job's score: no spread.
            assert row["entries"] == f"demo/demo-env {float(row['score']):.3f} ± 0.000 (1)"
        else:  # job 7 runs still: no score yet
            assert (uid, row["score"], row["status"]) == ("7", "–", "assigned")
    assert miners["6"]["hotkey"] == HOSTILE

    for name, child_cfg in children.items():
        page = Cells(browse(f"http://127.0.0.1:{child_cfg.dashboard_port}/", tmp_path,
                            f"child-{name}" if name != holder else "child"))
        counts = json.loads(RpcClient(rpc, "127.0.0.1", child_cfg.child_port)
                            .call("getStats")["json"])
        queue = {key: value for key, value in counts.items() if not key.startswith("disk_")}
        assert {key: int(page.figure(key)) for key in queue} == queue
        with contextlib.closing(common.connect(child_cfg.pg_database)) as child_db:
            finished = child_db.execute(
                "select job_id, status, reported_at is not null as acknowledged from child_jobs "
                "where finished_at is not null").fetchall()
        results = page.rows("results")
        assert set(results) == {str(r["job_id"]) for r in finished}
        for r in finished:
            assert results[str(r["job_id"])]["status"] == r["status"]
            assert (results[str(r["job_id"])]["reported_at"] != "not yet") == r["acknowledged"]
        section = page.rows(None)
        if name == holder:
            assert set(section) == {"7"}
            assert float(section["7"]["elapsed"]) > 0
            assert "evaluating org/model-7 <script>alert('log')</script>" in section["7"]["log"]
        else:
            assert section == {}

    release.touch()
    wait_until(lambda: count("select count(*) as n from jobs where status = 'completed'") == 7,
               30, "job 7 completed")
    db.close()


# ---------------------------------------------------------------------------------------------
# 10,000 jobs: pages of a bounded size, newest first, keyset links both ways
# ---------------------------------------------------------------------------------------------

def insert_jobs(dsn, count):
    """`count` finished jobs straight into the parent's database: every 7th failed."""
    with contextlib.closing(common.connect(dsn)) as db:
        db.execute(
            """insert into jobs (fingerprint, submission_id, miner_hotkey, miner_uid, hf_repo_id,
                   hf_repo_commit, commit_block, env_provider, env_name, random_seed,
                   max_retries, status, child_id, attempts, finished_at, success, result)
               select 'f' || n, n, '5Miner' || (n %% 100), n %% 100, 'org/model-' || n, '', 100,
                      'demo', 'demo-env', n, 3,
                      case when n %% 7 = 0 then 'failed' else 'completed' end, 'c' || (n %% 3),
                      1, now() - (n || ' seconds')::interval, n %% 7 <> 0,
                      '{"score": 1}'
               from generate_series(1, %s) n""", (count,))


def test_ten_thousand_jobs_stay_paged(tmp_path, parent_config, processes):
    write_chain(tmp_path / "chain.json", 100, [])
    config = parent_config(dashboard_port=free_port())
    cfg = common.load_config(config)
    parent = processes(["parent.py", "--config", config], tmp_path / "parent.log")
    parent.wait_for_log("Parent validator serving")
    insert_jobs(cfg.pg_database, 10_000)
    base = f"http://127.0.0.1:{cfg.dashboard_port}"

    first = Cells(browse(base + "/jobs", tmp_path, "jobs-10000"))
    assert list(first.rows("jobs")) == [str(i) for i in range(10_000, 9_950, -1)]
    assert "/jobs?before=9951" in first.links and not any("after=" in h for h in first.links)
    status, _, body = fetch(base + "/jobs?before=9951")
    second = Cells(body)
    assert list(second.rows("jobs")) == [str(i) for i in range(9_950, 9_900, -1)]
    assert "/jobs?after=9950" in second.links and "/jobs?before=9901" in second.links
    back = Cells(fetch(base + "/jobs?after=9950")[2])
    assert list(back.rows("jobs")) == list(first.rows("jobs"))
    last = Cells(fetch(base + "/jobs?before=51")[2])
    assert list(last.rows("jobs")) == [str(i) for i in range(50, 0, -1)]
    assert not any("before=" in h for h in last.links if h.startswith("/jobs?"))
    failed = Cells(fetch(base + "/jobs?status=failed&child=c1")[2]).rows("jobs")
    expected = [n for n in range(10_000, 0, -1) if n % 7 == 0 and n % 3 == 1][:pages.PAGE_SIZE]
    assert list(failed) == [str(n) for n in expected]
    assert len(body.encode()) < 100_000
    overview = Cells(fetch(base + "/")[2])
    assert (overview.figure("status-completed"), overview.figure("status-failed")) == \
        (str(10_000 - 10_000 // 7), str(10_000 // 7))
    assert sum(int(bar["data-ok"]) + int(bar["data-bad"]) for bar in overview.bars) == 10_000
    miners = Cells(fetch(base + "/miners")[2])
    assert miners.figure("source").startswith("0 miners")  # the chain has none registered


# ---------------------------------------------------------------------------------------------
# Hostile requests: bounded answers, and the protocol still answers meanwhile
# ---------------------------------------------------------------------------------------------

def raw_request(port, data, timeout=30):
    """Send `data`, read until the server closes; returns what came back (b"" if nothing)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        answer = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                answer += chunk
        return answer


def status_of(answer):
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/") else None


def test_hostile_requests_get_bounded_answers_and_the_protocol_answers_meanwhile(
        tmp_path, parent_config, processes, rpc):
    write_chain(tmp_path / "chain.json", 100, [commitment(1)])
    config = parent_config(dashboard_port=free_port())
    cfg = common.load_config(config)
    parent = processes(["parent.py", "--config", config], tmp_path / "parent.log")
    parent.wait_for_log("New job 1 ")
    port, base = cfg.dashboard_port, f"http://127.0.0.1:{cfg.dashboard_port}"
    child = RpcClient(rpc, "127.0.0.1", cfg.parent_port)
    child.call("registerChild", childId="c1", endpoint="127.0.0.1:9")

    def poll_answers():
        reply = child.call("requestJobs", childId="c1", maxJobs=0)
        return reply["jobs"] == [] and reply["revoked"] == []

    assert status_of(raw_request(port, b"GET /jobs?" + b"m=1&" * 25_000 + b" HTTP/1.0\r\n\r\n")) \
        == 414  # past http.server's 64 KiB request line
    assert fetch(base + "/jobs?miner=" + "x" * 3000)[0] == 414
    assert fetch(base + "/jobs?" + "&".join(f"p{i}=1" for i in range(20)))[0] == 400
    status, _, body = fetch(base + "/jobs?colour=red")
    assert status == 400 and "no parameter 'colour'" in Cells(body).figure("error")
    for target in ("/../../etc/passwd", "/jobs/../../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd",
                   "/jobs/1/../../x", "/jobs/99"):
        status, _, body = fetch(base + target)
        assert status == 404 and "root:" not in body, target
    for method in ("POST", "PUT", "DELETE", "HEAD", "PATCH", "FOO"):
        status, headers, _ = fetch(base + "/jobs/1", method=method)
        assert (status, headers["Allow"]) == (405, "GET"), method

    # 200 requests at once: each gets a page or a 503 (past MAX_CONNECTIONS at once).
    answers = [None] * 200

    def get(k):
        answers[k] = status_of(raw_request(port, b"GET /jobs HTTP/1.0\r\n\r\n"))
    threads = [threading.Thread(target=get, args=(k,)) for k in range(200)]
    for thread in threads:
        thread.start()
    assert poll_answers()
    for thread in threads:
        thread.join(60)
    assert set(answers) <= {200, 503} and answers.count(200) >= pages.MAX_CONNECTIONS // 2

    # Slowloris: more connections than the server serves at once, each sending its headers a
    # byte at a time. New requests get 503 at once, the protocol answers, and each slow one is
    # dropped within REQUEST_SECONDS.
    slow = [socket.create_connection(("127.0.0.1", port)) for _ in range(pages.MAX_CONNECTIONS)]
    opened = time.monotonic()
    for sock in slow:
        sock.sendall(b"GET / HTTP/1.1\r\nX-Slow: ")
    time.sleep(0.5)  # the server took them all in (a poll would hold the slots it measures)
    assert status_of(raw_request(port, b"GET / HTTP/1.0\r\n\r\n")) == 503
    assert poll_answers()
    deadline = opened + pages.REQUEST_SECONDS + 5
    for sock in slow:
        sock.settimeout(0.2)
        while time.monotonic() < deadline:
            try:
                sock.sendall(b"a")
                if sock.recv(1024) == b"":
                    break
            except (socket.timeout, TimeoutError):
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
        else:
            pytest.fail(f"a connection sending its headers a byte at a time was still open "
                        f"{pages.REQUEST_SECONDS + 5:g} s after it opened")
        sock.close()
    assert fetch(base + "/")[0] == 200
    assert poll_answers()


def test_a_slow_query_is_cut_by_the_statement_timeout(tmp_path, parent_config, processes, rpc):
    write_chain(tmp_path / "chain.json", 100, [commitment(1)])
    config = parent_config(dashboard_port=free_port())
    cfg = common.load_config(config)
    parent = processes(["parent.py", "--config", config], tmp_path / "parent.log")
    parent.wait_for_log("New job 1 ")
    base = f"http://127.0.0.1:{cfg.dashboard_port}"
    with contextlib.closing(common.connect(cfg.pg_database)) as db:
        with db.transaction():
            db.execute("lock table weight_attempts in access exclusive mode")
            status, _, body = fetch(base + "/")
            assert status == 503 and "statement_timeout" in body
            assert RpcClient(rpc, "127.0.0.1", cfg.parent_port).call("ping")["pong"]
    assert fetch(base + "/")[0] == 200


def test_the_pages_connection_cannot_write(make_dsn):
    dsn = make_dsn()
    with contextlib.closing(common.connect(dsn)) as db:
        db.execute("create table t (n integer)")
    reader = pages.PageDatabase(dsn)
    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        reader.query("insert into t values (1)")
    assert reader.query("select count(*) as n from t") == [{"n": 0}]
    reader.close()


def test_a_dashboard_port_in_use_is_one_line_naming_the_key(tmp_path, parent_config,
                                                            child_config):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        write_chain(tmp_path / "chain.json", 100, [])
        for config, script in ((parent_config(dashboard_port=port), "parent.py"),
                               (child_config("c1", 1, dashboard_port=port), "child.py")):
            run = subprocess.run([sys.executable, ROOT / script, "--config", config,
                                  "--log-level", "ERROR"], capture_output=True, text=True,
                                 timeout=60)
            assert run.returncode == 2, run.stderr
            assert run.stderr.splitlines() == [
                f"error: {config}: cannot listen on 127.0.0.1:{port}: address already in use; "
                "change key 'dashboard_port', or stop the process that holds the port"]


# ---------------------------------------------------------------------------------------------
# A job's proof, and the command its page gives to check it
# ---------------------------------------------------------------------------------------------

def test_a_jobs_page_gives_the_command_that_checks_its_proof(tmp_path, make_state, wallets):
    state = make_state()
    config = tmp_path / "state.toml"
    result = json.dumps({"score": 3, "note": HOSTILE})
    fields = auth.result_fields("c1", 1, 2, True, result)
    signature = wallets["c1"].sign(auth.signed_message(*fields))
    state.db.query(
        """insert into jobs (fingerprint, submission_id, miner_hotkey, hf_repo_id, hf_repo_commit,
               commit_block, env_provider, env_name, random_seed, max_retries, status, child_id,
               attempts, finished_at, success, result, result_signature, result_hotkey,
               result_attempt)
           values ('f', 1, '5Miner001', 'org/model-1', '', 100, 'demo', 'demo-env', 1, 3,
                   'completed', 'c1', 2, now(), true, %s, %s, %s, 2)""",
        (result, signature, wallets["c1"].ss58_address))
    cfg = common.load_config(config, {"dashboard_port": free_port()})
    server = pages.serve_parent(cfg, state.db.dsn, state)
    try:
        page = Cells(fetch(f"http://127.0.0.1:{cfg.dashboard_port}/jobs/1")[2])
    finally:
        server.shutdown()
        server.server_close()
    assert page.figure("result") == result
    assert page.figure("result_signature") == signature.hex()
    command = page.figure("proof_command")
    assert command.startswith("python -c ")

    def check():
        run = subprocess.run(command.replace("python", sys.executable, 1), shell=True,
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        return run.stdout.strip()

    assert check() == "True"
    state.db.query("update jobs set result = %s", (json.dumps({"score": 9}),))
    assert check() == "False"


def test_the_overview_says_what_needs_attention_and_the_weights_last_set(
        tmp_path, make_state):
    state = make_state(weights={"enabled": True})
    for block, success, message in ((90, True, "set"), (95, True, "set"),
                                    (100, False, "the node said <b>no</b>")):
        state.db.query("insert into weight_attempts (block, uids, weights, commit_reveal, "
                       "success, message) values (%s, '{1,2,3}', '{0.2,0.3,0.5}', false, %s, %s)",
                       (block, success, message))
    state.db.query("""insert into jobs (fingerprint, submission_id, miner_hotkey, hf_repo_id,
                          hf_repo_commit, commit_block, env_provider, env_name, random_seed,
                          max_retries, created_at)
                      values ('f', 1, '5Miner001', 'org/model-1', '', 100, 'demo', 'demo-env',
                              1, 3, now() - interval '1 hour')""")
    weights = type("WeightSetter", (), {"next_check": 130.0, "clock": lambda self: 100.0,
                                        "skipped": set()})()
    cfg = common.load_config(tmp_path / "state.toml", {"dashboard_port": free_port()})
    server = pages.serve_parent(cfg, state.db.dsn, state, weights)
    server.pages.started -= 3600  # an hour without a chain read
    try:
        page = Cells(fetch(f"http://127.0.0.1:{cfg.dashboard_port}/")[2])
    finally:
        server.shutdown()
        server.server_close()
    assert (page.figure("weights_block"), page.figure("weights_uids")) == ("95", "3")
    assert float(page.figure("weights_next")) == 30.0
    assert page.figure("weights_last_attempt") == "failed: the node said <b>no</b>"
    alerts = [row["alert"] for row in page.rows(None).values()]
    assert len(alerts) == 4, alerts
    assert alerts[0].startswith("no active child: no job is evaluated")
    assert alerts[1].startswith("1 jobs pending (the oldest for 60 min) and none finished")
    # The failure count is the process's counter, which other tests in this run may have moved.
    failures = f"({pages.chain_failures():.0f} failed since the start)"
    assert alerts[2].startswith(f"no chain read has succeeded for 60 min {failures}")
    assert alerts[3] == "the last attempt to set weights (block 100) failed: the node said " \
        "<b>no</b>"
