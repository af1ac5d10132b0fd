//! Registry access control (off unless a credentials file is given).
//!
//! ```toml
//! # Needed for admin writes and for reading rules (they hold service tokens).
//! admin-token = "change-me-admin"
//!
//! [apps.greeter]
//! token = "change-me-greeter"
//! # Service keys this app may register. Leave out to let the app
//! # register nothing.
//! provide = ["demo.Greeter:1.0.0", "demo.*"]
//!
//! [apps.web]
//! token = "change-me-web"
//! # Service keys this app may subscribe to. Leave out: none.
//! consume = ["demo.Greeter", "payments/billing.*"]
//! ```
//!
//! With credentials, a session's Hello must carry its app's token, an app
//! may register only the services its `provide` list names, and subscribe
//! only to those its `consume` list names.
//!
//! A pattern is `[group/]name[:version]`, where `name` is an interface or
//! a prefix of one ending in `*`, and `version`, when given, must match
//! exactly. A pattern matches only keys of its own group (no `group/`: the
//! default, empty group): `demo.*` never matches `demo.x/payments.Api`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rpc_core::ServiceKey;
use rpc_core::governance::constant_time_eq as eq;
use serde::Deserialize;

/// Why a credentials file was not taken; the message names the file and
/// the bad value.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CredentialsError {
    #[error("reading {}: {error}", path.display())]
    Read { path: PathBuf, error: std::io::Error },
    #[error("in {}: {error}", path.display())]
    Parse { path: PathBuf, error: toml::de::Error },
    #[error("in {}: admin-token is empty", path.display())]
    EmptyAdminToken { path: PathBuf },
    #[error("in {}: app {app:?} has an empty token", path.display())]
    EmptyAppToken { path: PathBuf, app: String },
}

