-- Node tokens: a token bound to the one device it admits (Part B §3's
-- scoped token; a connection with it and another key closes with 4008).
ALTER TABLE operator_tokens ADD COLUMN device_id TEXT;
ALTER TABLE operator_tokens DROP CONSTRAINT operator_tokens_role_check;
ALTER TABLE operator_tokens ADD CONSTRAINT operator_tokens_role_check
    CHECK (role IN ('admin', 'client', 'node'));
ALTER TABLE operator_tokens ADD CONSTRAINT operator_tokens_node_device
    CHECK ((role = 'node') = (device_id IS NOT NULL));
