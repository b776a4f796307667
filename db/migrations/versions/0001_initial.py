"""The initial schema: jobs, job_events (audit trigger), schedulers, files, api_keys, NOTIFY triggers.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Frozen copies of the trigger text as of this revision (later revisions replace them, never edit these).
AUDIT_FUNCTION = """
CREATE OR REPLACE FUNCTION vramq_job_audit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO job_events (job_id, from_status, to_status, attempt, lease_owner, gpu, worker, detail)
        VALUES (NEW.id, NULL, NEW.status, NEW.attempts, NEW.lease_owner, NEW.gpu, NEW.worker, NULL);
    ELSE
        INSERT INTO job_events (job_id, from_status, to_status, attempt, lease_owner, gpu, worker, detail)
        VALUES (
            NEW.id, OLD.status, NEW.status, NEW.attempts,
            coalesce(NEW.lease_owner, OLD.lease_owner),
            coalesce(NEW.gpu, OLD.gpu),
            coalesce(NEW.worker, OLD.worker),
            nullif(jsonb_strip_nulls(jsonb_build_object(
                'error', CASE WHEN NEW.error IS DISTINCT FROM OLD.error THEN NEW.error END,
                'run_after', CASE WHEN NEW.status = 'queued' THEN NEW.run_after END,
                'cancel_requested_at', NEW.cancel_requested_at
            )), '{}'::jsonb)
        );
    END IF;
    RETURN NULL;
END
$$;
"""

NOTIFY_FUNCTION = """
CREATE OR REPLACE FUNCTION vramq_job_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND (NEW.status IS DISTINCT FROM OLD.status
                             OR NEW.progress IS DISTINCT FROM OLD.progress) THEN
        PERFORM pg_notify('vramq_jobs', json_build_object(
            'id', NEW.id, 'status', NEW.status, 'progress', NEW.progress)::text);
    END IF;
    IF NEW.status = 'queued' AND (TG_OP = 'INSERT' OR OLD.status IS DISTINCT FROM 'queued') THEN
        PERFORM pg_notify('vramq_jobs_new', coalesce(NEW.model, '*' || NEW.feature));
    END IF;
    IF TG_OP = 'UPDATE' AND NEW.cancel_requested_at IS NOT NULL AND OLD.cancel_requested_at IS NULL
       AND NEW.status IN ('leased', 'running') THEN
        PERFORM pg_notify('vramq_cancel', NEW.id::text);
    END IF;
    RETURN NULL;
