-- The smallest jobs table that still has what a real queue needs on its hot path:
-- a status, a priority, timestamps, a payload and a partial index over queued rows.
CREATE TABLE jobs (
    id          bigserial PRIMARY KEY,
    status      text        NOT NULL DEFAULT 'queued',
    priority    int         NOT NULL DEFAULT 0,
    payload     jsonb       NOT NULL DEFAULT '{}',
    created_at  timestamptz NOT NULL DEFAULT now(),
    started_at  timestamptz,
    finished_at timestamptz
) WITH (fillfactor = 80);

CREATE INDEX jobs_queued ON jobs (priority DESC, created_at) WHERE status = 'queued';
