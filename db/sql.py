"""Every SQL statement vramq runs, by name. Nothing outside ``db/`` writes SQL.

Conventions:
- ``$now`` parameters are ``timestamptz`` and may be NULL: ``coalesce($n, now())`` makes time a parameter,
  so leases, backoff, rescue and retention are testable without sleeping. The database is the clock.
- Every write by a scheduler carries ``lease_owner = $term``: a deposed leader's late writes match no row
  (fencing), whatever it believes.
- Status changes are audited by a trigger (``job_events``), never by the callers.
"""

from __future__ import annotations

# NOTIFY channels (the triggers that send them are installed by the migrations).
CHANNEL_NEW = "vramq_jobs_new"
CHANNEL_STATUS = "vramq_jobs"
CHANNEL_CANCEL = "vramq_cancel"

# Columns a scheduler needs to run a job (RETURNING of claims).
_CLAIM_COLUMNS = """j.id, j.tenant, j.model, j.feature, j.pool, j.inputs, j.priority, j.attempts,
    j.max_attempts, j.timeout_s, j.created_at, j.lease_expires_at, j.cancel_requested_at, j.status,
    j.worker"""

# --------------------------------------------------------------------------------------------------
# Enqueue.
# --------------------------------------------------------------------------------------------------

# enqueue: one job; a repeated idempotency key of the same tenant inserts nothing (the caller then
# reads the existing job). ON CONFLICT waits for a concurrent inserter of the same key to commit.
ENQUEUE = """
INSERT INTO jobs (tenant, model, feature, pool, inputs, metadata, priority, max_attempts, timeout_s,
                  idempotency_key, run_after, created_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10,
        coalesce($11::timestamptz, $12::timestamptz, now()), coalesce($12::timestamptz, now()))
ON CONFLICT (tenant, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
RETURNING *
"""

# get_by_idempotency_key: the job an earlier enqueue with this key created.
GET_BY_IDEMPOTENCY_KEY = """
SELECT * FROM jobs WHERE tenant = $1 AND idempotency_key = $2
"""

# enqueue_many: a batch in one statement (arrays, one round trip); no idempotency keys.
ENQUEUE_MANY = """
INSERT INTO jobs (tenant, model, feature, pool, inputs, metadata, priority, max_attempts, timeout_s,
                  run_after, created_at)
SELECT b.tenant, b.model, b.feature, b.pool, b.inputs, b.metadata, b.priority, b.max_attempts,
       b.timeout_s, coalesce(b.run_after, $9::timestamptz, now()), coalesce($9::timestamptz, now())
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::jsonb[], $6::int[], $7::int[],
            $8::float8[], $10::jsonb[], $11::timestamptz[])
     AS b(tenant, model, feature, pool, inputs, priority, max_attempts, timeout_s, metadata, run_after)
RETURNING id
"""

# --------------------------------------------------------------------------------------------------
# Leader: peek, claim, lease, start, progress, finish.
# --------------------------------------------------------------------------------------------------

# peek: for each model the leader serves, how many runnable jobs wait (capped), their top priority
# and the age of the oldest of that priority. Index-only walks of the queued partial indexes.
PEEK = """
WITH wanted AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::int[]) AS w(model, feature, cap)
)
SELECT w.model,
       count(q.id)::int AS queued,
       coalesce(max(q.priority), 0) AS priority,
       coalesce(extract(epoch FROM coalesce($5::timestamptz, now()) - min(q.created_at)
                        FILTER (WHERE q.top)), 0)::float8 AS oldest_wait_s
FROM wanted w
LEFT JOIN LATERAL (
    SELECT s.id, s.priority, s.created_at, s.priority = max(s.priority) OVER () AS top
    FROM (
        (SELECT j.id, j.priority, j.created_at FROM jobs j
         WHERE j.status = 'queued' AND j.model = w.model
           AND j.run_after <= coalesce($5::timestamptz, now())
           AND (j.pool IS NULL OR j.pool = $4)
         ORDER BY j.priority DESC, j.created_at
         LIMIT w.cap)
        UNION ALL
        (SELECT j.id, j.priority, j.created_at FROM jobs j
         WHERE j.status = 'queued' AND j.model IS NULL AND j.feature = w.feature
           AND j.run_after <= coalesce($5::timestamptz, now())
           AND (j.pool IS NULL OR j.pool = $4)
         ORDER BY j.priority DESC, j.created_at
         LIMIT w.cap)
    ) s
) q ON true
GROUP BY w.model
"""

