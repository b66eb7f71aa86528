@0xa007a6fdaf5da8da;
# The parent/child validator protocol. The seed design's interface is frozen: method names,
# ordinals, parameter names and types never change. Extensions only add fields at the end of a
# struct or parameter list, or methods @5 and up, so a client built from the seed's text still
# talks to us (it simply never sees the added fields).

struct EvaluationJobData {
  jobId @0 :UInt64;
  submissionId @1 :UInt64;      # stable id of the miner's commitment (hotkey + content)
  minerHotkey @2 :Text;
  hfRepoId @3 :Text;
  hfRepoCommit @4 :Text;        # revision to evaluate; empty = the repo's default branch
  envProvider @5 :Text;
  envName @6 :Text;
  logsPath @7 :Text;            # file name for the evaluator's stderr, relative to the child's logs_dir
  randomSeed @8 :UInt32;
  maxRetries @9 :UInt8;
  retryCount @10 :UInt8;
  createdAt @11 :UInt64;        # unix milliseconds
  # Added: the parent's count of hand-overs of this job, this one included (1 = the first); a
  # result and a revocation name the attempt they are about.
  attempt @12 :UInt32;
  # Added: the parent's hotkey signature over every field above and the child id
  # (auth.job_fields); a child with auth on runs only a job whose signature holds.
  signature @13 :Data;
}

# Added: one result in a reportJobCompletions call, and the parent's answer to it.
struct JobResult {
  jobId @0 :UInt64;
  success @1 :Bool;
  result @2 :Text;
  attempt @3 :UInt32;           # added: the attempt the child held (the job's `attempt`)
  signature @4 :Data;           # added: the child's signature over it (auth.result_fields)
  # Added: a failure that is not the miner's (the evaluator exited 75, could not start, was
  # killed by a signal the child did not send, or the child had no disk for it): the parent
  # gives the job out again, up to maxRetries. Covered by the signature.
  retryable @5 :Bool;
}

struct ReportReply {
  acknowledged @0 :Bool;        # as in reportJobCompletion
  message @1 :Text;
  signature @2 :Data;           # added: the parent's signature over it (auth.reply_fields)
}

# Added: a job a child holds that is no longer its own, and why.
struct Revocation {
  jobId @0 :UInt64;
  reason @1 :Text;              # e.g. "cancelled by the operator", "superseded by job 9"
  attempt @2 :UInt32;           # added: the attempt taken back
  signature @3 :Data;           # added: the parent's signature (auth.revocation_fields)
}

interface ValidatorJobsService {
  # Child calls this to register with parent. Added: the child's hotkey (ss58), and its sr25519
  # signature over [childId, endpoint, parent's hotkey, the connection's challenge (see
  # challenge), timestamp (unix ms), nonce]; the parent checks them unless its auth is "off".
  # A registration binds the connection to the child.
  registerChild @0 (childId :Text, endpoint :Text, hotkey :Text, timestamp :UInt64, nonce :Text,
                    signature :Data) -> (success :Bool, message :Text);

  # Child calls this to request jobs. Added: `heldJobs`, the ids of the jobs the child holds and
  # has not reported yet; when it is set, the parent sends again any job it assigned to the child
  # that is missing from it (an answer lost on the way). `error` says why a request was refused.
  # Added: `results`, finished jobs reported in the same call, recorded before any job is
  # assigned (as with reportJobCompletions); replies[i] answers results[i]. A parent of an older
  # version ignores `results` and answers no replies: the child then reports them separately.
  # Added: `waitMs`, how long the parent may hold the answer when it has no job for the child
  # (long polling): it answers as soon as a job for the child becomes pending, and after at most
  # waitMs or 5 s, whichever is shorter. 0 (a seed-built child sends nothing) answers at once.
  # Added: `revoked`, the jobs among heldJobs that are no longer the child's (cancelled, given
  # back to the queue, handed to another child): the child stops them and reports nothing.
  requestJobs @1 (childId :Text, maxJobs :UInt32, heldJobs :List(UInt64),
                  results :List(JobResult), waitMs :UInt32)
      -> (jobs :List(EvaluationJobData), error :Text, replies :List(ReportReply),
          revoked :List(Revocation));

  # Child calls this to report job completion. acknowledged = the parent has the outcome and the
  # child may stop resending it; `message` (added) says why a report was not recorded.
  # Added: `attempt` and `signature`, as in JobResult; `signature` (added) of the answer, as in
  # ReportReply.
  # Added: `retryable`, as in JobResult.
  reportJobCompletion @2 (childId :Text, jobId :UInt64, success :Bool, result :Text,
                          attempt :UInt32, signature :Data, retryable :Bool)
      -> (acknowledged :Bool, message :Text, signature :Data);

  # Parent calls this on child to send a job directly. Added: the parent's signature over
  # [child id, jobId, timestamp, nonce], which the child checks unless its auth is "off".
  receiveJob @3 (job :EvaluationJobData, timestamp :UInt64, nonce :Text, signature :Data)
      -> (accepted :Bool, message :Text);

  # Health check
  ping @4 () -> (pong :Text);

  # Statistics as JSON (the seed's format on a parent; queue counts on a child)
  getStats @5 () -> (json :Text);

  # Added: child calls this to report several results at once; the parent records them in one
  # transaction. replies[i] answers results[i]; `error` says why the whole call was refused (then
  # `replies` is empty). A parent without this method answers "unimplemented": the child then
  # reports one by one with reportJobCompletion.
  reportJobCompletions @6 (childId :Text, results :List(JobResult))
      -> (replies :List(ReportReply), error :Text);

  # Added: a child calls this on a new connection before registerChild, and signs the challenge
  # into its registration: a registration recorded anywhere else is worth nothing on this
  # connection. `time` is the parent's clock (unix ms), for the child to check its own.
  challenge @7 () -> (challenge :Data, time :UInt64, error :Text);
}
