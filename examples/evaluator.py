#!/usr/bin/env python3
"""An example evaluator, to copy and fill in: the contract a child validator holds it to.

The child runs it once per job ([evaluator] command = ["python3", "examples/evaluator.py"]):
- the job arrives as one JSON object on stdin (jobId, hfRepoId, hfRepoCommit, envProvider,
  envName, randomSeed, ...);
- its environment says the rest: VALIDATOR_SCRATCH_DIR (a directory of its own, empty at the
  start and deleted after), VALIDATOR_DEADLINE (unix seconds: past it, it is stopped),
  VALIDATOR_STOP_GRACE_SECONDS, VALIDATOR_JOB_ID, VALIDATOR_ATTEMPT, and with [evaluator] gpus
  CUDA_VISIBLE_DEVICES (its own devices);
- it prints one JSON object on stdout, its result (the parent reads `score` by default), and
  exits 0;
- it exits 75 (EX_TEMPFAIL) when it fails through no fault of the miner's (here: the download
  of the model failed), and the job is tried again, on another child when there is one;
- on SIGTERM (a cancel, its timeout, a shutdown) it cleans up and exits within
  VALIDATOR_STOP_GRACE_SECONDS, after which the child sends SIGKILL;
- what it writes to stderr is its log, kept by the child (the first and the newest part).

Where the model comes from: MODEL_URL, a template of hfRepoId and hfRepoCommit
(default: Hugging Face's config.json of that revision). The "evaluation" below is a placeholder:
replace it with your environment's episodes, seeded with randomSeed.
"""

import hashlib
import json
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

EX_TEMPFAIL = 75
MODEL_URL = os.environ.get("MODEL_URL",
                           "https://huggingface.co/{repo}/resolve/{revision}/config.json")


def stop_cleanly(signum, frame):
    # Stop what you started here (a container, a simulator), then leave.
    print("stopped by the child validator: cleaning up", file=sys.stderr)
    sys.exit(1)


def download(job, scratch):
    url = MODEL_URL.format(repo=job["hfRepoId"], revision=job["hfRepoCommit"] or "main")
    seconds_left = float(os.environ.get("VALIDATOR_DEADLINE", time.time() + 60)) - time.time()
    target = scratch / "model"
    try:
        with urllib.request.urlopen(url, timeout=max(1.0, min(60.0, seconds_left))) as answer:
            target.write_bytes(answer.read())
    except (urllib.error.URLError, OSError) as e:
        print(f"download of {url} failed: {e}", file=sys.stderr)
        sys.exit(EX_TEMPFAIL)  # not the miner's fault: try again
    return target


def evaluate(model, job):
    """A placeholder score in [0, 1): the same model and seed always score the same."""
    digest = hashlib.sha256(model.read_bytes() + str(job["randomSeed"]).encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32


def main():
    signal.signal(signal.SIGTERM, stop_cleanly)
    job = json.load(sys.stdin)
    scratch = Path(os.environ.get("VALIDATOR_SCRATCH_DIR", "."))
    print(f"job {job['jobId']}: {job['hfRepoId']}@{job['hfRepoCommit']} on "
          f"{job.get('envProvider')}/{job.get('envName')}, GPUs "
          f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'as the child has them')}", file=sys.stderr)
    model = download(job, scratch)
    score = evaluate(model, job)
    print(json.dumps({"score": round(score, 6), "seed": job["randomSeed"]}))


if __name__ == "__main__":
    main()