# claim: up to n runnable jobs per model, highest priority then oldest first, leased to $1 (the term).
# A job that gets a worker slot ($8..$11: the k-th job of a model goes to the slot (model, k) the
# leader chose beforehand) goes straight to running on that worker: one row version, one audit event
# and one NOTIFY fewer per job than leased -> running. Jobs claimed without a slot stay leased.
_CLAIM_FILTER = """j.status = 'queued'
           AND j.run_after <= coalesce($6::timestamptz, now())
           AND (j.pool IS NULL OR j.pool = $5)"""
CLAIM = f"""
WITH wanted AS (
    SELECT * FROM unnest($2::text[], $3::text[], $4::int[]) AS w(model, feature, n)
    WHERE w.n > 0
),
by_model AS (
    SELECT c.id, w.model AS run_model, c.priority, c.created_at, w.n
    FROM wanted w
    CROSS JOIN LATERAL (
        -- SKIP LOCKED: rows another leader is claiming right now are passed over, never waited for.
        SELECT j.id, j.priority, j.created_at FROM jobs j
        WHERE j.model = w.model AND {_CLAIM_FILTER}
        ORDER BY j.priority DESC, j.created_at
        LIMIT w.n
        FOR UPDATE SKIP LOCKED
    ) c
),
by_feature AS (
    -- Jobs that name only a feature: any model of that feature may take them.
    SELECT c.id, w.model AS run_model, c.priority, c.created_at, w.n
    FROM wanted w
    CROSS JOIN LATERAL (
        SELECT j.id, j.priority, j.created_at FROM jobs j
        WHERE j.model IS NULL AND j.feature = w.feature AND {_CLAIM_FILTER}
        ORDER BY j.priority DESC, j.created_at
        LIMIT w.n
        FOR UPDATE SKIP LOCKED
    ) c
),
ranked AS (
    SELECT id, run_model, n,
           row_number() OVER (PARTITION BY run_model ORDER BY priority DESC, created_at) AS rn
    FROM (SELECT * FROM by_model UNION ALL SELECT * FROM by_feature) u
),
picked AS (
    -- DISTINCT ON: a feature-only job seen by two models of that feature is taken once. Rows locked
    -- above but not picked are released when the statement commits.
    SELECT DISTINCT ON (id) id, run_model, rn FROM ranked WHERE rn <= n ORDER BY id, rn
),
slots AS (
    SELECT * FROM unnest($8::text[], $9::int[], $10::text[], $11::text[]) AS s(model, rn, worker, gpu)
)
UPDATE jobs j
SET status = CASE WHEN s.worker IS NULL THEN 'leased' ELSE 'running' END,
    started_at = CASE WHEN s.worker IS NULL THEN j.started_at ELSE coalesce($6::timestamptz, now()) END,
    worker = s.worker,
    gpu = s.gpu,
    model = p.run_model,
    lease_owner = $1,
    -- attempts counts claims: a rescued job's next claim is its next attempt.
    attempts = j.attempts + 1,
    lease_expires_at = coalesce($6::timestamptz, now()) + make_interval(secs => $7::float8),
    cancel_requested_at = NULL,
    progress = 0,
    progress_message = NULL,
    progress_at = NULL
FROM picked p LEFT JOIN slots s ON s.model = p.run_model AND s.rn = p.rn
WHERE j.id = p.id AND j.status = 'queued'
  -- A deposed leader that has not noticed yet claims nothing: a newer term of its pool exists.
  AND NOT EXISTS (SELECT 1 FROM schedulers s WHERE s.pool = $5 AND s.term > $1)
RETURNING {_CLAIM_COLUMNS}
"""

# extend_leases: every lease of a term in one statement; returns what is still ours, so the leader
# learns of jobs taken from it (rescued, cancelled) and stops their workers. It never waits for a row
# lock: a row locked right now is being finished by the leader's own writer (or cancelled, or rescued
# by someone else), and waiting for it queued the renewal behind busy writers (and, locking rows in
# another order than a batch of completions, into deadlocks) until the leader fenced itself. Such a
# row keeps its lease until the next renewal, and still counts as ours if the snapshot says so.
EXTEND_LEASES = """
WITH renewed AS (
    UPDATE jobs j
    SET lease_expires_at = coalesce($2::timestamptz, now()) + make_interval(secs => $3::float8)
    FROM (SELECT id FROM jobs
          WHERE lease_owner = $1 AND status IN ('leased', 'running')
          FOR UPDATE SKIP LOCKED) l
    WHERE j.id = l.id
    RETURNING j.id
)
SELECT id FROM jobs WHERE lease_owner = $1 AND status IN ('leased', 'running')
"""

