-- A session's push tokens in the order they were last registered: when a session is
-- at its limit of devices, the one registered longest ago is found without a sort.
CREATE INDEX push_tokens_by_age ON push_tokens (session, updated_at);
