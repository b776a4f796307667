-- enqueue: one job per transaction
INSERT INTO jobs (payload) VALUES ('{"model": "noop"}');
