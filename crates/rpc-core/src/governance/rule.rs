//! The rule kinds, their JSON form and their validation.
//!
//! A rule is a JSON object with a `kind` and the fields of that kind, e.g.
//!
//! ```json
//! {"kind": "access", "deny_apps": ["batch"], "allow_ips": ["10.0.0.0/8"]}
//! {"kind": "qps_limit", "method": "SayHello", "qps": 100}
//! ```
//!
//! Every kind but `zone_affinity` and `weight` may be narrowed to one method
//! with `"method"`. Unknown kinds and unknown fields are refused.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// One governance rule of a service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Rule {
    /// Who may call: enforced by providers.
    Access(AccessRule),
    /// A service token: providers refuse calls without it; the ConfigServer
    /// hands it only to consumers the access rules allow.
    Token(TokenRule),
    /// Weight overrides for named provider addresses.
    Weight(WeightRule),
    /// Calls per second one provider instance takes (token bucket).
    QpsLimit(QpsLimitRule),
    /// Prefer providers in the consumer's zone while enough of them are healthy.
    ZoneAffinity(ZoneAffinityRule),
    /// Consumers matching `when` call only providers matching `then`.
    Route(RouteRule),
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// If not empty, only these consumer apps may call.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_apps: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny_apps: Vec<String>,
    /// IPs or CIDRs; if not empty, only callers from these may call.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_ips: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny_ips: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// The token; the ConfigServer makes a random one when it is left out.
    /// Consumers the access rules refuse are sent the rule without it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub token: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightRule {
    pub overrides: Vec<WeightOverride>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightOverride {
    /// `ip:port` of one instance, or `ip` for every instance on that host.
    pub address: String,
    /// Signed so that a negative value is refused by name, not by a parse error.
    pub weight: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QpsLimitRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Calls per second per provider instance.
    pub qps: i64,
    /// Calls that may arrive at once after a quiet spell [default: qps / 10, at least 1].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZoneAffinityRule {
    /// In-zone providers are used while at least this share of them is
    /// healthy (not set aside after failures) [default: 0.5].
    #[serde(default = "default_min_healthy_share")]
    pub min_healthy_share: f64,
}

fn default_min_healthy_share() -> f64 {
    0.5
}

