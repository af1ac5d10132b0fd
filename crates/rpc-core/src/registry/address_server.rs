//! The address server: a URL that answers the ConfigServers of a cluster,
//! one `host:port` a line. It is what HSF's address server and Nacos's
//! endpoint serve, so `GET /api/cluster/servers` of any ConfigServer, or a
//! static file on any web server, works as one.
//!
//! Fetched over plain HTTP/1.1 (`http://host[:port][/path]`), with a
//! deadline, and at most [`MAX_RESPONSE`] bytes read.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::{debug, warn};

use super::SessionConfig;

/// Most bytes of a response read (headers and list).
pub const MAX_RESPONSE: usize = 64 * 1024;

/// Most servers a list may name.
pub const MAX_SERVERS: usize = 1024;

/// Why the list could not be fetched.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AddressServerError {
    #[error("address server URL {0:?} is not http://host[:port][/path]")]
    BadUrl(String),
    #[error("address server {url}: {source}")]
    Io { url: String, source: std::io::Error },
    #[error("address server {url}: no answer within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    #[error("address server {url} answered status {status}")]
    Status { url: String, status: u16 },
    #[error("address server {url}: response over {MAX_RESPONSE} bytes")]
    TooLarge { url: String },
    #[error("address server {url}: {reason}")]
    Malformed { url: String, reason: String },
}

/// An address server's URL, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressServer {
    url: String,
    host: String,
    port: u16,
    path: String,
}

impl AddressServer {
    /// # Errors
    ///
    /// Anything but `http://host[:port][/path]`.
    pub fn parse(url: &str) -> Result<AddressServer, AddressServerError> {
        let bad = || AddressServerError::BadUrl(url.to_owned());
        let rest = url.strip_prefix("http://").ok_or_else(bad)?;
        let (authority, path) = match rest.find('/') {
            Some(at) => (&rest[..at], &rest[at..]),
            None => (rest, "/"),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) if !host.ends_with(']') || host.starts_with('[') => {
                (host, port.parse::<u16>().map_err(|_| bad())?)
            }
            _ => (authority, 80),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let host_ok = !host.is_empty()
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':'));
        if !host_ok || path.chars().any(|c| c.is_ascii_control() || c == ' ') {
            return Err(bad());
        }
        Ok(AddressServer {
            url: url.to_owned(),
            host: host.to_owned(),
            port,
            path: path.to_owned(),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Fetches the list, within `timeout` in all.
    ///
    /// # Errors
    ///
    /// Unreachable, slow, a status other than 200, a response too large,
    /// or a line that is not `host:port`.
    pub async fn fetch(&self, timeout: Duration) -> Result<Vec<String>, AddressServerError> {
        let url = &self.url;
        let body = tokio::time::timeout(timeout, self.get())
            .await
            .map_err(|_| AddressServerError::Timeout {
                url: url.clone(),
                timeout,
            })??;
        parse_list(&body).map_err(|reason| AddressServerError::Malformed {
            url: url.clone(),
            reason,
        })
    }

    async fn get(&self) -> Result<String, AddressServerError> {
        let io = |source| AddressServerError::Io {
            url: self.url.clone(),
            source,
        };
        let mut stream = TcpStream::connect((self.host.as_str(), self.port)).await.map_err(io)?;
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {}:{}\r\nAccept: text/plain\r\nConnection: close\r\n\r\n",
            self.path, self.host, self.port
        );
        stream.write_all(request.as_bytes()).await.map_err(io)?;
        let mut response = Vec::with_capacity(1024);
        let mut limited = (&mut stream).take(MAX_RESPONSE as u64 + 1);
        limited.read_to_end(&mut response).await.map_err(io)?;
        if response.len() > MAX_RESPONSE {
            return Err(AddressServerError::TooLarge { url: self.url.clone() });
        }
        self.body(&response)
    }

    /// The body of a complete response (read to the connection's close).
    fn body(&self, response: &[u8]) -> Result<String, AddressServerError> {
        let malformed = |reason: String| AddressServerError::Malformed {
            url: self.url.clone(),
            reason,
        };
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut parsed = httparse::Response::new(&mut headers);
        let head = match parsed.parse(response) {
            Ok(httparse::Status::Complete(head)) => head,
            Ok(httparse::Status::Partial) => return Err(malformed("response ended inside its headers".into())),
            Err(e) => return Err(malformed(format!("bad response: {e}"))),
        };
        let status = parsed.code.unwrap_or(0);
        if status != 200 {
            return Err(AddressServerError::Status {
                url: self.url.clone(),
                status,
            });
        }
        let header = |name: &str| {
            parsed
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| String::from_utf8_lossy(h.value).trim().to_ascii_lowercase())
        };
        let rest = &response[head..];
        let body = if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            dechunk(rest).ok_or_else(|| malformed("bad chunked body".into()))?
        } else if let Some(len) = header("content-length") {
            let len: usize = len
                .parse()
                .map_err(|_| malformed(format!("bad content-length {len:?}")))?;
            rest.get(..len)
                .ok_or_else(|| malformed(format!("body shorter than its content-length {len}")))?
                .to_vec()
        } else {
            rest.to_vec()
        };
        String::from_utf8(body).map_err(|_| malformed("the list is not UTF-8".into()))
    }
}

