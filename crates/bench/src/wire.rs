//! Bytes on the wire of a server's TCP connections, as the kernel counts
//! them per socket.
//!
//! `ss -ti` reports, for each established socket, `bytes_sent` and
//! `bytes_received`: TCP payload bytes (no headers, no retransmissions
//! counted twice). Summing them over every socket whose local port is the
//! server's gives all traffic between the server and its clients, both
//! directions, whatever the protocol, without a proxy in the path. A
//! connection opened and closed between two readings is missed, so the
//! benches read around phases in which connections persist.

use std::collections::HashMap;
use std::process::Command;

use anyhow::Context;

/// `bytes_sent + bytes_received` of each established connection to local
/// port `port`, keyed by the peer's address.
pub fn server_bytes(port: u16) -> anyhow::Result<HashMap<String, u64>> {
    let output = Command::new("ss")
        .args(["-tinH", "state", "established", &format!("( sport = :{port} )")])
        .output()
        .context("running `ss` (iproute2) to count bytes on the wire")?;
    anyhow::ensure!(
        output.status.success(),
        "ss failed: {}",
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(parse(&String::from_utf8_lossy(&output.stdout)))
}

/// Parses `ss -tinH state established` output: a line per socket
/// (`Recv-Q Send-Q local peer`), then an indented line of TCP info.
fn parse(text: &str) -> HashMap<String, u64> {
    let mut sockets = HashMap::new();
    let mut peer: Option<String> = None;
    for line in text.lines() {
        if !line.starts_with(char::is_whitespace) {
            peer = line.split_whitespace().nth(3).map(str::to_owned);
            if let Some(peer) = &peer {
                sockets.insert(peer.clone(), 0);
            }
            continue;
        }
        let Some(peer) = &peer else { continue };
        let bytes: u64 = line
            .split_whitespace()
            .filter_map(|field| {
                field
                    .strip_prefix("bytes_sent:")
                    .or_else(|| field.strip_prefix("bytes_received:"))
            })
            .filter_map(|v| v.parse::<u64>().ok())
            .sum();
        *sockets.entry(peer.clone()).or_default() += bytes;
    }
    sockets
}

/// Bytes moved between two readings, over the connections in `after`
/// (a connection new since `before` counts from zero).
pub fn delta(before: &HashMap<String, u64>, after: &HashMap<String, u64>) -> u64 {
    after
        .iter()
        .map(|(peer, &bytes)| bytes.saturating_sub(before.get(peer).copied().unwrap_or(0)))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_sent_and_received_per_connection() {
        let text = "0      0      127.0.0.1:2379 127.0.0.1:40460\n\t cubic bytes_sent:100 bytes_acked:100 bytes_received:25 segs_out:3\n0      0      [::ffff:127.0.0.1]:2181 [::ffff:127.0.0.1]:40462\n\t cubic wscale:10,10 rto:200\n";
        let sockets = parse(text);
        assert_eq!(sockets["127.0.0.1:40460"], 125);
        assert_eq!(sockets["[::ffff:127.0.0.1]:40462"], 0);
        let after = HashMap::from([("127.0.0.1:40460".to_owned(), 200), ("x".to_owned(), 7)]);
        assert_eq!(delta(&sockets, &after), 75 + 7);
    }
}