# start_many: leased -> running for jobs handed to a worker (batched by the leader).
START_MANY = """
UPDATE jobs j
SET status = 'running', started_at = coalesce($5::timestamptz, now()), worker = s.worker, gpu = s.gpu
FROM unnest($2::uuid[], $3::text[], $4::text[]) AS s(id, worker, gpu)
WHERE j.id = s.id AND j.lease_owner = $1 AND j.status = 'leased'
RETURNING j.id
"""

# progress: throttled in SQL as well as in the leader; 1.0 is always written. $3 is cast explicitly:
# PostgreSQL types a parameter at its first use, and WHERE is analysed before SET, so `$3 >= 1` alone
# would make it an integer and store every fraction as 0.
PROGRESS = """
UPDATE jobs
SET progress = $3::float8, progress_message = $4, progress_at = coalesce($6::timestamptz, now())
WHERE id = $1 AND lease_owner = $2 AND status = 'running'
  AND (progress_at IS NULL
       OR progress_at <= coalesce($6::timestamptz, now()) - make_interval(secs => $5::float8)
       OR $3::float8 >= 1)
RETURNING id
"""

# complete_many: running/leased -> succeeded, fenced on the term.
COMPLETE_MANY = """
UPDATE jobs j
SET status = 'succeeded', result = d.result, progress = 1, progress_message = NULL, error = NULL,
    finished_at = coalesce($4::timestamptz, now()), lease_expires_at = NULL
FROM unnest($2::uuid[], $3::jsonb[]) AS d(id, result)
WHERE j.id = d.id AND j.lease_owner = $1 AND j.status IN ('leased', 'running')
RETURNING j.id, j.tenant
"""

# record_outputs: files a finished job produced; only for jobs that $1 just completed.
RECORD_OUTPUTS = """
INSERT INTO files (tenant, job_id, kind, name, size, sha256, content_type, path)
SELECT j.tenant, o.job_id, 'output', o.name, o.size, o.sha256, o.content_type, o.path
FROM unnest($2::uuid[], $3::text[], $4::bigint[], $5::text[], $6::text[], $7::text[])
     AS o(job_id, name, size, sha256, content_type, path)
JOIN jobs j ON j.id = o.job_id AND j.lease_owner = $1 AND j.status = 'succeeded'
ON CONFLICT (job_id, name) WHERE kind = 'output'
DO UPDATE SET size = EXCLUDED.size, sha256 = EXCLUDED.sha256, content_type = EXCLUDED.content_type,
              path = EXCLUDED.path, created_at = now()
"""

# fail_many: a failed attempt either goes back to the queue (retryable, attempts left; run_after
# pushed by exponential backoff with jitter) or ends failed with this error. Fenced on the term.
FAIL_MANY = """
UPDATE jobs j
SET status = CASE WHEN d.retry AND j.attempts < j.max_attempts THEN 'queued' ELSE 'failed' END,
    run_after = CASE WHEN d.retry AND j.attempts < j.max_attempts
        THEN coalesce($6::timestamptz, now()) + make_interval(secs =>
             least($7::float8, $8::float8 * power(2, greatest(j.attempts - 1, 0)))
             * (0.5 + random() * 0.5))
        ELSE j.run_after END,
    finished_at = CASE WHEN d.retry AND j.attempts < j.max_attempts
        THEN NULL ELSE coalesce($6::timestamptz, now()) END,
    error = jsonb_build_object('kind', d.kind, 'message', d.message, 'attempt', j.attempts),
    lease_owner = NULL, lease_expires_at = NULL, worker = NULL, gpu = NULL
FROM unnest($2::uuid[], $3::text[], $4::text[], $5::bool[]) AS d(id, kind, message, retry)
WHERE j.id = d.id AND j.lease_owner = $1 AND j.status IN ('leased', 'running')
RETURNING j.id, j.status, j.attempts
"""

# release: give jobs back to the queue without counting the attempt: the leader claimed more than it
# could start, or it is shutting down gracefully and stopped their workers first.
RELEASE = """
UPDATE jobs
SET status = 'queued', attempts = greatest(attempts - 1, 0), lease_owner = NULL,
    lease_expires_at = NULL, worker = NULL, gpu = NULL, progress = 0, progress_message = NULL,
    error = CASE WHEN status = 'running'
        THEN jsonb_build_object('kind', 'lease_lost', 'message', $3::text, 'attempt', attempts)
        ELSE error END
WHERE id = ANY($2::uuid[]) AND lease_owner = $1 AND status IN ('leased', 'running')
RETURNING id
"""

