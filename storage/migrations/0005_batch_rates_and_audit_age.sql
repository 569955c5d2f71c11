-- Atelier schema version 5.
-- The runner's measured speed per model, size and batch image count (a moving average of cost
-- units per second), so queue ETAs include the speed-up of batching and survive a restart.
CREATE TABLE batch_rates (
    model TEXT NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    images INTEGER NOT NULL,
    rate REAL NOT NULL,                     -- cost units per second
    updated_at REAL NOT NULL,
    PRIMARY KEY (model, width, height, images)
);
-- Retention deletes audit rows by age.
CREATE INDEX audit_by_age ON audit_log (at);
