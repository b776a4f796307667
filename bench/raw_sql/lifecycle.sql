-- one job, three transactions: insert, claim (SKIP LOCKED), complete
INSERT INTO jobs (payload) VALUES ('{"model": "noop"}');
WITH next AS (
    SELECT id FROM jobs
    WHERE status = 'queued'
    ORDER BY priority DESC, created_at
    LIMIT 1
    FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE jobs j SET status = 'running', started_at = now()
    FROM next WHERE j.id = next.id
    RETURNING j.id
)
SELECT coalesce(min(id), 0) AS job_id FROM claimed
\gset
UPDATE jobs SET status = 'succeeded', finished_at = now() WHERE id = :job_id;
