//! The durable rule store: SQLite, PostgreSQL or MySQL through sqlx.
//!
//! Two tables (see `migrations/`): the current rules, and an audit log in
//! which every change gets the next revision (who, when, before, after). A
//! change and its audit row are written in one transaction. The revision is
//! the audit table's primary key, so ConfigServers sharing one store that
//! race for the same number see a unique violation and retry with the next.
//!
//! Queries are written once with `?` placeholders and rewritten to `$n` for
//! PostgreSQL; the SQL itself is the subset all three accept.
//!
//! Each driver is a cargo feature of this crate: `sqlite` (default),
//! `postgres`, `mysql`. A URL whose driver is not built in is refused
//! before connecting ([`StoreError::DriverNotBuilt`]).

use std::borrow::Cow;
use std::pin::Pin;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::error::BoxDynError;
use sqlx::migrate::{Migration, MigrationSource, MigrationType, Migrator};
use sqlx::{AnyPool, Row};
use tracing::info;

/// The schema, embedded so the binary needs no files at run time.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "rules", include_str!("../migrations/0001_rules.sql")),
    (2, "rule audit", include_str!("../migrations/0002_rule_audit.sql")),
    (
        3,
        "rule audit index",
        include_str!("../migrations/0003_rule_audit_index.sql"),
    ),
];

#[derive(Debug)]
struct Embedded;

impl<'s> MigrationSource<'s> for Embedded {
    fn resolve(self) -> Pin<Box<dyn Future<Output = Result<Vec<Migration>, BoxDynError>> + Send + 's>> {
        Box::pin(async {
            Ok(MIGRATIONS
                .iter()
                .map(|&(version, description, sql)| {
                    Migration::new(version, description.into(), MigrationType::Simple, sql.into(), false)
                })
                .collect())
        })
    }
}

/// How many times a write is retried after losing a revision race.
const WRITE_TRIES: usize = 8;

/// A store error; the message says what failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("rule store {url}: {source}")]
    Connect { url: String, source: sqlx::Error },
    #[error("rule store migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("rule store: {0}")]
    Query(#[from] sqlx::Error),
    #[error(
        "rule store: gave up after {WRITE_TRIES} tries (revision conflicts with other servers, or the database stayed locked); try again"
    )]
    Contended,
    #[error(
        "rule store {url}: the {scheme}: driver is not built in; build configserver with the cargo feature {feature:?} (--features {feature})"
    )]
    DriverNotBuilt {
        url: String,
        scheme: String,
        feature: &'static str,
    },
}

/// One stored rule.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StoredRule {
    pub service: String,
    pub name: String,
    /// The rule's JSON.
    pub body: String,
    pub revision: u64,
    pub updated_at_ms: i64,
    pub updated_by: String,
}

/// One audited change.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AuditEntry {
    pub revision: u64,
    pub service: String,
    pub name: String,
    pub actor: String,
    pub at_ms: i64,
    /// `None`: the rule was created.
    pub before: Option<String>,
    /// `None`: the rule was deleted.
    pub after: Option<String>,
}

/// The rule store.
#[derive(Debug, Clone)]
pub struct RuleStore {
    pool: AnyPool,
    postgres: bool,
    url: String,
    /// This server's writes take turns: on SQLite, two transactions that
    /// read and then both want to write would otherwise fail one of them
    /// at once with `database is locked` (a lock upgrade no busy timeout
    /// waits out). Other servers sharing a store are told apart by the
    /// revision race, and a store busy with them is retried.
    writing: std::sync::Arc<tokio::sync::Mutex<()>>,
}

