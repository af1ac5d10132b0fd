//! Governance rules, and how the nodes enforce them.
//!
//! The ConfigServer stores [`Rule`]s per service and pushes each node the
//! [`RuleSet`] of every service it provides or consumes. Providers enforce
//! access, tokens and QPS limits ([`ProviderPolicy`]); consumers apply
//! weights and routes and attach their app name and token
//! ([`ConsumerPolicy`]). Nodes keep the last rule set while the ConfigServer
//! is away.

mod rule;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::Instant;

use ipnet::IpNet;

pub use rule::{
    AccessRule, ConsumerMatch, InvalidRule, QpsLimitRule, RouteRule, Rule, RuleSet, TokenRule, WeightOverride,
    WeightRule, ZoneAffinityRule,
};

use crate::{Code, Status};

/// Attachment carrying the calling app's name.
pub const ATTACH_APP: &str = "tern.app";
/// Attachment carrying the service token.
pub const ATTACH_TOKEN: &str = "tern.token";

/// An access rule with its networks parsed.
#[derive(Debug)]
struct Access {
    name: String,
    method: Option<String>,
    allow_apps: Vec<String>,
    deny_apps: Vec<String>,
    allow_ips: Vec<IpNet>,
    deny_ips: Vec<IpNet>,
}

impl Access {
    fn compile(name: &str, rule: &AccessRule) -> Access {
        // Validated when stored; a bad entry that slipped through matches nothing.
        let nets = |list: &[String]| list.iter().filter_map(|v| rule::parse_net(v).ok()).collect();
        Access {
            name: name.to_owned(),
            method: rule.method.clone(),
            allow_apps: rule.allow_apps.clone(),
            deny_apps: rule.deny_apps.clone(),
            allow_ips: nets(&rule.allow_ips),
            deny_ips: nets(&rule.deny_ips),
        }
    }

    /// Why `app` at `ip` may not call, if it may not.
    fn refusal(&self, app: &str, ip: Option<IpAddr>) -> Option<String> {
        let name = &self.name;
        let in_nets = |nets: &[IpNet]| ip.is_some_and(|ip| nets.iter().any(|n| n.contains(&ip)));
        if self.deny_apps.iter().any(|a| a == app) {
            return Some(format!("app {app:?} is denied by rule {name:?}"));
        }
        if in_nets(&self.deny_ips) {
            return Some(format!("address {} is denied by rule {name:?}", display_ip(ip)));
        }
        if !self.allow_apps.is_empty() && !self.allow_apps.iter().any(|a| a == app) {
            return Some(format!("app {app:?} is not allowed by rule {name:?}"));
        }
        if !self.allow_ips.is_empty() && !in_nets(&self.allow_ips) {
            return Some(format!("address {} is not allowed by rule {name:?}", display_ip(ip)));
        }
        None
    }
}

fn display_ip(ip: Option<IpAddr>) -> String {
    ip.map_or_else(|| "unknown".to_owned(), |ip| ip.to_string())
}

fn applies(method: &Option<String>, called: &str) -> bool {
    method.as_deref().is_none_or(|m| m == called)
}

impl RuleSet {
    /// The rule set as a consumer `app` at `ip` may see it: service tokens
    /// are left out unless the service-wide access rules let it call.
    pub fn redacted_for(&self, app: &str, ip: Option<IpAddr>) -> RuleSet {
        let denied = self.rules.iter().any(|(name, rule)| match rule {
            Rule::Access(access) if access.method.is_none() => Access::compile(name, access).refusal(app, ip).is_some(),
            _ => false,
        });
        let mut set = self.clone();
        if denied {
            for rule in set.rules.values_mut() {
                if let Rule::Token(token) = rule {
                    token.token.clear();
                }
            }
        }
        set
    }
}

// === provider side ===

