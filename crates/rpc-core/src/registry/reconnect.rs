//! Which ConfigServer a session tries next, and how long it waits first.
//!
//! Servers are tried in turn. A stream that was established and then ended
//! is followed by a quick retry (the backoff's first step); attempts that
//! never got a session back off further with each failure in a row, up to
//! the backoff's maximum. How loudly a failure is said depends on what it
//! was: a refusal (a bad credential) always, a server that answered but
//! opened no session (full, or not a ConfigServer) at the 1st, 2nd, 4th,
//! 8th... failure in a row, an unreachable address quietly.

use std::time::Duration;

use rand::Rng;

use super::error::StreamError;
use crate::Backoff;

/// How one attempt ended.
#[derive(Debug)]
pub(super) enum Attempt {
    /// A session was established and its stream later ended.
    Ended(StreamError),
    /// No session came of it.
    Failed(StreamError),
}

/// How loudly to say an attempt's end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Say {
    Warn,
    Debug,
}

/// The reconnect state of one session.
#[derive(Debug)]
pub(super) struct Reconnect {
    servers: Vec<String>,
    next: usize,
    /// Attempts in a row that got no session.
    failures: u32,
    backoff: Backoff,
}

impl Reconnect {
    pub(super) fn new(servers: Vec<String>, backoff: Backoff) -> Reconnect {
        Reconnect {
            servers,
            next: 0,
            failures: 0,
            backoff,
        }
    }

    /// Takes a new list of servers (from an address server): the next
    /// attempt goes to a random one of them, so that nodes spread over the
    /// cluster.
    pub(super) fn set_servers(&mut self, servers: Vec<String>, rng: &mut impl Rng) {
        if servers == self.servers {
            return;
        }
        self.next = if servers.is_empty() {
            0
        } else {
            rng.random_range(0..servers.len())
        };
        self.servers = servers;
    }

    /// The servers it takes turns over.
    pub(super) fn servers(&self) -> &[String] {
        &self.servers
    }

    /// The server to try now; `None` if none is configured.
    pub(super) fn next_server(&mut self) -> Option<String> {
        let server = self.servers.get(self.next % self.servers.len().max(1))?.clone();
        self.next = self.next.wrapping_add(1);
        Some(server)
    }

    /// Records how an attempt ended: how loudly to say it, and how long to
    /// wait before the next one.
    pub(super) fn after(&mut self, attempt: &Attempt, rng: &mut impl Rng) -> (Say, Duration) {
        let say = match attempt {
            Attempt::Ended(_) => {
                self.failures = 0;
                Say::Warn
            }
            Attempt::Failed(e) => {
                self.failures = self.failures.saturating_add(1);
                match e {
                    StreamError::Refused { .. } => Say::Warn,
                    e if e.is_unreachable() => Say::Debug,
                    _ if self.failures.is_power_of_two() => Say::Warn,
                    _ => Say::Debug,
                }
            }
        };
        (say, self.backoff.delay(self.failures.saturating_sub(1), rng))
    }

    /// Attempts in a row that got no session.
    pub(super) fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
#[path = "reconnect_tests.rs"]
mod tests;
