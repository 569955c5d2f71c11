-- Atelier schema version 2: a job keeps the fair-share weight it was submitted with (from the
-- owner's roles), so jobs restored after a restart compete as they did before it.
ALTER TABLE jobs ADD COLUMN weight REAL NOT NULL DEFAULT 1 CHECK (weight > 0);
