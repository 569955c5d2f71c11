-- Atelier schema version 3.
-- A member's refused prompts are audited at most once per rule every few minutes; this finds
-- their last audit row for a rule without reading the guild's whole audit log.
CREATE INDEX audit_refusals ON audit_log (guild_id, actor_id, target, at)
    WHERE action = 'prompt.refused';