END
$$;
"""

TRIGGERS = [
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

TSZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.execute("CREATE SEQUENCE scheduler_term_seq")
    op.create_table(
        "jobs",
        sa.Column("id", pg.UUID(as_uuid=True), primary_key=True, server_default=sa.text("gen_random_uuid()")),
        sa.Column("tenant", sa.Text, nullable=False),
        sa.Column("model", sa.Text, nullable=True),
        sa.Column("feature", sa.Text, nullable=False),
        sa.Column("pool", sa.Text, nullable=True),
        sa.Column("inputs", pg.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("metadata", pg.JSONB, nullable=True),
        sa.Column("priority", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("status", sa.Text, nullable=False, server_default=sa.text("'queued'")),
        sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("max_attempts", sa.Integer, nullable=False, server_default=sa.text("3")),
        sa.Column("run_after", TSZ, nullable=False, server_default=sa.func.now()),
        sa.Column("timeout_s", sa.Float, nullable=True),
        sa.Column("idempotency_key", sa.Text, nullable=True),
        sa.Column("lease_owner", sa.BigInteger, nullable=True),
        sa.Column("lease_expires_at", TSZ, nullable=True),
        sa.Column("gpu", sa.Text, nullable=True),
        sa.Column("worker", sa.Text, nullable=True),
        sa.Column("progress", sa.Float, nullable=False, server_default=sa.text("0")),
        sa.Column("progress_message", sa.Text, nullable=True),
        sa.Column("progress_at", TSZ, nullable=True),
        sa.Column("result", pg.JSONB, nullable=True),
        sa.Column("error", pg.JSONB, nullable=True),
        sa.Column("cancel_requested_at", TSZ, nullable=True),
        sa.Column("created_at", TSZ, nullable=False, server_default=sa.func.now()),
        sa.Column("started_at", TSZ, nullable=True),
        sa.Column("finished_at", TSZ, nullable=True),
        sa.CheckConstraint(
            "status IN ('queued', 'leased', 'running', 'succeeded', 'failed', 'cancelled')",
            name="jobs_status_check",
        ),
        sa.CheckConstraint("attempts >= 0 AND max_attempts >= 1", name="jobs_attempts_check"),
        sa.CheckConstraint("progress >= 0 AND progress <= 1", name="jobs_progress_check"),
        postgresql_with={
            "fillfactor": "70",
            "autovacuum_vacuum_scale_factor": "0.02",
            "autovacuum_analyze_scale_factor": "0.02",
            "autovacuum_vacuum_insert_scale_factor": "0.05",
        },
    )
    op.create_index(
        "jobs_queued_idx",
        "jobs",
        [sa.text("priority DESC"), "created_at"],
        postgresql_where=sa.text("status = 'queued'"),
    )
    op.create_index(
        "jobs_queued_model_idx",
        "jobs",
        ["model", sa.text("priority DESC"), "created_at"],
        postgresql_where=sa.text("status = 'queued'"),
    )
    op.create_index(
        "jobs_queued_feature_idx",
        "jobs",
        ["feature", sa.text("priority DESC"), "created_at"],
        postgresql_where=sa.text("status = 'queued' AND model IS NULL"),
    )
    op.create_index(
        "jobs_active_idx",
        "jobs",
        ["lease_owner"],
        postgresql_where=sa.text("status IN ('leased', 'running')"),
    )
    op.create_index(
        "jobs_idempotency_idx",
        "jobs",
        ["tenant", "idempotency_key"],
        unique=True,
        postgresql_where=sa.text("idempotency_key IS NOT NULL"),
    )
    op.create_index(
        "jobs_tenant_created_idx", "jobs", ["tenant", sa.text("created_at DESC"), sa.text("id DESC")]
    )
    op.create_index(
        "jobs_finished_idx",
        "jobs",
        ["finished_at"],
        postgresql_where=sa.text("status IN ('succeeded', 'failed', 'cancelled')"),
    )

    op.create_table(
        "job_events",
        sa.Column("id", sa.BigInteger, sa.Identity(always=True), primary_key=True),
        sa.Column(
            "job_id", pg.UUID(as_uuid=True), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("at", TSZ, nullable=False, server_default=sa.func.clock_timestamp()),
        sa.Column("from_status", sa.Text, nullable=True),
        sa.Column("to_status", sa.Text, nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("lease_owner", sa.BigInteger, nullable=True),
        sa.Column("gpu", sa.Text, nullable=True),
        sa.Column("worker", sa.Text, nullable=True),
        sa.Column("detail", pg.JSONB, nullable=True),
    )
    op.create_index("job_events_job_idx", "job_events", ["job_id", "id"])
    op.create_index("job_events_at_idx", "job_events", ["at"])

    op.create_table(
        "schedulers",
        sa.Column(
            "term",
            sa.BigInteger,
            primary_key=True,
            server_default=sa.text("nextval('scheduler_term_seq'::regclass)"),
        ),
        sa.Column("pool", sa.Text, nullable=False),
        sa.Column("host", sa.Text, nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("started_at", TSZ, nullable=False, server_default=sa.func.now()),
        sa.Column("heartbeat_at", TSZ, nullable=False, server_default=sa.func.now()),
        sa.Column("ended_at", TSZ, nullable=True),
        sa.Column("snapshot", pg.JSONB, nullable=True),
    )
    op.create_index("schedulers_pool_idx", "schedulers", ["pool", sa.text("term DESC")])

    op.create_table(
        "files",
        sa.Column("id", pg.UUID(as_uuid=True), primary_key=True, server_default=sa.text("gen_random_uuid()")),
        sa.Column("tenant", sa.Text, nullable=False),
        sa.Column(
            "job_id", pg.UUID(as_uuid=True), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=True
        ),
        sa.Column("kind", sa.Text, nullable=False, server_default=sa.text("'input'")),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("sha256", sa.Text, nullable=False),
        sa.Column("content_type", sa.Text, nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("created_at", TSZ, nullable=False, server_default=sa.func.now()),
        sa.CheckConstraint("kind IN ('input', 'output')", name="files_kind_check"),
    )
    op.create_index("files_tenant_idx", "files", ["tenant", sa.text("created_at DESC")])
    op.create_index(
        "files_job_idx",
        "files",
        ["job_id", "name"],
        unique=True,
        postgresql_where=sa.text("kind = 'output'"),
    )

    op.create_table(
        "api_keys",
        sa.Column("id", pg.UUID(as_uuid=True), primary_key=True, server_default=sa.text("gen_random_uuid()")),
        sa.Column("tenant", sa.Text, nullable=False),
        sa.Column("name", sa.Text, nullable=False, server_default=sa.text("''")),
        sa.Column("secret_sha256", sa.Text, nullable=False, unique=True),
        sa.Column("scopes", pg.ARRAY(sa.Text), nullable=False),
        sa.Column("created_at", TSZ, nullable=False, server_default=sa.func.now()),
        sa.Column("revoked_at", TSZ, nullable=True),
    )

    op.execute(AUDIT_FUNCTION)
    op.execute(NOTIFY_FUNCTION)
    for trigger in TRIGGERS:
        op.execute(trigger)


def downgrade() -> None:
    for name in ("jobs_notify_update", "jobs_notify_insert", "jobs_audit_update", "jobs_audit_insert"):
        op.execute(f"DROP TRIGGER IF EXISTS {name} ON jobs")
    op.execute("DROP FUNCTION IF EXISTS vramq_job_notify()")
    op.execute("DROP FUNCTION IF EXISTS vramq_job_audit()")
    op.drop_table("api_keys")
    op.drop_table("files")
    op.drop_table("schedulers")
    op.drop_table("job_events")
    op.drop_table("jobs")
    op.execute("DROP SEQUENCE scheduler_term_seq")