# mark_cancelled: the leader stopped the job's worker after a cancel request.
MARK_CANCELLED = """
UPDATE jobs
SET status = 'cancelled', finished_at = coalesce($3::timestamptz, now()), lease_expires_at = NULL,
    error = jsonb_build_object('kind', 'cancelled', 'message', 'cancelled while running',
                               'attempt', attempts)
WHERE id = $2 AND lease_owner = $1 AND status IN ('leased', 'running')
RETURNING id
"""

# cancel_requests: cancel requests the leader has not acted on yet (NOTIFY may have been lost).
CANCEL_REQUESTS = """
SELECT id FROM jobs
WHERE lease_owner = $1 AND status IN ('leased', 'running') AND cancel_requested_at IS NOT NULL
"""

# --------------------------------------------------------------------------------------------------
# Cancel (API side).
# --------------------------------------------------------------------------------------------------

# cancel: queued -> cancelled at once; leased/running -> cancel_requested_at (a trigger NOTIFYs the
# leader). Terminal jobs are left alone. $2 NULL means any tenant (admin).
CANCEL = """
WITH target AS (
    SELECT id, status FROM jobs
    WHERE id = $1 AND ($2::text IS NULL OR tenant = $2)
    FOR UPDATE
)
UPDATE jobs j
SET status = CASE WHEN t.status = 'queued' THEN 'cancelled' ELSE j.status END,
    finished_at = CASE WHEN t.status = 'queued' THEN coalesce($3::timestamptz, now())
                       ELSE j.finished_at END,
    error = CASE WHEN t.status = 'queued'
        THEN jsonb_build_object('kind', 'cancelled', 'message', 'cancelled before it ran',
                                'attempt', j.attempts)
        ELSE j.error END,
    cancel_requested_at = coalesce(j.cancel_requested_at, coalesce($3::timestamptz, now()))
FROM target t
WHERE j.id = t.id AND t.status IN ('queued', 'leased', 'running')
RETURNING j.*
"""

# --------------------------------------------------------------------------------------------------
# Rescue and retention.
# --------------------------------------------------------------------------------------------------

_RESCUE_SET = """
SET status = CASE
        WHEN j.cancel_requested_at IS NOT NULL THEN 'cancelled'
        WHEN j.attempts < j.max_attempts THEN 'queued'
        ELSE 'failed' END,
    error = CASE
        WHEN j.cancel_requested_at IS NOT NULL THEN jsonb_build_object(
            'kind', 'cancelled', 'message', 'cancelled; its scheduler was lost', 'attempt', j.attempts)
        ELSE jsonb_build_object('kind', 'lease_lost', 'message', $MSG, 'attempt', j.attempts) END,
    run_after = coalesce($NOW::timestamptz, now()),
    finished_at = CASE WHEN j.cancel_requested_at IS NOT NULL OR j.attempts >= j.max_attempts
                       THEN coalesce($NOW::timestamptz, now()) END,
    lease_owner = NULL, lease_expires_at = NULL, worker = NULL, gpu = NULL
"""

# The rescues read the old owner in a locked subquery: RETURNING sees only the new (NULL) one.
# rescue_expired: any leader requeues (or fails, past max_attempts) jobs whose lease ran out: their
# scheduler stopped extending, so it is gone or has fenced itself off.
RESCUE_EXPIRED = (
    "UPDATE jobs j"
    + _RESCUE_SET.replace("$MSG", "'lease expired: its scheduler stopped renewing it'").replace("$NOW", "$1")
    + """
FROM (SELECT id, lease_owner FROM jobs
      WHERE status IN ('leased', 'running') AND lease_expires_at < coalesce($1::timestamptz, now())
      FOR UPDATE SKIP LOCKED) old
WHERE j.id = old.id
RETURNING j.id, j.status, j.attempts, old.lease_owner
"""
)

# rescue_terms: a new leader requeues the jobs of earlier terms it knows are dead.
RESCUE_TERMS = (
    "UPDATE jobs j"
    + _RESCUE_SET.replace("$MSG", "'its scheduler died'").replace("$NOW", "$2")
    + """
FROM (SELECT id, lease_owner FROM jobs
      WHERE status IN ('leased', 'running') AND lease_owner = ANY($1::bigint[])
      FOR UPDATE) old
WHERE j.id = old.id
RETURNING j.id, j.status, j.attempts, old.lease_owner
"""
)