impl RuleStore {
    /// Connects (creating an SQLite file if need be) and runs the migrations.
    ///
    /// # Errors
    ///
    /// The database cannot be reached, or a migration fails.
    pub async fn open(url: &str) -> Result<RuleStore, StoreError> {
        let shown = redact(url);
        if let Some((scheme, feature)) = missing_driver(url) {
            return Err(StoreError::DriverNotBuilt {
                url: shown,
                scheme: scheme.to_owned(),
                feature,
            });
        }
        sqlx::any::install_default_drivers();
        // An in-memory SQLite database lives and dies with its one connection.
        let in_memory = url.contains(":memory:") || url.contains("mode=memory");
        let options = if in_memory {
            AnyPoolOptions::new()
                .max_connections(1)
                .min_connections(1)
                .idle_timeout(None)
                .max_lifetime(None)
        } else {
            AnyPoolOptions::new().max_connections(4)
        };
        let pool = options
            .acquire_timeout(Duration::from_secs(5))
            .connect(url)
            .await
            .map_err(|source| StoreError::Connect {
                url: shown.clone(),
                source,
            })?;
        let migrator = Migrator::new(Embedded).await?;
        migrator.run(&pool).await?;
        info!(store = %shown, "rule store ready");
        Ok(RuleStore {
            pool,
            postgres: url.starts_with("postgres"),
            url: shown,
            writing: Default::default(),
        })
    }

    /// The URL without its password, for logs.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// `?` placeholders as this backend wants them.
    fn sql(&self, query: &'static str) -> Cow<'static, str> {
        if !self.postgres {
            return Cow::Borrowed(query);
        }
        let mut out = String::with_capacity(query.len() + 8);
        let mut n = 0;
        for c in query.chars() {
            if c == '?' {
                n += 1;
                out.push_str(&format!("${n}"));
            } else {
                out.push(c);
            }
        }
        Cow::Owned(out)
    }

    /// Every rule.
    ///
    /// # Errors
    ///
    /// The query failed.
    pub async fn all(&self) -> Result<Vec<StoredRule>, StoreError> {
        let sql = self.sql(
            "SELECT service, name, body, revision, updated_at_ms, updated_by FROM tern_rules ORDER BY service, name",
        );
        let rows = sqlx::query(&sql).fetch_all(&self.pool).await?;
        rows.iter().map(stored_rule).collect()
    }

    /// The latest revision of each service's rules (deletions included).
    ///
    /// # Errors
    ///
    /// The query failed.
    pub async fn service_revisions(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let sql = self.sql("SELECT service, MAX(revision) FROM tern_rule_audit GROUP BY service");
        let rows = sqlx::query(&sql).fetch_all(&self.pool).await?;
        rows.iter()
            .map(|row| Ok((row.try_get::<String, _>(0)?, row.try_get::<i64, _>(1)? as u64)))
            .collect()
    }

    /// The highest revision written by anyone.
    ///
    /// # Errors
    ///
    /// The query failed.
    pub async fn latest_revision(&self) -> Result<u64, StoreError> {
        let sql = self.sql("SELECT COALESCE(MAX(revision), 0) FROM tern_rule_audit");
        let row = sqlx::query(&sql).fetch_one(&self.pool).await?;
        Ok(row.try_get::<i64, _>(0)? as u64)
    }

    /// Creates or replaces a rule; returns its revision, or `None` if the
    /// stored body is already `body` (nothing written).
    ///
    /// # Errors
    ///
    /// The write failed or kept losing revision races.
    pub async fn put(&self, service: &str, name: &str, body: &str, actor: &str) -> Result<Option<u64>, StoreError> {
        self.change(service, name, Some(body), actor).await
    }

    /// Deletes a rule; returns the revision, or `None` if there was no such rule.
    ///
    /// # Errors
    ///
    /// The write failed or kept losing revision races.
    pub async fn delete(&self, service: &str, name: &str, actor: &str) -> Result<Option<u64>, StoreError> {
        self.change(service, name, None, actor).await
    }

    async fn change(
        &self,
        service: &str,
        name: &str,
        after: Option<&str>,
        actor: &str,
    ) -> Result<Option<u64>, StoreError> {
        let _turn = self.writing.lock().await;
        for attempt in 0..WRITE_TRIES {
            match self.try_change(service, name, after, actor).await {
                Err(StoreError::Query(e)) if is_conflict(&e) => continue,
                Err(StoreError::Query(e)) if is_busy(&e) => {
                    // Another process holds the database: wait a little longer each time.
                    tokio::time::sleep(Duration::from_millis(10 << attempt.min(6))).await;
                }
                other => return other,
            }
        }
        Err(StoreError::Contended)
    }

    async fn try_change(
        &self,
        service: &str,
        name: &str,
        after: Option<&str>,
        actor: &str,
    ) -> Result<Option<u64>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let sql = self.sql("SELECT body FROM tern_rules WHERE service = ? AND name = ?");
        let before: Option<String> = sqlx::query(&sql)
            .bind(service)
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?
            .map(|row| text(&row, 0))
            .transpose()?;
        if before.as_deref() == after {
            return Ok(None); // unchanged, or deleting what is not there
        }
        let sql = self.sql("SELECT COALESCE(MAX(revision), 0) FROM tern_rule_audit");
        let revision = sqlx::query(&sql).fetch_one(&mut *tx).await?.try_get::<i64, _>(0)? + 1;
        let now = now_ms();
        let sql = self.sql(
            "INSERT INTO tern_rule_audit (revision, service, name, actor, at_ms, before_body, after_body) \
             VALUES (?, ?, ?, ?, ?, ?, ?)",
        );
        sqlx::query(&sql)
            .bind(revision)
            .bind(service)
            .bind(name)
            .bind(actor)
            .bind(now)
            .bind(before.clone())
            .bind(after.map(str::to_owned))
            .execute(&mut *tx)
            .await?;
        let (sql, binds_body) = match (&before, after) {
            (Some(_), Some(_)) => (
                "UPDATE tern_rules SET body = ?, revision = ?, updated_at_ms = ?, updated_by = ? \
                 WHERE service = ? AND name = ?",
                true,
            ),
            (None, Some(_)) => (
                "INSERT INTO tern_rules (body, revision, updated_at_ms, updated_by, service, name) \
                 VALUES (?, ?, ?, ?, ?, ?)",
                true,
            ),
            (_, None) => ("DELETE FROM tern_rules WHERE service = ? AND name = ?", false),
        };
        let sql = self.sql(sql);
        let mut query = sqlx::query(&sql);
        if binds_body {
            query = query
                .bind(after.unwrap_or_default())
                .bind(revision)
                .bind(now)
                .bind(actor);
        }
        query.bind(service).bind(name).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(Some(revision as u64))
    }

