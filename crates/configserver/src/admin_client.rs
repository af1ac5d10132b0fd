//! `configserver rules list|get|put|delete|history`: the admin API's rule
//! endpoints from the command line.
//!
//! ```text
//! configserver rules put demo.Greeter:1.0.0 no-batch '{"kind":"access","deny_apps":["batch"]}'
//! configserver rules list --service demo.Greeter:1.0.0
//! configserver rules history --service demo.Greeter:1.0.0 --name no-batch
//! configserver rules delete demo.Greeter:1.0.0 no-batch
//! ```
//!
//! Answers are printed as JSON; a refusal prints the server's message (which
//! names the bad field and value) and exits with status 1.

use std::io::Read as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

#[derive(Debug, clap::Args)]
pub struct RulesCli {
    /// Admin API of the server (`https://...` when it serves TLS).
    #[arg(long, env = "CONFIGSERVER_ADMIN_URL", default_value = "http://127.0.0.1:9601")]
    pub admin: String,
    /// With an `https://` admin URL: the CA its certificate comes from.
    #[arg(long, env = "CONFIGSERVER_ADMIN_CA")]
    pub admin_ca: Option<std::path::PathBuf>,
    /// Admin token, when the server requires one.
    #[arg(long, env = "CONFIGSERVER_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Who is making the change, for the audit log [default: $USER].
    #[arg(long)]
    pub actor: Option<String>,
    #[command(subcommand)]
    pub action: RulesAction,
}

#[derive(Debug, clap::Subcommand)]
pub enum RulesAction {
    /// Every rule, or those of one service.
    List {
        #[arg(long)]
        service: Option<String>,
    },
    /// One rule.
    Get { service: String, name: String },
    /// Creates or replaces a rule.
    Put {
        service: String,
        name: String,
        /// The rule's JSON; `-` reads it from stdin.
        #[arg(required_unless_present = "file")]
        rule: Option<String>,
        /// Reads the rule's JSON from a file.
        #[arg(long, conflicts_with = "rule")]
        file: Option<PathBuf>,
    },
    /// Deletes a rule.
    Delete { service: String, name: String },
    /// Audited changes, newest first.
    History {
        #[arg(long)]
        service: Option<String>,
        #[arg(long)]
        name: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
}

/// Runs one rules command and prints the answer.
///
/// # Errors
///
/// The server could not be reached, or refused (its message is the error).
pub fn run(cli: RulesCli) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let answer = runtime.block_on(call(&cli))?;
    println!("{answer}");
    Ok(())
}

async fn call(cli: &RulesCli) -> anyhow::Result<String> {
    let query = |pairs: &[(&str, Option<&str>)]| {
        let encoded: Vec<String> = pairs
            .iter()
            .filter_map(|(k, v)| v.map(|v| format!("{k}={}", encode(v))))
            .collect();
        if encoded.is_empty() {
            String::new()
        } else {
            format!("?{}", encoded.join("&"))
        }
    };
    let (method, path, body) = match &cli.action {
        RulesAction::List { service } => (
            Method::GET,
            format!("/api/rules{}", query(&[("service", service.as_deref())])),
            None,
        ),
        RulesAction::Get { service, name } => (
            Method::GET,
            format!(
                "/api/rule{}",
                query(&[("service", Some(service)), ("name", Some(name))])
            ),
            None,
        ),
        RulesAction::Put {
            service,
            name,
            rule,
            file,
        } => {
            let body = match (rule.as_deref(), file) {
                (_, Some(path)) => {
                    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
                }
                (Some("-"), None) => {
                    let mut text = String::new();
                    std::io::stdin()
                        .read_to_string(&mut text)
                        .context("reading the rule from stdin")?;
                    text
                }
                (Some(json), None) => json.to_owned(),
                (None, None) => bail!("give the rule's JSON or --file"),
            };
            (
                Method::PUT,
                format!(
                    "/api/rule{}",
                    query(&[("service", Some(service)), ("name", Some(name))])
                ),
                Some(body),
            )
        }
        RulesAction::Delete { service, name } => (
            Method::DELETE,
            format!(
                "/api/rule{}",
                query(&[("service", Some(service)), ("name", Some(name))])
            ),
            None,
        ),
        RulesAction::History { service, name, limit } => (
            Method::GET,
            format!(
                "/api/rules/history{}",
                query(&[
                    ("service", service.as_deref()),
                    ("name", name.as_deref()),
                    ("limit", Some(&limit.to_string()))
                ])
            ),
            None,
        ),
    };
    let actor = cli.actor.clone().or_else(|| std::env::var("USER").ok());
    let mut client = AdminClient::new(&cli.admin, cli.token.clone(), actor);
    if cli.admin.starts_with("https://") {
        let ca = cli
            .admin_ca
            .as_ref()
            .context("an https:// admin URL needs --admin-ca (the CA its certificate comes from)")?;
        client = client.with_tls(rpc_core::net::ClientTls::new(ca)?);
    }
    let (status, bytes) = client.send(method, &path, body.unwrap_or_default()).await?;
    let text = String::from_utf8_lossy(&bytes);
    let pretty = serde_json::from_slice::<serde_json::Value>(&bytes)
        .map(|v| serde_json::to_string_pretty(&v).unwrap_or_default())
        .unwrap_or_else(|_| text.trim().to_owned());
    if !status.is_success() {
        let message = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
            .unwrap_or(pretty);
        bail!("{status}: {message}");
    }
    Ok(pretty)
}

