-- The current rules: one row per (service, rule name). The body is the
-- rule's JSON; revision is the audit revision of its last change.
CREATE TABLE IF NOT EXISTS tern_rules (
    service VARCHAR(255) NOT NULL,
    name VARCHAR(128) NOT NULL,
    body TEXT NOT NULL,
    revision BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL,
    updated_by VARCHAR(128) NOT NULL,
    PRIMARY KEY (service, name)
)
