//! A provider address with a connection that comes back after it drops.
//!
//! Reconnection is lazy and single-flight: the first call after a drop makes
//! one connect attempt while concurrent calls wait for its outcome. After a
//! failed attempt the endpoint backs off (exponential, with jitter, see
//! [`crate::Backoff`]); calls during the back-off fail at once with a retryable
//! [`Error::Connect`] so the cluster layer can try another provider instead of
//! waiting. No background task is involved, so an unused endpoint costs
//! nothing.

use std::net::SocketAddr;
use std::sync::Mutex;

use rand::SeedableRng;
use rand::rngs::SmallRng;
use tokio::time::Instant;

use crate::balance::Load;
use crate::{Connection, ConnectionConfig, Error};

#[derive(Debug)]
pub struct Endpoint {
    addr: SocketAddr,
    config: ConnectionConfig,
    current: Mutex<Option<Connection>>,
    reconnect: tokio::sync::Mutex<Reconnect>,
    load: Load,
    breaker: Mutex<Breaker>,
}

/// Consecutive-failure circuit breaking (used when the consumer enables it).
#[derive(Debug, Default)]
struct Breaker {
    consecutive: u32,
    ejections: u32,
    open_until: Option<Instant>,
}

/// First ejection period; it doubles with each ejection in a row, up to
/// [`MAX_EJECTION`].
const BASE_EJECTION: std::time::Duration = std::time::Duration::from_secs(1);
const MAX_EJECTION: std::time::Duration = std::time::Duration::from_secs(30);

#[derive(Debug)]
struct Reconnect {
    failures: u32,
    retry_at: Option<Instant>,
    /// When the last connection was made.
    connected_at: Option<Instant>,
    rng: SmallRng,
}

/// A connection that closes sooner than this after it was made counts as a
/// failed attempt: a provider that accepts and then resets is backed off
/// like one that refuses.
const STABLE_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

impl Endpoint {
    pub fn new(addr: SocketAddr, config: ConnectionConfig) -> Endpoint {
        Endpoint {
            addr,
            config,
            current: Mutex::new(None),
            load: Load::default(),
            breaker: Mutex::new(Breaker::default()),
            reconnect: tokio::sync::Mutex::new(Reconnect {
                failures: 0,
                retry_at: None,
                connected_at: None,
                rng: SmallRng::from_os_rng(),
            }),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// This consumer's calls to the provider: in flight, latency.
    pub fn load(&self) -> &Load {
        &self.load
    }

    /// The live connection, if there is one (no connect attempt).
    pub fn current(&self) -> Option<Connection> {
        let current = self.current.lock().expect("endpoint lock");
        current.as_ref().filter(|c| !c.is_closed()).cloned()
    }

    /// Whether the endpoint is backing off after failed connects: such a
    /// provider is set aside by the consumer until its next attempt is due.
    pub fn is_backing_off(&self) -> bool {
        let ejected = self.breaker.lock().expect("breaker lock").open_until;
        if ejected.is_some_and(|until| Instant::now() < until) {
            return true;
        }
        if self.current().is_some() {
            return false;
        }
        let now = Instant::now();
        match self.reconnect.try_lock() {
            // Backing off, or the last connection was reset soon after it
            // was made (the back-off starts with the next attempt).
            Ok(state) => {
                state.retry_at.is_some_and(|at| now < at)
                    || state.connected_at.is_some_and(|at| now - at < STABLE_AFTER)
            }
            // A connect attempt is under way: not set aside.
            Err(_) => false,
        }
    }

    /// Records a call's outcome for circuit breaking: after `threshold`
    /// failures in a row the endpoint is set aside for an ejection period
    /// (1 s, doubling per ejection in a row, at most 30 s); the first call
    /// after it is the probe, and a success closes the circuit.
    pub fn record_outcome(&self, healthy: bool, threshold: u32) {
        let mut breaker = self.breaker.lock().expect("breaker lock");
        if healthy {
            *breaker = Breaker::default();
            return;
        }
        breaker.consecutive += 1;
        if breaker.consecutive >= threshold.max(1) {
            let period = BASE_EJECTION
                .saturating_mul(1 << breaker.ejections.min(5))
                .min(MAX_EJECTION);
            breaker.open_until = Some(Instant::now() + period);
            breaker.ejections += 1;
            breaker.consecutive = 0;
            tracing::warn!(addr = %self.addr, ?period, "provider ejected after consecutive failures");
        }
    }

    /// Calls pending on the current connection.
    pub fn in_flight(&self) -> usize {
        self.current().map_or(0, |c| c.in_flight())
    }

    /// The live connection, connecting first if needed.
    ///
    /// # Errors
    ///
    /// [`Error::Connect`] if the attempt fails or the endpoint is backing off
    /// after earlier failures.
    pub async fn connection(&self) -> Result<Connection, Error> {
        if let Some(conn) = self.current() {
            return Ok(conn);
        }
        let mut state = self.reconnect.lock().await;
        if let Some(conn) = self.current() {
            return Ok(conn);
        }
        let now = Instant::now();
        match state.connected_at.take() {
            Some(at) if now - at < STABLE_AFTER => {
                let failures = state.failures;
                let delay = self.config.backoff.delay(failures, &mut state.rng);
                state.failures = failures.saturating_add(1);
                state.retry_at = Some(now + delay);
                tracing::debug!(addr = %self.addr, lived = ?(now - at), ?delay, "connection reset soon after connecting; backing off");
            }
            Some(_) => state.failures = 0,
            None => {}
        }
        if let Some(at) = state.retry_at {
            let now = Instant::now();
            if now < at {
                return Err(Error::Connect {
                    addr: self.addr,
                    reason: format!("{} failed attempts; next in {:?}", state.failures, at - now),
                });
            }
        }
        match Connection::connect(self.addr, &self.config).await {
            Ok(conn) => {
                // `failures` is cleared once a connection proves stable.
                state.retry_at = None;
                state.connected_at = Some(Instant::now());
                *self.current.lock().expect("endpoint lock") = Some(conn.clone());
                Ok(conn)
            }
            Err(e) => {
                let failures = state.failures;
                let delay = self.config.backoff.delay(failures, &mut state.rng);
                state.failures = state.failures.saturating_add(1);
                state.retry_at = Some(Instant::now() + delay);
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn failed_connect_backs_off_then_retries() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let endpoint = Endpoint::new(addr, ConnectionConfig::default());
        let first = endpoint.connection().await.unwrap_err();
        assert!(!first.to_string().contains("failed attempts"), "{first}");
        let second = endpoint.connection().await.unwrap_err();
        assert!(second.to_string().contains("1 failed attempts"), "{second}");
        assert!(second.is_retryable());
    }
}
