-- Atelier schema version 2.
-- A job keeps the fair-share weight it was submitted with (from the owner's roles), so jobs
-- restored after a restart compete as they did before it.
ALTER TABLE jobs ADD COLUMN weight REAL NOT NULL DEFAULT 1 CHECK (weight > 0);
-- When the bot told the owner how a finished job ended (result posted, failure or cancellation
-- said); finished jobs without it are told again at start-up, so no result is lost to a crash or
-- a failed upload between finishing and posting. Jobs finished before this version count as told.
ALTER TABLE jobs ADD COLUMN delivered_at REAL;
UPDATE jobs SET delivered_at = finished_at WHERE state IN ('done', 'failed', 'cancelled');
CREATE INDEX jobs_undelivered ON jobs (seq)
    WHERE delivered_at IS NULL AND state IN ('done', 'failed', 'cancelled');
