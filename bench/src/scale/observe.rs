//! What the relay says about itself: its `/metrics` (the lease operation's latency, which only
//! the relay can measure) and its log's warnings (why a run stalled).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Context, Result};

use super::results::Percentiles;

/// The relay's `/metrics` text (HTTP/1.0, so the body is neither chunked nor kept alive).
fn scrape(admin: SocketAddr) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&admin, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("no HTTP header in the metrics answer")?;
    anyhow::ensure!(head.contains(" 200 "), "metrics: {head}");
    Ok(body.to_string())
}

/// p50/p99 of the relay's `jumpgate_placement_seconds`, if it exports it.
pub(crate) fn placement(admin: SocketAddr) -> Option<Percentiles> {
    let text = scrape(admin)
        .inspect_err(|e| eprintln!("cannot read the relay's metrics: {e:#}"))
        .ok()?;
    let buckets = histogram(&text, "jumpgate_placement_seconds");
    Some(Percentiles {
        p50_ms: quantile(&buckets, 0.5)? * 1e3,
        p99_ms: quantile(&buckets, 0.99)? * 1e3,
    })
}

/// A histogram's cumulative buckets (upper bound in seconds, count), `+Inf` last.
fn histogram(text: &str, name: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{name}_bucket{{le=\"");
    let mut out: Vec<(f64, f64)> = text
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&prefix)?;
            let (le, count) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, count.trim().parse().ok()?))
        })
        .collect();
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out
}

/// The `q` quantile of cumulative `buckets`, interpolated linearly within the bucket it falls
/// in (as Prometheus' `histogram_quantile`); the last finite bound if it falls in `+Inf`.
fn quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let (mut lower, mut below) = (0.0, 0.0);
    for &(bound, count) in buckets {
        if count >= rank {
            if bound.is_infinite() {
                return Some(lower);
            }
            let width = count - below;
            let within = if width > 0.0 {
                (rank - below) / width
            } else {
                1.0
            };
            return Some(lower + (bound - lower) * within);
        }
        (lower, below) = (bound, count);
    }
    Some(lower)
}

/// The first distinct WARN/ERROR messages of a relay log (timestamps cut), with their counts.
pub(crate) fn warnings(log: &str) -> Vec<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut order = Vec::new();
    for line in log.lines() {
        let Some(at) = line.find(" WARN ").or_else(|| line.find(" ERROR ")) else {
            continue;
        };
        let message: String = line[at..].chars().take(300).collect();
        let count = seen.entry(message.clone()).or_default();
        if *count == 0 && order.len() < 8 {
            order.push(message);
        }
        *count += 1;
    }
    // Errors first: they say why a run stalled; warnings may be a flood of consequences.
    order.sort_by_key(|m| !m.trim_start().starts_with("ERROR"));
    order
        .into_iter()
        .map(|m| format!("{}x {}", seen.get(&m).copied().unwrap_or(0), m.trim()))
        .collect()
}

#[cfg(test)]
mod tests;
