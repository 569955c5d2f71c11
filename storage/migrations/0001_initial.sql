-- Atelier schema version 1. Times are Unix seconds (REAL); Discord ids are INTEGER snowflakes.
-- Job ids are 12 lowercase base32 characters ([a-z2-7]{12}); button custom ids carry them, so
-- their format is part of this schema and never changes without a migration.

CREATE TABLE jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- submission order, never reused
    id TEXT NOT NULL UNIQUE,
    request TEXT NOT NULL,                  -- GenerationRequest JSON
    owner_id INTEGER NOT NULL,
    guild_id INTEGER,                       -- NULL in direct messages
    channel_id INTEGER NOT NULL,
    interaction_id INTEGER,
    interaction_token TEXT,
    token_expires_at REAL,
    message_id INTEGER,                     -- the message that shows the result
    state TEXT NOT NULL DEFAULT 'queued'
        CHECK (state IN ('queued', 'running', 'done', 'failed', 'cancelled')),
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    cost REAL NOT NULL CHECK (cost >= 0),
    device TEXT,
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    parent_job_id TEXT REFERENCES jobs (id),
    parent_index INTEGER,
    CHECK ((parent_job_id IS NULL) = (parent_index IS NULL))
);
CREATE INDEX jobs_by_owner ON jobs (owner_id, seq);
CREATE INDEX jobs_by_state ON jobs (state, seq);
CREATE INDEX jobs_by_parent ON jobs (parent_job_id) WHERE parent_job_id IS NOT NULL;

CREATE TABLE images (
    id INTEGER PRIMARY KEY,
    job_id TEXT NOT NULL REFERENCES jobs (id),
    idx INTEGER NOT NULL CHECK (idx >= 0),
    seed INTEGER NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    path TEXT NOT NULL,                     -- relative to the image folder; shared by equal images
    bytes INTEGER NOT NULL,
    created_at REAL NOT NULL,
    status TEXT NOT NULL DEFAULT 'ok' CHECK (status IN ('ok', 'missing', 'expired')),
    UNIQUE (job_id, idx)
);
CREATE INDEX images_by_path ON images (path);
CREATE INDEX images_ok_by_created ON images (created_at) WHERE status = 'ok';

-- Uploaded init images and masks, stored by content hash.
CREATE TABLE inputs (
    sha256 TEXT PRIMARY KEY,
    path TEXT NOT NULL UNIQUE,
    bytes INTEGER NOT NULL,
    created_at REAL NOT NULL,
    last_used_at REAL NOT NULL
);

-- One row per finished job: what it cost its owner in that guild.
CREATE TABLE usage (
    id INTEGER PRIMARY KEY,
    guild_id INTEGER,                       -- NULL in direct messages
    user_id INTEGER NOT NULL,
    job_id TEXT REFERENCES jobs (id),
    at REAL NOT NULL,
    cost REAL NOT NULL,
    images INTEGER NOT NULL
);
CREATE INDEX usage_by_user ON usage (user_id, guild_id, at);

CREATE TABLE guild_settings (
    guild_id INTEGER NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,                    -- JSON
    PRIMARY KEY (guild_id, key)
);

-- Moderator overrides of LimitsSettings fields; `limits_json` holds only the overridden fields.
CREATE TABLE limits (
    guild_id INTEGER NOT NULL,
    scope TEXT NOT NULL CHECK (scope IN ('guild', 'role', 'user')),
    target_id INTEGER NOT NULL,             -- the guild, role or user id
    limits_json TEXT NOT NULL,
    PRIMARY KEY (guild_id, scope, target_id)
);

CREATE TABLE bans (
    guild_id INTEGER NOT NULL,
    user_id INTEGER NOT NULL,
    reason TEXT NOT NULL,
    banned_by INTEGER NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (guild_id, user_id)
);

CREATE TABLE blocked_words (
    guild_id INTEGER NOT NULL,
    pattern TEXT NOT NULL,
    is_regex INTEGER NOT NULL CHECK (is_regex IN (0, 1)),
    added_by INTEGER NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (guild_id, pattern, is_regex)
);

CREATE TABLE audit_log (
    id INTEGER PRIMARY KEY,
    guild_id INTEGER NOT NULL,
    actor_id INTEGER NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    before_json TEXT,                       -- NULL when the thing did not exist before
    after_json TEXT,                        -- NULL when it no longer exists
    at REAL NOT NULL
);
CREATE INDEX audit_by_guild ON audit_log (guild_id, id);
