"""The schema as SQLAlchemy Core metadata: the single source alembic migrations are compared against.

Triggers and functions (the audit trail in ``job_events`` and the NOTIFY channels) live in the
migrations as SQL, frozen per revision.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Identity,
    Index,
    Integer,
    MetaData,
    Sequence,
    Table,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID

metadata = MetaData()

STATUSES = ("queued", "leased", "running", "succeeded", "failed", "cancelled")
_status_check = "status IN (" + ", ".join(f"'{s}'" for s in STATUSES) + ")"

term_seq = Sequence("scheduler_term_seq", metadata=metadata)

jobs = Table(
    "jobs",
    metadata,
    Column("id", UUID(as_uuid=True), primary_key=True, server_default=text("gen_random_uuid()")),
    Column("tenant", Text, nullable=False),
    Column("model", Text, nullable=True),
    Column("feature", Text, nullable=False),
    Column("pool", Text, nullable=True),
    Column("inputs", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("metadata", JSONB, nullable=True),
    Column("priority", Integer, nullable=False, server_default=text("0")),
    Column("status", Text, nullable=False, server_default=text("'queued'")),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("max_attempts", Integer, nullable=False, server_default=text("3")),
    Column("run_after", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("timeout_s", Float, nullable=True),
    Column("idempotency_key", Text, nullable=True),
    Column("lease_owner", BigInteger, nullable=True),
    Column("lease_expires_at", DateTime(timezone=True), nullable=True),
    Column("gpu", Text, nullable=True),
    Column("worker", Text, nullable=True),
    Column("progress", Float, nullable=False, server_default=text("0")),
    Column("progress_message", Text, nullable=True),
    Column("progress_at", DateTime(timezone=True), nullable=True),
    Column("result", JSONB, nullable=True),
    Column("error", JSONB, nullable=True),
    Column("cancel_requested_at", DateTime(timezone=True), nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("started_at", DateTime(timezone=True), nullable=True),
    Column("finished_at", DateTime(timezone=True), nullable=True),
    CheckConstraint(_status_check, name="jobs_status_check"),
    CheckConstraint("attempts >= 0 AND max_attempts >= 1", name="jobs_attempts_check"),
    CheckConstraint("progress >= 0 AND progress <= 1", name="jobs_progress_check"),
    # The claim path: the leader scans queued rows of one model in priority order.
    Index(
        "jobs_queued_idx",
        text("priority DESC"),
        "created_at",
        postgresql_where=text("status = 'queued'"),
    ),
    Index(
        "jobs_queued_model_idx",
        "model",
        text("priority DESC"),
        "created_at",
        postgresql_where=text("status = 'queued'"),
    ),
    # Jobs that name only a feature (any model serving it may run them).
    Index(
        "jobs_queued_feature_idx",
        "feature",
        text("priority DESC"),
        "created_at",
        postgresql_where=text("status = 'queued' AND model IS NULL"),
    ),
    # Rescue and lease extension look at the few rows that are leased or running.
    Index(
        "jobs_active_idx",
        "lease_owner",
        postgresql_where=text("status IN ('leased', 'running')"),
    ),
    Index(
        "jobs_idempotency_idx",
        "tenant",
        "idempotency_key",
        unique=True,
        postgresql_where=text("idempotency_key IS NOT NULL"),
    ),
    # Listing a tenant's jobs newest first with keyset pagination.
    Index("jobs_tenant_created_idx", "tenant", text("created_at DESC"), text("id DESC")),
    # Pruning finished jobs past the retention.
    Index(
        "jobs_finished_idx",
        "finished_at",
        postgresql_where=text("status IN ('succeeded', 'failed', 'cancelled')"),
    ),
    # A high-churn table: leave room for HOT updates and vacuum early.
    postgresql_with={
        "fillfactor": "70",
        "autovacuum_vacuum_scale_factor": "0.02",
        "autovacuum_analyze_scale_factor": "0.02",
        "autovacuum_vacuum_insert_scale_factor": "0.05",
    },
)

job_events = Table(
    "job_events",
    metadata,
    Column("id", BigInteger, Identity(always=True), primary_key=True),
    Column("job_id", UUID(as_uuid=True), ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
    Column("at", DateTime(timezone=True), nullable=False, server_default=func.clock_timestamp()),
    Column("from_status", Text, nullable=True),
    Column("to_status", Text, nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("lease_owner", BigInteger, nullable=True),
    Column("gpu", Text, nullable=True),
    Column("worker", Text, nullable=True),
    Column("detail", JSONB, nullable=True),
    Index("job_events_job_idx", "job_id", "id"),
    Index("job_events_at_idx", "at"),
)

schedulers = Table(
    "schedulers",
    metadata,
    Column("term", BigInteger, term_seq, primary_key=True, server_default=term_seq.next_value()),
    Column("pool", Text, nullable=False),
    Column("host", Text, nullable=False),
    Column("pid", Integer, nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("heartbeat_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("ended_at", DateTime(timezone=True), nullable=True),
    Column("snapshot", JSONB, nullable=True),
    Index("schedulers_pool_idx", "pool", text("term DESC")),
)

files = Table(
    "files",
    metadata,
    Column("id", UUID(as_uuid=True), primary_key=True, server_default=text("gen_random_uuid()")),
    Column("tenant", Text, nullable=False),
    Column("job_id", UUID(as_uuid=True), ForeignKey("jobs.id", ondelete="CASCADE"), nullable=True),
    Column("kind", Text, nullable=False, server_default=text("'input'")),
    Column("name", Text, nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("sha256", Text, nullable=False),
    Column("content_type", Text, nullable=False),
    Column("path", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    CheckConstraint("kind IN ('input', 'output')", name="files_kind_check"),
    Index("files_tenant_idx", "tenant", text("created_at DESC")),
    Index("files_job_idx", "job_id", "name", unique=True, postgresql_where=text("kind = 'output'")),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", UUID(as_uuid=True), primary_key=True, server_default=text("gen_random_uuid()")),
    Column("tenant", Text, nullable=False),
    Column("name", Text, nullable=False, server_default=text("''")),
    Column("secret_sha256", Text, nullable=False, unique=True),
    Column("scopes", ARRAY(Text), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("revoked_at", DateTime(timezone=True), nullable=True),
)