/// Follows the address server at `url` for a node's session: a task
/// (stopped when the handle is dropped, or at `stop`) that fetches the
/// list at once, again every [`SessionConfig::address_refresh`], and
/// sooner (with the session's backoff) until a first list comes. The list
/// is the watch's value; the last one stays while the server is down.
///
/// # Errors
///
/// `url` is not an address server URL.
pub(super) fn follow(
    url: &str,
    config: &SessionConfig,
    stop: CancellationToken,
) -> Result<(watch::Receiver<Vec<String>>, AbortOnDropHandle<()>), AddressServerError> {
    let server = AddressServer::parse(url)?;
    let (tx, rx) = watch::channel(Vec::new());
    let (timeout, refresh, backoff) = (config.connect_timeout, config.address_refresh, config.backoff);
    let task = tokio::spawn(async move {
        let mut failures = 0u32;
        loop {
            let got_one = !tx.borrow().is_empty();
            match server.fetch(timeout).await {
                Ok(list) if !list.is_empty() => {
                    failures = 0;
                    tx.send_if_modified(|held| {
                        let changed = *held != list;
                        *held = list;
                        changed
                    });
                }
                Ok(_) => warn!(url = %server.url(), "address server lists no configserver; keeping the last list"),
                Err(e) if got_one => debug!(error = %e, "address server unreachable; keeping the last list"),
                Err(e) => {
                    failures += 1;
                    if failures.is_power_of_two() {
                        warn!(error = %e, failures, "no configserver list yet: the address server cannot be reached");
                    }
                }
            }
            let wait = if tx.borrow().is_empty() {
                backoff.delay(failures.saturating_sub(1), &mut rand::rng()).min(refresh)
            } else {
                refresh
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.cancelled() => return,
                _ = tx.closed() => return,
            }
        }
    });
    Ok((rx, AbortOnDropHandle::new(task)))
}

/// The body of a chunked transfer, if well formed.
fn dechunk(mut rest: &[u8]) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = rest.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&rest[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Some(body);
        }
        body.extend_from_slice(rest.get(..size)?);
        rest = rest.get(size + 2..)?;
    }
}

/// The servers a list names: one `host:port` a line; blank lines and
/// lines starting with `#` are skipped; duplicates are named once.
///
/// # Errors
///
/// A line that is not `host:port` (naming it), or too many servers.
pub fn parse_list(body: &str) -> Result<Vec<String>, String> {
    let mut servers: Vec<String> = Vec::new();
    for line in body.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let ok = line
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
        if !ok || line.len() > 300 {
            return Err(format!("line {line:?} is not host:port"));
        }
        if !servers.iter().any(|s| s == line) {
            servers.push(line.to_owned());
        }
        if servers.len() > MAX_SERVERS {
            return Err(format!("more than {MAX_SERVERS} servers"));
        }
    }
    Ok(servers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_to_host_port_and_path() {
        let a = AddressServer::parse("http://10.0.0.1:8080/api/cluster/servers").unwrap();
        assert_eq!(
            (a.host.as_str(), a.port, a.path.as_str()),
            ("10.0.0.1", 8080, "/api/cluster/servers")
        );
        let a = AddressServer::parse("http://addr.example").unwrap();
        assert_eq!((a.host.as_str(), a.port, a.path.as_str()), ("addr.example", 80, "/"));
        for bad in ["https://x/", "x:1", "http://:80/", "http://h:99999/", "http://h/a b"] {
            assert!(
                matches!(AddressServer::parse(bad), Err(AddressServerError::BadUrl(u)) if u == bad),
                "{bad}"
            );
        }
    }

    #[test]
    fn lists_skip_blanks_and_comments_and_name_bad_lines() {
        assert_eq!(
            parse_list("# servers\n127.0.0.1:9600\n\n 127.0.0.2:9600 \n127.0.0.1:9600\n").unwrap(),
            vec!["127.0.0.1:9600", "127.0.0.2:9600"]
        );
        let e = parse_list("127.0.0.1:9600\nnot-an-address\n").unwrap_err();
        assert!(e.contains("not-an-address"), "{e}");
    }

    #[test]
    fn bodies_by_length_by_chunks_and_to_the_close() {
        let a = AddressServer::parse("http://h:1/").unwrap();
        let by_length = b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nh:1\nh:2\nxx";
        assert_eq!(a.body(by_length).unwrap(), "h:1\nh:2\nx");
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nh:1\n\r\n4\r\nh:2\n\r\n0\r\n\r\n";
        assert_eq!(a.body(chunked).unwrap(), "h:1\nh:2\n");
        let closed = b"HTTP/1.0 200 OK\r\n\r\nh:3\n";
        assert_eq!(a.body(closed).unwrap(), "h:3\n");
        assert!(matches!(
            a.body(b"HTTP/1.1 404 Not Found\r\n\r\n"),
            Err(AddressServerError::Status { status: 404, .. })
        ));
    }
}