/// A token bucket: `rate` tokens per second, at most `burst` saved up.
#[derive(Debug)]
struct Bucket {
    name: String,
    method: Option<String>,
    rate: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl Bucket {
    fn take(&self, now: Instant) -> bool {
        let mut state = self.state.lock().expect("bucket lock");
        let (tokens, last) = &mut *state;
        *tokens = (*tokens + now.saturating_duration_since(*last).as_secs_f64() * self.rate).min(self.burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// What a provider checks before it runs a call of one service.
#[derive(Debug, Default)]
pub struct ProviderPolicy {
    revision: u64,
    access: Vec<Access>,
    /// (method, token)
    tokens: Vec<(Option<String>, String)>,
    limits: Vec<Bucket>,
}

impl ProviderPolicy {
    /// Compiles `set`. QPS buckets of rules that did not change keep their
    /// state from `previous`, so a rule push does not refill them.
    pub fn new(set: &RuleSet, previous: Option<&ProviderPolicy>) -> ProviderPolicy {
        let mut policy = ProviderPolicy {
            revision: set.revision,
            ..ProviderPolicy::default()
        };
        let now = Instant::now();
        for (name, rule) in &set.rules {
            match rule {
                Rule::Access(access) => policy.access.push(Access::compile(name, access)),
                Rule::Token(token) => policy.tokens.push((token.method.clone(), token.token.clone())),
                Rule::QpsLimit(limit) => {
                    let rate = limit.qps as f64;
                    let burst = limit.burst.map_or((rate / 10.0).max(1.0), |b| b as f64);
                    let kept = previous
                        .and_then(|p| p.limits.iter().find(|b| b.name == *name))
                        .filter(|b| b.rate == rate && b.burst == burst && b.method == limit.method)
                        .map(|b| *b.state.lock().expect("bucket lock"));
                    policy.limits.push(Bucket {
                        name: name.clone(),
                        method: limit.method.clone(),
                        rate,
                        burst,
                        state: Mutex::new(kept.unwrap_or((burst, now))),
                    });
                }
                Rule::Weight(_) | Rule::ZoneAffinity(_) | Rule::Route(_) => {}
            }
        }
        policy
    }

    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// Whether a call of `method` from `peer` with `attachments` may run:
    /// access first ([`Code::Forbidden`]), then the token
    /// ([`Code::Unauthenticated`]), then QPS limits ([`Code::RateLimited`]).
    ///
    /// # Errors
    ///
    /// The refusal, naming the rule.
    pub fn admit(
        &self,
        method: &str,
        peer: Option<SocketAddr>,
        attachments: &HashMap<String, String>,
    ) -> Result<(), Status> {
        let app = attachments.get(ATTACH_APP).map_or("", String::as_str);
        let ip = peer.map(|p| p.ip().to_canonical());
        for access in self.access.iter().filter(|a| applies(&a.method, method)) {
            if let Some(why) = access.refusal(app, ip) {
                return Err(Status::new(Code::Forbidden, why));
            }
        }
        for (_, token) in self.tokens.iter().filter(|(m, _)| applies(m, method)) {
            let given = attachments.get(ATTACH_TOKEN).map_or("", String::as_str);
            if !constant_time_eq(given.as_bytes(), token.as_bytes()) {
                let why = if given.is_empty() {
                    "no service token"
                } else {
                    "wrong service token"
                };
                return Err(Status::new(Code::Unauthenticated, format!("{why} for {method}")));
            }
        }
        if !self.limits.is_empty() {
            let now = Instant::now();
            for bucket in self.limits.iter().filter(|b| applies(&b.method, method)) {
                if !bucket.take(now) {
                    return Err(Status::new(
                        Code::RateLimited,
                        format!("over {} calls/s (rule {:?})", bucket.rate, bucket.name),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Compares secrets without stopping at the first difference.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

// === consumer side ===

/// Who a consumer is, for routes and zone affinity.
#[derive(Debug, Clone, Default)]
pub struct ConsumerIdentity {
    pub app: String,
    pub zone: String,
    pub labels: HashMap<String, String>,
}

/// A route that applies to this consumer.
#[derive(Debug, Clone)]
pub struct Route {
    pub method: Option<String>,
    pub then: Vec<(String, String)>,
    pub force: bool,
}

impl Route {
    pub fn applies_to(&self, method: &str) -> bool {
        applies(&self.method, method)
    }

    /// Whether a provider with `metadata` is one the route selects.
    pub fn selects(&self, metadata: &HashMap<String, String>) -> bool {
        self.then.iter().all(|(k, v)| metadata.get(k) == Some(v))
    }
}

/// What a consumer applies to calls of one service.
#[derive(Debug, Clone, Default)]
pub struct ConsumerPolicy {
    pub revision: u64,
    /// `ip:port` or `ip` -> weight.
    pub weights: HashMap<String, u32>,
    /// Routes whose `when` matches this consumer.
    pub routes: Vec<Route>,
    /// `min_healthy_share` of a zone affinity rule.
    pub zone_affinity: Option<f64>,
    /// (method, token)
    pub tokens: Vec<(Option<String>, String)>,
}

impl ConsumerPolicy {
    pub fn new(set: &RuleSet, me: &ConsumerIdentity) -> ConsumerPolicy {
        let mut policy = ConsumerPolicy {
            revision: set.revision,
            ..ConsumerPolicy::default()
        };
        for rule in set.rules.values() {
            match rule {
                Rule::Weight(w) => {
                    for o in &w.overrides {
                        policy
                            .weights
                            .insert(o.address.clone(), u32::try_from(o.weight).unwrap_or(0));
                    }
                }
                Rule::Route(r) if r.when.matches(&me.app, &me.labels) => policy.routes.push(Route {
                    method: r.method.clone(),
                    then: r.then.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                    force: r.force,
                }),
                Rule::ZoneAffinity(z) => policy.zone_affinity = Some(z.min_healthy_share),
                Rule::Token(t) if !t.token.is_empty() => policy.tokens.push((t.method.clone(), t.token.clone())),
                _ => {}
            }
        }
        policy
    }

    /// The weight override of the provider at `addr`, if any: by `ip:port`,
    /// then by `ip`.
    pub fn weight_of(&self, addr: SocketAddr) -> Option<u32> {
        if self.weights.is_empty() {
            return None;
        }
        self.weights
            .get(&addr.to_string())
            .or_else(|| self.weights.get(&addr.ip().to_string()))
            .copied()
    }

    /// The token to attach to calls of `method`: a method's own, else the service's.
    pub fn token_for(&self, method: &str) -> Option<&str> {
        let own = self.tokens.iter().find(|(m, _)| m.as_deref() == Some(method));
        own.or_else(|| self.tokens.iter().find(|(m, _)| m.is_none()))
            .map(|(_, t)| t.as_str())
    }

    /// Whether any route or zone preference narrows the providers of `method`.
    pub fn narrows(&self, method: &str) -> bool {
        self.zone_affinity.is_some() || self.routes.iter().any(|r| applies(&r.method, method))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(rules: &[(&str, &str)]) -> RuleSet {
        RuleSet {
            revision: 1,
            rules: rules
                .iter()
                .map(|(name, json)| (name.to_string(), Rule::from_json(json).unwrap()))
                .collect(),
        }
    }

    fn attach(app: &str, token: Option<&str>) -> HashMap<String, String> {
        let mut map = HashMap::from([(ATTACH_APP.to_owned(), app.to_owned())]);
        if let Some(token) = token {
            map.insert(ATTACH_TOKEN.to_owned(), token.to_owned());
        }
        map
    }

    fn peer(ip: &str) -> Option<SocketAddr> {
        Some(SocketAddr::new(ip.parse().unwrap(), 4000))
    }

    #[test]
    fn access_rules_refuse_with_forbidden_naming_the_rule() {
        let policy = ProviderPolicy::new(
            &set(&[
                ("no-batch", r#"{"kind":"access","deny_apps":["batch"]}"#),
                (
                    "lan",
                    r#"{"kind":"access","method":"Admin","allow_ips":["10.0.0.0/8"]}"#,
                ),
            ]),
            None,
        );
        let err = policy
            .admit("SayHello", peer("127.0.0.1"), &attach("batch", None))
            .unwrap_err();
        assert_eq!(err.code(), Code::Forbidden);
        assert!(err.message().contains("no-batch"), "{err}");
        policy
            .admit("SayHello", peer("127.0.0.1"), &attach("web", None))
            .unwrap();
        let err = policy
            .admit("Admin", peer("127.0.0.1"), &attach("web", None))
            .unwrap_err();
        assert!(err.message().contains("127.0.0.1"), "{err}");
        policy.admit("Admin", peer("10.2.3.4"), &attach("web", None)).unwrap();
    }

    #[test]
    fn token_rule_refuses_missing_or_wrong_tokens() {
        let policy = ProviderPolicy::new(&set(&[("t", r#"{"kind":"token","token":"s3cret-token"}"#)]), None);
        let missing = policy.admit("M", None, &attach("web", None)).unwrap_err();
        assert_eq!(missing.code(), Code::Unauthenticated);
        let wrong = policy
            .admit("M", None, &attach("web", Some("s3cret-tokem")))
            .unwrap_err();
        assert!(wrong.message().contains("wrong"), "{wrong}");
        policy.admit("M", None, &attach("web", Some("s3cret-token"))).unwrap();
    }

    #[test]
    fn denied_consumers_are_not_sent_the_token() {
        let rules = set(&[
            ("t", r#"{"kind":"token","token":"s3cret-token"}"#),
            ("a", r#"{"kind":"access","allow_apps":["web"]}"#),
        ]);
        let ip = "127.0.0.1".parse().ok();
        let token_of = |s: RuleSet| {
            ConsumerPolicy::new(&s, &ConsumerIdentity::default())
                .token_for("M")
                .map(str::to_owned)
        };
        assert_eq!(token_of(rules.redacted_for("web", ip)).as_deref(), Some("s3cret-token"));
        assert_eq!(token_of(rules.redacted_for("batch", ip)), None);
    }

    #[test]
    fn qps_bucket_admits_burst_then_refuses_with_rate_limited() {
        let policy = ProviderPolicy::new(&set(&[("q", r#"{"kind":"qps_limit","qps":100,"burst":5}"#)]), None);
        let admitted = (0..20)
            .filter(|_| policy.admit("M", None, &attach("web", None)).is_ok())
            .count();
        // The bucket starts full (5); 20 immediate calls refill it by at most a fraction.
        assert!((5..=6).contains(&admitted), "{admitted}");
        let err = policy.admit("M", None, &attach("web", None)).unwrap_err();
        assert_eq!(err.code(), Code::RateLimited);
    }

    #[test]
    fn consumer_policy_keeps_only_routes_matching_this_consumer() {
        let rules = set(&[
            (
                "gray",
                r#"{"kind":"route","when":{"labels":{"env":"gray"}},"then":{"env":"gray"}}"#,
            ),
            (
                "w",
                r#"{"kind":"weight","overrides":[{"address":"127.0.0.1:9000","weight":400},{"address":"10.0.0.1","weight":0}]}"#,
            ),
        ]);
        let gray = ConsumerIdentity {
            labels: HashMap::from([("env".to_owned(), "gray".to_owned())]),
            ..ConsumerIdentity::default()
        };
        assert_eq!(ConsumerPolicy::new(&rules, &gray).routes.len(), 1);
        let plain = ConsumerPolicy::new(&rules, &ConsumerIdentity::default());
        assert!(plain.routes.is_empty());
        assert_eq!(plain.weight_of("127.0.0.1:9000".parse().unwrap()), Some(400));
        assert_eq!(plain.weight_of("10.0.0.1:7".parse().unwrap()), Some(0));
        assert_eq!(plain.weight_of("127.0.0.1:9001".parse().unwrap()), None);
    }
}