    /// Audited changes, newest first; narrowed to a service and a rule name
    /// when given.
    ///
    /// # Errors
    ///
    /// The query failed.
    pub async fn history(
        &self,
        service: Option<&str>,
        name: Option<&str>,
        limit: u32,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        // `'' = ? OR column = ?` keeps one query text for every filter.
        let sql = self.sql(
            "SELECT revision, service, name, actor, at_ms, before_body, after_body FROM tern_rule_audit \
             WHERE (? = '' OR service = ?) AND (? = '' OR name = ?) ORDER BY revision DESC LIMIT ?",
        );
        let (service, name) = (service.unwrap_or(""), name.unwrap_or(""));
        let rows = sqlx::query(&sql)
            .bind(service)
            .bind(service)
            .bind(name)
            .bind(name)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| {
                Ok(AuditEntry {
                    revision: row.try_get::<i64, _>(0)? as u64,
                    service: row.try_get(1)?,
                    name: row.try_get(2)?,
                    actor: row.try_get(3)?,
                    at_ms: row.try_get(4)?,
                    before: optional_text(row, 5)?,
                    after: optional_text(row, 6)?,
                })
            })
            .collect()
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

fn stored_rule(row: &AnyRow) -> Result<StoredRule, StoreError> {
    Ok(StoredRule {
        service: row.try_get(0)?,
        name: row.try_get(1)?,
        body: text(row, 2)?,
        revision: row.try_get::<i64, _>(3)? as u64,
        updated_at_ms: row.try_get(4)?,
        updated_by: row.try_get(5)?,
    })
}

/// A TEXT column. MySQL hands TEXT to the `Any` driver as a BLOB, so bytes
/// are accepted too (and must be UTF-8).
fn text(row: &AnyRow, index: usize) -> Result<String, sqlx::Error> {
    Ok(optional_text(row, index)?.unwrap_or_default())
}

fn optional_text(row: &AnyRow, index: usize) -> Result<Option<String>, sqlx::Error> {
    match row.try_get::<Option<String>, _>(index) {
        Ok(value) => Ok(value),
        Err(_) => row
            .try_get::<Option<Vec<u8>>, _>(index)?
            .map(|bytes| {
                String::from_utf8(bytes).map_err(|e| sqlx::Error::ColumnDecode {
                    index: index.to_string(),
                    source: Box::new(e),
                })
            })
            .transpose(),
    }
}

fn is_conflict(e: &sqlx::Error) -> bool {
    e.as_database_error().is_some_and(|d| d.is_unique_violation())
}

/// SQLite's `SQLITE_BUSY` (5) or `SQLITE_LOCKED` (6): another connection
/// (another server sharing the file) holds the database.
fn is_busy(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|code| code == "5" || code == "6")
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The scheme of `url` and the cargo feature its driver needs, if that
/// feature is not built in. Schemes of no known driver are left to sqlx.
fn missing_driver(url: &str) -> Option<(&str, &'static str)> {
    let scheme = url.split_once(':')?.0;
    let (feature, built) = match scheme {
        "sqlite" => ("sqlite", cfg!(feature = "sqlite")),
        "postgres" | "postgresql" => ("postgres", cfg!(feature = "postgres")),
        "mysql" | "mariadb" => ("mysql", cfg!(feature = "mysql")),
        _ => return None,
    };
    (!built).then_some((scheme, feature))
}

/// `scheme://user:password@host/...` without the password.
fn redact(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The stores the suite runs against, with their URLs: SQLite always,
    /// PostgreSQL and MySQL when their URLs are set (a missing one is
    /// reported on the terminal, past the harness's output capture). Each
    /// gets tables of its own (a fresh SQLite file; the server databases
    /// are emptied first).
    pub(crate) async fn stores(dir: &std::path::Path) -> Vec<(String, RuleStore)> {
        let mut urls = vec![format!("sqlite://{}?mode=rwc", dir.join("rules.db").display())];
        // Only the servers whose driver is built in.
        let servers: &[&str] = &[
            #[cfg(feature = "postgres")]
            "TEST_POSTGRES_URL",
            #[cfg(feature = "mysql")]
            "TEST_MYSQL_URL",
        ];
        for &var in servers {
            match std::env::var(var) {
                Ok(url) if !url.is_empty() => urls.push(url),
                _ => {
                    use std::io::Write;
                    let _ = writeln!(
                        std::io::stderr(),
                        "SKIPPED: {var} is not set; the rule store suite runs on SQLite only"
                    );
                }
            }
        }
        let mut stores = Vec::new();
        for url in urls {
            let store = RuleStore::open(&url).await.unwrap_or_else(|e| panic!("{e}"));
            for table in ["tern_rules", "tern_rule_audit"] {
                sqlx::query(&format!("DELETE FROM {table}"))
                    .execute(&store.pool)
                    .await
                    .unwrap();
            }
            stores.push((url, store));
        }
        stores
    }

    #[tokio::test]
    async fn a_url_whose_driver_is_not_built_in_is_refused_naming_the_feature() {
        let urls = [
            (
                "postgres://u:secret@127.0.0.1:1/db",
                "postgres",
                cfg!(feature = "postgres"),
            ),
            ("mysql://root@127.0.0.1:1/db", "mysql", cfg!(feature = "mysql")),
            ("sqlite::memory:", "sqlite", cfg!(feature = "sqlite")),
        ];
        for (url, feature, built) in urls {
            assert_eq!(missing_driver(url).is_none(), built, "{url}");
            if built {
                continue;
            }
            let error = RuleStore::open(url).await.unwrap_err();
            assert!(matches!(&error, StoreError::DriverNotBuilt { feature: f, .. } if *f == feature));
            let message = error.to_string();
            assert!(message.contains(&format!("--features {feature}")), "{message}");
            assert!(!message.contains("secret"), "{message}");
        }
        assert_eq!(missing_driver("redis://localhost"), None, "left to sqlx");
    }

    #[test]
    fn passwords_are_left_out_of_logged_urls() {
        assert_eq!(redact("postgres://u:secret@h:5432/db"), "postgres://u:***@h:5432/db");
        assert_eq!(redact("mysql://root@127.0.0.1/test"), "mysql://root@127.0.0.1/test");
        assert_eq!(redact("sqlite:///tmp/x.db"), "sqlite:///tmp/x.db");
    }
}
