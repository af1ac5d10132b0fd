-- Every change, numbered: the revision is the primary key, so two servers
-- sharing the store that race for the same number make one of them retry.
CREATE TABLE IF NOT EXISTS tern_rule_audit (
    revision BIGINT NOT NULL PRIMARY KEY,
    service VARCHAR(255) NOT NULL,
    name VARCHAR(128) NOT NULL,
    actor VARCHAR(128) NOT NULL,
    at_ms BIGINT NOT NULL,
    before_body TEXT,
    after_body TEXT
)
