-- Atelier schema version 4.
-- Every submit counts the member's queued and running jobs in a guild against their limits
-- (storage.jobs.pending, inside the queue's submit lock): this reads those few rows, not the
-- member's whole history.
CREATE INDEX jobs_live_by_owner ON jobs (owner_id, guild_id) WHERE state IN ('queued', 'running');
