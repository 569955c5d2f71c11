-- Atelier schema version 6.
-- Which LoRAs and embeddings a server may use (its moderators' /addons): a file's own row decides,
-- else the server's '*' row of that kind, else the file is allowed (the default: everything in the
-- folders). Changes are audited (addons.allow, addons.disallow, addons.reset).
CREATE TABLE addon_rules (
    guild_id INTEGER NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('lora', 'embedding')),
    name TEXT NOT NULL,                     -- a file stem, or '*' for every file of the kind
    allowed INTEGER NOT NULL CHECK (allowed IN (0, 1)),
    set_by INTEGER NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (guild_id, kind, name)
);