/// Why a session's Hello was refused. Both say the same to the node, so
/// that its answer does not tell which app names exist; the server's log
/// says which (`{:?}`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    #[error("app {app:?} is unknown here or its token is wrong")]
    UnknownApp { app: String },
    #[error("app {app:?} is unknown here or its token is wrong")]
    WrongToken { app: String },
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Credentials {
    #[serde(default)]
    pub admin_token: Option<String>,
    #[serde(default)]
    pub apps: HashMap<String, AppCredential>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppCredential {
    pub token: String,
    #[serde(default)]
    pub provide: Vec<String>,
    #[serde(default)]
    pub consume: Vec<String>,
}

impl Credentials {
    /// Reads and checks a credentials file.
    ///
    /// # Errors
    ///
    /// The file cannot be read, is not valid TOML of this shape, or has an
    /// empty token (named).
    pub fn from_file(path: &Path) -> Result<Credentials, CredentialsError> {
        let path_buf = || path.to_path_buf();
        let text = std::fs::read_to_string(path).map_err(|error| CredentialsError::Read {
            path: path_buf(),
            error,
        })?;
        let credentials: Credentials = toml::from_str(&text).map_err(|error| CredentialsError::Parse {
            path: path_buf(),
            error,
        })?;
        if credentials.admin_token.as_deref() == Some("") {
            return Err(CredentialsError::EmptyAdminToken { path: path_buf() });
        }
        if let Some((app, _)) = credentials.apps.iter().find(|(_, c)| c.token.is_empty()) {
            return Err(CredentialsError::EmptyAppToken {
                path: path_buf(),
                app: app.clone(),
            });
        }
        Ok(credentials)
    }

    /// Checks the token an app presented in Hello.
    ///
    /// # Errors
    ///
    /// Why the session is refused (unknown app or wrong token).
    pub fn authenticate(&self, app: &str, token: &str) -> Result<(), AuthError> {
        match self.apps.get(app) {
            None => Err(AuthError::UnknownApp { app: app.to_owned() }),
            Some(c) if !eq(c.token.as_bytes(), token.as_bytes()) => Err(AuthError::WrongToken { app: app.to_owned() }),
            Some(_) => Ok(()),
        }
    }

    /// Whether `app` may register `key`.
    pub fn may_provide(&self, app: &str, key: &ServiceKey) -> bool {
        self.apps
            .get(app)
            .is_some_and(|c| c.provide.iter().any(|p| pattern_matches(p, key)))
    }

    /// Whether `app` may subscribe to `key`.
    pub fn may_consume(&self, app: &str, key: &ServiceKey) -> bool {
        self.apps
            .get(app)
            .is_some_and(|c| c.consume.iter().any(|p| pattern_matches(p, key)))
    }

    /// Whether an `Authorization` header value carries the admin token. No
    /// admin token configured: admin calls are open.
    pub fn is_admin(&self, authorization: Option<&str>) -> bool {
        match &self.admin_token {
            None => true,
            Some(token) => authorization
                .and_then(|v| v.strip_prefix("Bearer "))
                .is_some_and(|given| eq(given.as_bytes(), token.as_bytes())),
        }
    }
}

/// Whether `pattern` (`[group/]name[:version]`, `name` an interface or a
/// prefix ending in `*`) names `key`; never across groups.
fn pattern_matches(pattern: &str, key: &ServiceKey) -> bool {
    let (group, rest) = pattern.split_once('/').unwrap_or(("", pattern));
    if group != key.group {
        return false;
    }
    let (name, version) = match rest.split_once(':') {
        Some((name, version)) => (name, Some(version)),
        None => (rest, None),
    };
    if version.is_some_and(|v| v != key.version) {
        return false;
    }
    match name.strip_suffix('*') {
        Some(prefix) => key.interface.starts_with(prefix),
        None => name == key.interface,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn credentials() -> Credentials {
        toml::from_str(
            r#"
            admin-token = "admin-secret"
            [apps.greeter]
            token = "greeter-secret"
            provide = ["demo.Greeter:1.0", "shop.*"]
            [apps.web]
            token = "web-secret"
            "#,
        )
        .unwrap()
    }

    #[test]
    fn patterns_name_keys_interfaces_and_prefixes_never_across_groups() {
        let key = |text: &str| text.parse::<ServiceKey>().unwrap();
        let cases = [
            ("demo.Greeter:1.0.0", "demo.Greeter:1.0.0", true),
            ("demo.Greeter:1.0.0", "demo.Greeter:2.0.0", false),
            ("demo.Greeter", "demo.Greeter:2.0.0", true),
            ("demo.*", "demo.Echo:1.0.0", true),
            ("demo.*", "demo.x/payments.Api", false),
            ("demo.*", "blue/demo.Echo", false),
            ("blue/demo.*", "blue/demo.Echo:1.0.0", true),
            ("blue/demo.*:1.0.0", "blue/demo.Echo:2.0.0", false),
            ("payments.*", "demo.x/payments.Api", false),
            ("demo.x/payments.*", "demo.x/payments.Api", true),
        ];
        for (pattern, text, want) in cases {
            assert_eq!(pattern_matches(pattern, &key(text)), want, "{pattern} ~ {text}");
        }
    }

    #[test]
    fn apps_authenticate_with_their_own_token() {
        let c = credentials();
        c.authenticate("greeter", "greeter-secret").unwrap();
        let wrong = c.authenticate("greeter", "web-secret").unwrap_err();
        assert_eq!(wrong, AuthError::WrongToken { app: "greeter".into() });
        let unknown = c.authenticate("rogue", "x").unwrap_err();
        assert_eq!(unknown, AuthError::UnknownApp { app: "rogue".into() });
        // The node is told the same either way (no app enumeration).
        assert_eq!(
            wrong.to_string().replace("greeter", "rogue"),
            unknown.to_string(),
            "the answers tell an unknown app from a wrong token"
        );
    }

    #[test]
    fn a_bad_credentials_file_is_named_with_its_bad_value() {
        let dir = std::env::temp_dir().join(format!("tern-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("credentials.toml");
        std::fs::write(&path, "[apps.web]\ntoken = \"\"\n").unwrap();
        let error = Credentials::from_file(&path).unwrap_err();
        assert!(matches!(&error, CredentialsError::EmptyAppToken { app, .. } if app == "web"));
        assert_eq!(
            error.to_string(),
            format!(r#"in {}: app "web" has an empty token"#, path.display())
        );
        let missing = Credentials::from_file(&dir.join("absent.toml")).unwrap_err();
        assert!(missing.to_string().starts_with("reading "), "{missing}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn apps_provide_only_what_their_list_names() {
        let c = credentials();
        assert!(c.may_provide("greeter", &"demo.Greeter:1.0".parse().unwrap()));
        assert!(c.may_provide("greeter", &"shop.Cart".parse().unwrap()));
        assert!(!c.may_provide("greeter", &"demo.Greeter:2.0".parse().unwrap()));
        assert!(!c.may_provide("web", &"demo.Greeter:1.0".parse().unwrap()));
    }

    #[test]
    fn admin_calls_need_the_bearer_token() {
        let c = credentials();
        assert!(c.is_admin(Some("Bearer admin-secret")));
        assert!(!c.is_admin(Some("Bearer nope")));
        assert!(!c.is_admin(None));
        assert!(Credentials::default().is_admin(None));
    }
}