impl Default for ZoneAffinityRule {
    fn default() -> ZoneAffinityRule {
        ZoneAffinityRule {
            min_healthy_share: default_min_healthy_share(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    pub when: ConsumerMatch,
    /// Provider labels (instance metadata) the chosen providers must all carry.
    pub then: BTreeMap<String, String>,
    /// With `force`, consumers matching `when` get no provider rather than
    /// all of them when none matches `then`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub force: bool,
}

/// Which consumers a route applies to: all conditions must hold.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumerMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

impl ConsumerMatch {
    pub fn matches(&self, app: &str, labels: &std::collections::HashMap<String, String>) -> bool {
        self.app.as_deref().is_none_or(|a| a == app) && self.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

/// A refused rule: the field and the value at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct InvalidRule {
    /// Path of the field, e.g. `overrides[1].weight`.
    pub field: String,
    pub reason: String,
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> InvalidRule {
    InvalidRule {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Longest app name, label, token or address accepted in a rule.
const MAX_TEXT: usize = 256;
/// Most entries in one list of a rule.
const MAX_ENTRIES: usize = 1024;

impl Rule {
    /// Parses and validates a rule from its JSON text.
    ///
    /// # Errors
    ///
    /// Malformed JSON, an unknown kind or field (named by the parser), or a
    /// value [`Rule::validate`] refuses.
    pub fn from_json(text: &str) -> Result<Rule, InvalidRule> {
        let rule: Rule = serde_json::from_str(text).map_err(|e| invalid("rule", format!("malformed: {e}")))?;
        rule.validate()?;
        Ok(rule)
    }

    /// The method this rule is narrowed to, if any.
    pub fn method(&self) -> Option<&str> {
        match self {
            Rule::Access(r) => r.method.as_deref(),
            Rule::Token(r) => r.method.as_deref(),
            Rule::QpsLimit(r) => r.method.as_deref(),
            Rule::Route(r) => r.method.as_deref(),
            Rule::Weight(_) | Rule::ZoneAffinity(_) => None,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Rule::Access(_) => "access",
            Rule::Token(_) => "token",
            Rule::Weight(_) => "weight",
            Rule::QpsLimit(_) => "qps_limit",
            Rule::ZoneAffinity(_) => "zone_affinity",
            Rule::Route(_) => "route",
        }
    }

    /// Checks every field; the error names the first bad one and its value.
    ///
    /// # Errors
    ///
    /// See [`InvalidRule`].
    pub fn validate(&self) -> Result<(), InvalidRule> {
        if let Some(method) = self.method() {
            check_name("method", method)?;
        }
        match self {
            Rule::Access(r) => {
                for (field, list) in [("allow_apps", &r.allow_apps), ("deny_apps", &r.deny_apps)] {
                    check_list(field, list, check_name)?;
                }
                for (field, list) in [("allow_ips", &r.allow_ips), ("deny_ips", &r.deny_ips)] {
                    check_list(field, list, |f, v| {
                        parse_net(v).map(drop).map_err(|reason| invalid(f, reason))
                    })?;
                }
                if r.allow_apps.is_empty() && r.deny_apps.is_empty() && r.allow_ips.is_empty() && r.deny_ips.is_empty()
                {
                    return Err(invalid(
                        "allow_apps",
                        "an access rule needs at least one app or IP list",
                    ));
                }
            }
            Rule::Token(r) => {
                if !r.token.is_empty() && (r.token.len() < 8 || r.token.len() > MAX_TEXT) {
                    return Err(invalid(
                        "token",
                        format!("must be 8 to {MAX_TEXT} bytes, not {}", r.token.len()),
                    ));
                }
                if r.token.chars().any(|c| c.is_whitespace() || c.is_control()) {
                    return Err(invalid("token", "must not contain spaces or control characters"));
                }
            }
            Rule::Weight(r) => {
                if r.overrides.is_empty() {
                    return Err(invalid("overrides", "is empty"));
                }
                check_len("overrides", r.overrides.len())?;
                for (i, o) in r.overrides.iter().enumerate() {
                    if o.address.parse::<SocketAddr>().is_err() && o.address.parse::<IpAddr>().is_err() {
                        return Err(invalid(
                            format!("overrides[{i}].address"),
                            format!("{:?} is neither ip:port nor an IP address", o.address),
                        ));
                    }
                    if !(0..=1_000_000).contains(&o.weight) {
                        return Err(invalid(
                            format!("overrides[{i}].weight"),
                            format!("{} is outside 0..=1000000", o.weight),
                        ));
                    }
                }
            }
            Rule::QpsLimit(r) => {
                if !(1..=10_000_000).contains(&r.qps) {
                    return Err(invalid("qps", format!("{} is outside 1..=10000000", r.qps)));
                }
                if let Some(burst) = r.burst
                    && !(1..=10_000_000).contains(&burst)
                {
                    return Err(invalid("burst", format!("{burst} is outside 1..=10000000")));
                }
            }
            Rule::ZoneAffinity(r) => {
                if !(r.min_healthy_share > 0.0 && r.min_healthy_share <= 1.0) {
                    return Err(invalid(
                        "min_healthy_share",
                        format!("{} is outside (0, 1]", r.min_healthy_share),
                    ));
                }
            }
            Rule::Route(r) => {
                if r.when.app.is_none() && r.when.labels.is_empty() {
                    return Err(invalid(
                        "when",
                        "is empty: a route must say which consumers it applies to",
                    ));
                }
                if let Some(app) = &r.when.app {
                    check_name("when.app", app)?;
                }
                if r.then.is_empty() {
                    return Err(invalid("then", "is empty: a route must say which providers it selects"));
                }
                for (k, v) in r.when.labels.iter().chain(&r.then) {
                    check_name("labels", k)?;
                    check_text("labels", v)?;
                }
            }
        }
        Ok(())
    }
}

fn check_len(field: &str, len: usize) -> Result<(), InvalidRule> {
    if len > MAX_ENTRIES {
        return Err(invalid(field, format!("has {len} entries, more than {MAX_ENTRIES}")));
    }
    Ok(())
}

fn check_list(
    field: &str,
    list: &[String],
    check: impl Fn(&str, &str) -> Result<(), InvalidRule>,
) -> Result<(), InvalidRule> {
    check_len(field, list.len())?;
    list.iter()
        .enumerate()
        .try_for_each(|(i, value)| check(&format!("{field}[{i}]"), value))
}

fn check_text(field: &str, value: &str) -> Result<(), InvalidRule> {
    if value.len() > MAX_TEXT {
        return Err(invalid(
            field,
            format!("{value:.32?}... is longer than {MAX_TEXT} bytes"),
        ));
    }
    Ok(())
}

fn check_name(field: &str, value: &str) -> Result<(), InvalidRule> {
    check_text(field, value)?;
    if value.is_empty() || value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid(field, format!("{value:?} is empty or has spaces")));
    }
    Ok(())
}

/// An IP address (as a one-address network) or a CIDR.
pub(crate) fn parse_net(value: &str) -> Result<IpNet, String> {
    value
        .parse::<IpNet>()
        .or_else(|_| value.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| format!("{value:?} is not an IP address or CIDR"))
}

/// The rules of one service at one revision, as pushed to nodes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RuleSet {
    pub revision: u64,
    /// By rule name.
    pub rules: BTreeMap<String, Rule>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(json: &str) -> InvalidRule {
        Rule::from_json(json).expect_err(json)
    }

    #[test]
    fn every_kind_round_trips_through_json() {
        let rules = [
            r#"{"kind":"access","method":"SayHello","deny_apps":["batch"],"allow_ips":["10.0.0.0/8","127.0.0.1"]}"#,
            r#"{"kind":"token","token":"0123456789abcdef"}"#,
            r#"{"kind":"weight","overrides":[{"address":"127.0.0.1:9000","weight":300},{"address":"10.1.2.3","weight":0}]}"#,
            r#"{"kind":"qps_limit","qps":100,"burst":5}"#,
            r#"{"kind":"zone_affinity","min_healthy_share":0.3}"#,
            r#"{"kind":"route","when":{"app":"web","labels":{"env":"gray"}},"then":{"env":"gray"},"force":true}"#,
        ];
        for json in rules {
            let rule = Rule::from_json(json).unwrap_or_else(|e| panic!("{json}: {e}"));
            assert_eq!(serde_json::to_string(&rule).unwrap(), json);
        }
    }

    #[test]
    fn bad_rules_name_the_field_and_value() {
        let cases = [
            (r#"{"kind":"firewall"}"#, "rule", "firewall"),
            (
                r#"{"kind":"access","deny_ips":["10.0.0/8"]}"#,
                "deny_ips[0]",
                "10.0.0/8",
            ),
            (
                r#"{"kind":"weight","overrides":[{"address":"127.0.0.1:1","weight":-5}]}"#,
                "overrides[0].weight",
                "-5",
            ),
            (
                r#"{"kind":"weight","overrides":[{"address":"host:1","weight":5}]}"#,
                "overrides[0].address",
                "host:1",
            ),
            (r#"{"kind":"qps_limit","qps":0}"#, "qps", "0"),
            (r#"{"kind":"qps_limit","qps":10,"rate":3}"#, "rule", "rate"),
            (
                r#"{"kind":"zone_affinity","min_healthy_share":1.5}"#,
                "min_healthy_share",
                "1.5",
            ),
            (r#"{"kind":"route","when":{},"then":{"env":"gray"}}"#, "when", "empty"),
            (r#"{"kind":"route","when":{"app":"web"},"then":{}}"#, "then", "empty"),
            (r#"{"kind":"access"}"#, "allow_apps", "at least one"),
            (r#"{"kind":"token","token":"short"}"#, "token", "5"),
            (r#"{"kind":"access","deny_apps":["a"]"#, "rule", "malformed"),
        ];
        for (json, field, value) in cases {
            let err = refused(json);
            assert_eq!(err.field, field, "{json}: {err}");
            assert!(err.to_string().contains(value), "{json}: {err} should name {value}");
        }
    }
}