/// A client of the admin API (keeps its connection between requests).
#[derive(Debug, Clone)]
pub struct AdminClient {
    base: String,
    token: Option<String>,
    actor: Option<String>,
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    /// For `https://` URLs: a connection per request over this TLS.
    tls: Option<rpc_core::net::ClientTls>,
}

/// Longest wait for an admin answer.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);

impl AdminClient {
    /// `base` is e.g. `http://127.0.0.1:9601`.
    pub fn new(base: &str, token: Option<String>, actor: Option<String>) -> AdminClient {
        AdminClient {
            base: base.trim_end_matches('/').to_owned(),
            token,
            actor,
            client: Client::builder(TokioExecutor::new()).build_http(),
            tls: None,
        }
    }

    /// Reaches an `https://` admin API whose certificate `tls`'s CA issued.
    #[must_use]
    pub fn with_tls(mut self, tls: rpc_core::net::ClientTls) -> AdminClient {
        self.tls = Some(tls);
        self
    }

    /// One exchange over a TLS connection of its own.
    async fn send_tls(
        tls: &rpc_core::net::ClientTls,
        url: &str,
        request: Request<Full<Bytes>>,
    ) -> anyhow::Result<hyper::Response<hyper::body::Incoming>> {
        let authority = request
            .uri()
            .authority()
            .with_context(|| format!("no host in {url:?}"))?
            .clone();
        let port = authority.port_u16().unwrap_or(443);
        let tcp = tokio::net::TcpStream::connect((authority.host(), port))
            .await
            .with_context(|| format!("cannot reach {url}"))?;
        let stream = tls
            .connect(tcp, authority.host())
            .await
            .with_context(|| format!("TLS with {url}"))?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        let connection = tokio::spawn(connection);
        let (mut parts, body) = request.into_parts();
        parts.headers.insert(hyper::header::HOST, authority.as_str().parse()?);
        parts.uri = parts.uri.path_and_query().map_or("/", |p| p.as_str()).parse()?;
        let response = sender.send_request(Request::from_parts(parts, body)).await;
        drop(sender);
        let response = response?;
        // The connection ends once the body is read (its task then ends).
        drop(connection);
        Ok(response)
    }

    /// Sends one request; the status and body.
    ///
    /// # Errors
    ///
    /// A bad URL, no connection, or no complete answer within 10 s.
    pub async fn send(&self, method: Method, path: &str, body: String) -> anyhow::Result<(hyper::StatusCode, Bytes)> {
        let url = format!("{}{path}", self.base);
        let mut request = Request::builder().method(method).uri(&url);
        if let Some(token) = &self.token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        if let Some(actor) = &self.actor {
            request = request.header("x-tern-actor", actor);
        }
        let request = request
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .with_context(|| format!("bad admin URL {url:?}"))?;
        let exchange = async {
            let response = match &self.tls {
                Some(tls) if url.starts_with("https://") => Self::send_tls(tls, &url, request).await?,
                None if url.starts_with("https://") => bail!("{url}: https needs the CA of its certificate"),
                _ => self
                    .client
                    .request(request)
                    .await
                    .with_context(|| format!("cannot reach {url}"))?,
            };
            let status = response.status();
            let bytes = response.into_body().collect().await?.to_bytes();
            anyhow::Ok((status, bytes))
        };
        tokio::time::timeout(ADMIN_TIMEOUT, exchange)
            .await
            .with_context(|| format!("{url}: no complete answer within {ADMIN_TIMEOUT:?}"))?
    }

    /// `PUT /api/rule`; the stored rule's revision.
    ///
    /// # Errors
    ///
    /// See [`AdminClient::send`]; a refusal carries the server's message.
    pub async fn put_rule(&self, service: &str, name: &str, rule: &str) -> anyhow::Result<u64> {
        let path = format!("/api/rule?service={}&name={}", encode(service), encode(name));
        let (status, bytes) = self.send(Method::PUT, &path, rule.to_owned()).await?;
        if !status.is_success() {
            bail!("{status}: {}", String::from_utf8_lossy(&bytes));
        }
        let stored: serde_json::Value = serde_json::from_slice(&bytes)?;
        stored["revision"].as_u64().context("no revision in the answer")
    }
}

/// Percent-encodes a query value.
fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b':') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(super::encode("shop/demo.Greeter:1.0"), "shop%2Fdemo.Greeter:1.0");
        assert_eq!(super::encode("a b&c"), "a%20b%26c");
    }
}
