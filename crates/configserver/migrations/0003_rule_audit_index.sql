CREATE INDEX tern_rule_audit_by_rule ON tern_rule_audit (service, name, revision)
