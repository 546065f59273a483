//! `ping` through the tunnel and its summary.

use crate::netns::Netns;
use anyhow::{anyhow, bail, Context, Result};
use std::net::IpAddr;
use std::time::Duration;

/// The summary lines of iputils `ping`.
#[derive(Debug, Clone, PartialEq)]
pub struct PingSummary {
    pub transmitted: u32,
    pub received: u32,
    pub rtt_min_ms: Option<f64>,
    pub rtt_avg_ms: Option<f64>,
    pub rtt_max_ms: Option<f64>,
}

impl PingSummary {
    pub fn all_replied(&self) -> bool {
        self.transmitted > 0 && self.received == self.transmitted
    }
}

/// Parses "N packets transmitted, M received, ..." and "rtt min/avg/max/mdev = a/b/c/d ms".
pub fn parse_ping_summary(text: &str) -> Result<PingSummary> {
    let counts_line = text
        .lines()
        .find(|line| line.contains("packets transmitted"))
        .ok_or_else(|| anyhow!("no 'packets transmitted' line in ping output:\n{text}"))?;
    let count_before = |suffix: &str| -> Result<u32> {
        let part = counts_line
            .split(',')
            .map(str::trim)
            .find(|part| part.ends_with(suffix))
            .ok_or_else(|| anyhow!("no '{suffix}' in {counts_line:?}"))?;
        let number = part.trim_end_matches(suffix).trim();
        number
            .parse()
            .with_context(|| format!("bad count {number:?} in {counts_line:?}"))
    };
    let mut summary = PingSummary {
        transmitted: count_before("packets transmitted")?,
        received: count_before("received")?,
        rtt_min_ms: None,
        rtt_avg_ms: None,
        rtt_max_ms: None,
    };
    if let Some(rtt_line) = text.lines().find(|line| line.contains("min/avg/max")) {
        let values: Vec<f64> = rtt_line
            .split('=')
            .nth(1)
            .unwrap_or_default()
            .trim()
            .trim_end_matches("ms")
            .trim()
            .split('/')
            .filter_map(|value| value.parse().ok())
            .collect();
        if let [min, avg, max, ..] = values[..] {
            summary.rtt_min_ms = Some(min);
            summary.rtt_avg_ms = Some(avg);
            summary.rtt_max_ms = Some(max);
        }
    }
    Ok(summary)
}

/// Sends exactly `count` echo requests, 0.2 s apart, from inside `netns` (from `source` if
/// given) to `destination`, and waits up to 2 s for the replies. Lost replies are not an error;
/// the summary says how many came back.
pub fn ping(
    netns: &Netns,
    source: Option<IpAddr>,
    destination: IpAddr,
    count: u32,
) -> Result<PingSummary> {
    // No -w: with a deadline, iputils counts *replies* and keeps sending until it has `count`.
    let count = count.to_string();
    let mut args = vec!["-c", count.as_str(), "-W", "2"];
    let source = source.map(|source| source.to_string());
    if let Some(source) = &source {
        args.extend(["-I", source.as_str()]);
    }
    run_ping(netns, &args, destination, Duration::from_secs(60))
}

/// Pings `destination` from inside `netns` every 0.2 s until the first reply, for at most
/// `deadline_s` seconds (a fresh tunnel needs a handshake first). The summary has
/// `received == 0` if nothing came back.
pub fn ping_until_reply(
    netns: &Netns,
    destination: IpAddr,
    deadline_s: u32,
) -> Result<PingSummary> {
    let deadline = deadline_s.to_string();
    run_ping(
        netns,
        &["-c", "1", "-w", &deadline],
        destination,
        Duration::from_secs(u64::from(deadline_s) + 10),
    )
}

fn run_ping(
    netns: &Netns,
    options: &[&str],
    destination: IpAddr,
    timeout: Duration,
) -> Result<PingSummary> {
    let destination = destination.to_string();
    let mut args = vec!["ping", "-n", "-q", "-i", "0.2"];
    args.extend_from_slice(options);
    args.push(&destination);
    let output = netns.exec_output(&args, timeout)?;
    // Exit code 1 means "some replies missing": still a valid summary. 2 is a real error.
    if output.code == Some(2) || output.code.is_none() {
        bail!("ping could not run: {output}");
    }
    parse_ping_summary(&output.stdout).with_context(|| format!("{output}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ping_summaries() {
        let text =
            "PING 10.0.0.2 (10.0.0.2) 56(84) bytes of data.\n\n--- 10.0.0.2 ping statistics ---\n\
                    3 packets transmitted, 2 received, 33.3333% packet loss, time 402ms\n\
                    rtt min/avg/max/mdev = 0.393/0.497/0.634/0.100 ms\n";
        let summary = parse_ping_summary(text).expect("parses");
        assert_eq!(summary.transmitted, 3);
        assert_eq!(summary.received, 2);
        assert_eq!(summary.rtt_avg_ms, Some(0.497));
        assert!(!summary.all_replied());

        let lost = "--- fd01::2 ping statistics ---\n3 packets transmitted, 0 received, +3 errors, 100% packet loss, time 410ms\n";
        let summary = parse_ping_summary(lost).expect("parses");
        assert_eq!((summary.transmitted, summary.received), (3, 0));
        assert_eq!(summary.rtt_avg_ms, None);
    }
}
