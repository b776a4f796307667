-- 100 jobs, three transactions: insert 100, claim up to 100 (SKIP LOCKED), complete them
INSERT INTO jobs (payload) SELECT '{"model": "noop"}' FROM generate_series(1, 100);
WITH next AS (
    SELECT id FROM jobs
    WHERE status = 'queued'
    ORDER BY priority DESC, created_at
    LIMIT 100
    FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE jobs j SET status = 'running', started_at = now()
    FROM next WHERE j.id = next.id
    RETURNING j.id
)
SELECT coalesce(array_agg(id), '{}') AS job_ids FROM claimed
\gset
UPDATE jobs SET status = 'succeeded', finished_at = now() WHERE id = ANY (:job_ids::bigint[]);
