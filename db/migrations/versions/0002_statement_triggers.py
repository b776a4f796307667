"""Statement-level audit and NOTIFY triggers over transition tables.

A row-level trigger runs its function once per row: a 1,000-job batch insert spent more time in the
audit trigger than in the insert. These run once per statement and write every row's event (and send
the notifications) with one set-based INSERT / SELECT.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

INSERTED = """
CREATE OR REPLACE FUNCTION vramq_jobs_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO job_events (job_id, from_status, to_status, attempt, lease_owner, gpu, worker, detail)
    SELECT n.id, NULL, n.status, n.attempts, n.lease_owner, n.gpu, n.worker, NULL FROM new_rows n;
    -- Wake the leaders once per model (or feature) the statement queued jobs for.
    PERFORM pg_notify('vramq_jobs_new', k.key)
    FROM (SELECT DISTINCT coalesce(n.model, '*' || n.feature) AS key
          FROM new_rows n WHERE n.status = 'queued') k;
    RETURN NULL;
END
$$;
"""

UPDATED = """
CREATE OR REPLACE FUNCTION vramq_jobs_updated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- The audit trail: one event per status change.
    INSERT INTO job_events (job_id, from_status, to_status, attempt, lease_owner, gpu, worker, detail)
    SELECT n.id, o.status, n.status, n.attempts,
           coalesce(n.lease_owner, o.lease_owner), coalesce(n.gpu, o.gpu), coalesce(n.worker, o.worker),
           nullif(jsonb_strip_nulls(jsonb_build_object(
               'error', CASE WHEN n.error IS DISTINCT FROM o.error THEN n.error END,
               'run_after', CASE WHEN n.status = 'queued' THEN n.run_after END,
               'cancel_requested_at', n.cancel_requested_at
           )), '{}'::jsonb)
    FROM new_rows n JOIN old_rows o ON o.id = n.id
    WHERE n.status IS DISTINCT FROM o.status
    ORDER BY n.id;
    -- Live status for the API: a small payload per changed job.
    PERFORM pg_notify('vramq_jobs', json_build_object(
                'id', n.id, 'status', n.status, 'progress', n.progress)::text)
    FROM new_rows n JOIN old_rows o ON o.id = n.id
    WHERE n.status IS DISTINCT FROM o.status OR n.progress IS DISTINCT FROM o.progress;
    -- Requeued jobs wake the leaders; cancel requests reach the leader running the job.
    PERFORM pg_notify('vramq_jobs_new', k.key)
    FROM (SELECT DISTINCT coalesce(n.model, '*' || n.feature) AS key
          FROM new_rows n JOIN old_rows o ON o.id = n.id
          WHERE n.status = 'queued' AND o.status IS DISTINCT FROM 'queued') k;
    PERFORM pg_notify('vramq_cancel', n.id::text)
    FROM new_rows n JOIN old_rows o ON o.id = n.id
    WHERE n.cancel_requested_at IS NOT NULL AND o.cancel_requested_at IS NULL
      AND n.status IN ('leased', 'running');
    RETURN NULL;
END
$$;
"""

OLD_TRIGGERS = ("jobs_notify_update", "jobs_notify_insert", "jobs_audit_update", "jobs_audit_insert")

# The 0001 definitions, restored on downgrade.
OLD_CREATE = [
    """CREATE TRIGGER jobs_audit_insert AFTER INSERT ON jobs
    FOR EACH ROW EXECUTE FUNCTION vramq_job_audit()""",
    """CREATE TRIGGER jobs_audit_update AFTER UPDATE OF status ON jobs
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status) EXECUTE FUNCTION vramq_job_audit()""",
    """CREATE TRIGGER jobs_notify_insert AFTER INSERT ON jobs
    FOR EACH ROW WHEN (NEW.status = 'queued') EXECUTE FUNCTION vramq_job_notify()""",
    """CREATE TRIGGER jobs_notify_update AFTER UPDATE ON jobs
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status
                       OR OLD.progress IS DISTINCT FROM NEW.progress
                       OR (NEW.cancel_requested_at IS NOT NULL AND OLD.cancel_requested_at IS NULL))
    EXECUTE FUNCTION vramq_job_notify()""",
]


def upgrade() -> None:
    for name in OLD_TRIGGERS:
        op.execute(f"DROP TRIGGER IF EXISTS {name} ON jobs")
    op.execute(INSERTED)
    op.execute(UPDATED)
    op.execute(
        """CREATE TRIGGER jobs_inserted AFTER INSERT ON jobs
        REFERENCING NEW TABLE AS new_rows
        FOR EACH STATEMENT EXECUTE FUNCTION vramq_jobs_inserted()"""
    )
    op.execute(
        """CREATE TRIGGER jobs_updated AFTER UPDATE ON jobs
        REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
        FOR EACH STATEMENT EXECUTE FUNCTION vramq_jobs_updated()"""
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER IF EXISTS jobs_updated ON jobs")
    op.execute("DROP TRIGGER IF EXISTS jobs_inserted ON jobs")
    op.execute("DROP FUNCTION IF EXISTS vramq_jobs_updated()")
    op.execute("DROP FUNCTION IF EXISTS vramq_jobs_inserted()")
    for sql in OLD_CREATE:
        op.execute(sql)