# prune: finished jobs past the retention, a batch at a time (their events and output rows cascade);
# returns the output paths so the caller can delete the files.
PRUNE = """
WITH doomed AS (
    SELECT id FROM jobs
    WHERE status IN ('succeeded', 'failed', 'cancelled')
      AND finished_at < coalesce($2::timestamptz, now()) - make_interval(secs => $1::float8)
    ORDER BY finished_at
    LIMIT $3
),
paths AS (SELECT f.path FROM files f WHERE f.job_id IN (SELECT id FROM doomed)),
gone AS (DELETE FROM jobs WHERE id IN (SELECT id FROM doomed) RETURNING id)
SELECT (SELECT count(*) FROM gone)::int AS n, (SELECT coalesce(array_agg(path), '{}') FROM paths) AS paths
"""

# --------------------------------------------------------------------------------------------------
# Leader election. One session-level advisory lock per pool, in vramq's own key space (first key), held
# on a dedicated connection for as long as the term lasts. Blocking (not try-lock): a standby is granted
# the lock the moment the leader's session ends, which makes failover as fast as PostgreSQL notices.
# --------------------------------------------------------------------------------------------------

LEADER_LOCK = "SELECT pg_advisory_lock(hashtext('vramq'), hashtext($1))"
LEADER_TRY_LOCK = "SELECT pg_try_advisory_lock(hashtext('vramq'), hashtext($1))"
LEADER_UNLOCK = "SELECT pg_advisory_unlock(hashtext('vramq'), hashtext($1))"
# The server ends the lock session (and frees the lock) when its leader stops talking: a path that
# stalls without closing (a proxy, a pooler, a frozen process) must not keep a pool leaderless.
SESSION_IDLE_TIMEOUT = "SELECT set_config('idle_session_timeout', $1, false)"

# --------------------------------------------------------------------------------------------------
# Scheduler terms.
# --------------------------------------------------------------------------------------------------

OPEN_TERM = """
INSERT INTO schedulers (pool, host, pid, snapshot, started_at, heartbeat_at)
VALUES ($1, $2, $3, $4, coalesce($5::timestamptz, now()), coalesce($5::timestamptz, now()))
RETURNING term, started_at
"""

# heartbeat: returns nothing when the term was ended (another leader took over): step down.
HEARTBEAT = """
UPDATE schedulers SET heartbeat_at = coalesce($3::timestamptz, now()), snapshot = $2
WHERE term = $1 AND ended_at IS NULL
RETURNING term
"""

END_TERM = """
UPDATE schedulers SET ended_at = coalesce($2::timestamptz, now())
WHERE term = $1 AND ended_at IS NULL
"""

# earlier_terms: the pool's earlier terms that still hold active jobs, or were never ended.
EARLIER_TERMS = """
SELECT s.term, s.host, s.pid, s.snapshot, s.ended_at,
       (SELECT count(*) FROM jobs j
        WHERE j.lease_owner = s.term AND j.status IN ('leased', 'running'))::int AS active
FROM schedulers s
WHERE s.pool = $1 AND s.term < $2
  AND (s.ended_at IS NULL
       OR EXISTS (SELECT 1 FROM jobs j WHERE j.lease_owner = s.term
                  AND j.status IN ('leased', 'running')))
ORDER BY s.term
"""

END_EARLIER_TERMS = """
UPDATE schedulers SET ended_at = coalesce($3::timestamptz, now())
WHERE pool = $1 AND term < $2 AND ended_at IS NULL
"""

# --------------------------------------------------------------------------------------------------
# Reads.
# --------------------------------------------------------------------------------------------------

GET_JOB = """
SELECT * FROM jobs WHERE id = $1 AND ($2::text IS NULL OR tenant = $2)
"""

JOB_EVENTS = """
SELECT id, job_id, at, from_status, to_status, attempt, lease_owner, gpu, worker, detail
FROM job_events WHERE job_id = $1 ORDER BY id
"""

# input_files: the caller's own uploads named by a job's inputs (tenant-checked).
INPUT_FILES = """
SELECT id, name, size, sha256, content_type, path FROM files
WHERE id = ANY($1::uuid[]) AND tenant = $2 AND kind = 'input'
"""
