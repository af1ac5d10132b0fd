//! The identity of a service: interface + version + group.
//!
//! A consumer reaches a provider only when all three match, as HSF matches
//! "interface + version". The text form is `[group/]interface[:version]`,
//! e.g. `shop/demo.Greeter:1.0.0`.

use std::fmt;
use std::str::FromStr;

const MAX_PART_LEN: usize = 200;

/// Interface + version + group.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct ServiceKey {
    pub interface: String,
    pub version: String,
    pub group: String,
}

/// A service key that failed validation; the message names the bad value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid service key {key:?}: {reason}")]
pub struct InvalidServiceKey {
    pub key: String,
    pub reason: String,
}

impl ServiceKey {
    /// Builds a key without validating it; see [`ServiceKey::validate`].
    pub fn new(interface: impl Into<String>, version: impl Into<String>, group: impl Into<String>) -> ServiceKey {
        ServiceKey {
            interface: interface.into(),
            version: version.into(),
            group: group.into(),
        }
    }

    /// Checks every part: the interface is a non-empty dotted name of
    /// letters, digits, `_`, `$` and `-`; version and group use letters,
    /// digits, `.`, `_` and `-`; each part is at most 200 bytes.
    ///
    /// # Errors
    ///
    /// [`InvalidServiceKey`] naming the part and the offending value.
    pub fn validate(&self) -> Result<(), InvalidServiceKey> {
        let fail = |reason: String| {
            Err(InvalidServiceKey {
                key: self.to_string(),
                reason,
            })
        };
        if self.interface.is_empty() {
            return fail("interface is empty".into());
        }
        let parts = [
            ("interface", &self.interface),
            ("version", &self.version),
            ("group", &self.group),
        ];
        for (name, value) in parts {
            if value.len() > MAX_PART_LEN {
                return fail(format!("{name} is {} bytes, more than {MAX_PART_LEN}", value.len()));
            }
            let allowed = |c: char| {
                c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') || (name == "interface" && c == '$')
            };
            if let Some(bad) = value.chars().find(|&c| !allowed(c)) {
                return fail(format!("{name} {value:?} contains {bad:?}"));
            }
        }
        if self.interface.starts_with('.') || self.interface.ends_with('.') || self.interface.contains("..") {
            return fail(format!("interface {:?} has an empty name segment", self.interface));
        }
        Ok(())
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.group.is_empty() {
            write!(f, "{}/", self.group)?;
        }
        f.write_str(&self.interface)?;
        if !self.version.is_empty() {
            write!(f, ":{}", self.version)?;
        }
        Ok(())
    }
}

impl FromStr for ServiceKey {
    type Err = InvalidServiceKey;

    /// Parses `[group/]interface[:version]` and validates the result.
    fn from_str(s: &str) -> Result<ServiceKey, InvalidServiceKey> {
        let (group, rest) = s.split_once('/').unwrap_or(("", s));
        let (interface, version) = rest.split_once(':').unwrap_or((rest, ""));
        let key = ServiceKey::new(interface, version, group);
        key.validate()
            .map_err(|e| InvalidServiceKey { key: s.to_owned(), ..e })?;
        Ok(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_form_round_trips() {
        for text in ["demo.Greeter", "demo.Greeter:1.0.0", "shop/demo.Greeter:1.0.0", "g/a.B"] {
            let key: ServiceKey = text.parse().unwrap();
            assert_eq!(key.to_string(), text);
        }
        let key: ServiceKey = "shop/demo.Greeter:1.0".parse().unwrap();
        assert_eq!(key, ServiceKey::new("demo.Greeter", "1.0", "shop"));
    }

    #[test]
    fn bad_keys_name_the_bad_part() {
        let err = "demo.Gree ter:1".parse::<ServiceKey>().unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"invalid service key "demo.Gree ter:1": interface "demo.Gree ter" contains ' '"#
        );
        let err = ":1.0".parse::<ServiceKey>().unwrap_err();
        assert!(err.to_string().contains("interface is empty"), "{err}");
        let err = "a..b".parse::<ServiceKey>().unwrap_err();
        assert!(err.to_string().contains("empty name segment"), "{err}");
        let err = ServiceKey::new("a.B", "1/0", "").validate().unwrap_err();
        assert!(err.to_string().contains(r#"version "1/0" contains '/'"#), "{err}");
    }
}
