//! What configuration files share: durations written as `90s`/`30m`/`24h`/`7d`, the error a
//! configuration file is refused with (naming the file), and the checks of values that appear
//! in more than one program's configuration (policy keys, `host:port` endpoints).

use std::path::PathBuf;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {}", .problems.join("; "))]
    Invalid {
        path: PathBuf,
        problems: Vec<String>,
    },
}

/// A duration written as `90s`, `30m`, `24h` or `7d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(|| format!("duration {text:?} needs a unit (s, m, h, d)"))?;
        let (num, unit) = text.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("duration {text:?} does not start with a number"))?;
        let secs = match unit {
            "s" => n,
            "m" => n.saturating_mul(60),
            "h" => n.saturating_mul(3600),
            "d" => n.saturating_mul(86_400),
            _ => return Err(format!("duration {text:?}: unit must be s, m, h or d")),
        };
        Ok(HumanDuration(Duration::from_secs(secs)))
    }
}

impl std::str::FromStr for HumanDuration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let secs = self.0.as_secs();
        let text = if secs.is_multiple_of(86_400) && secs > 0 {
            format!("{}d", secs / 86_400)
        } else if secs.is_multiple_of(3600) && secs > 0 {
            format!("{}h", secs / 3600)
        } else if secs.is_multiple_of(60) && secs > 0 {
            format!("{}m", secs / 60)
        } else {
            format!("{secs}s")
        };
        s.serialize_str(&text)
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        Self::parse(&raw).map_err(serde::de::Error::custom)
    }
}

/// Decodes a policy public key: base64 of a raw 32-byte Ed25519 key, surrounding whitespace
/// ignored (the `.pub` file ends in a newline).
pub fn decode_policy_public_key(text: &str) -> Result<Vec<u8>, String> {
    let bytes = STANDARD
        .decode(text.trim())
        .map_err(|e| format!("not base64 ({e})"))?;
    if bytes.len() != 32 {
        return Err(format!(
            "{} bytes; an Ed25519 public key has 32 (use the .pub file of `komnet policy keygen`)",
            bytes.len()
        ));
    }
    Ok(bytes)
}

/// Checks a `host:port` endpoint: a port number and a non-empty host (IPv6 in brackets).
pub fn check_endpoint(endpoint: &str) -> Result<(), String> {
    let (host, port) = endpoint
        .rsplit_once(':')
        .ok_or_else(|| format!("{endpoint:?} is not host:port"))?;
    port.parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{endpoint:?}: port {port:?} is not a number from 1 to 65535"))?;
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if bare.is_empty() || bare.contains(char::is_whitespace) {
        return Err(format!("{endpoint:?}: no host"));
    }
    if bare.contains(':') && bare == host {
        return Err(format!(
            "{endpoint:?}: write an IPv6 address in brackets, e.g. [2001:db8::1]:51820"
        ));
    }
    Ok(())
}

/// Checks a network interface name, the one rule for every name komnet takes (the daemon's
/// command line, gateway.toml's `interface` and `lan`, the nftables compiler): 1 to 15 bytes
/// (Linux's IFNAMSIZ less the NUL), of the characters wg-quick allows (`a-z A-Z 0-9 - _ . = +`),
/// and not `.` or `..`. Names end up in paths, `ip` and `nft` commands, so nothing else passes.
///
/// ```
/// use komnet_proto::config::check_interface_name;
/// assert!(check_interface_name("wg0").is_ok());
/// assert!(check_interface_name("wg/0").is_err());
/// ```
pub fn check_interface_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 15 {
        return Err(format!(
            "interface name {name:?} must be 1 to 15 bytes long"
        ));
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '=' | '+');
    if name == "." || name == ".." || !name.chars().all(allowed) {
        return Err(format!(
            "interface name {name:?} contains a character Linux does not allow or komnet refuses \
             (use a-z, A-Z, 0-9, '-', '_', '.', '=', '+')"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_and_print_in_the_largest_unit() {
        assert_eq!(HumanDuration::parse("7d").unwrap().0.as_secs(), 7 * 86_400);
        assert_eq!(HumanDuration::parse("90m").unwrap().0.as_secs(), 5400);
        assert!(HumanDuration::parse("7").is_err());
        assert!(HumanDuration::parse("7w").is_err());
        assert!(HumanDuration::parse("h").is_err());
        let shown = toml::Value::try_from(HumanDuration(Duration::from_secs(7200))).unwrap();
        assert_eq!(shown.as_str(), Some("2h"));
        let shown = toml::Value::try_from(HumanDuration(Duration::from_secs(90))).unwrap();
        assert_eq!(shown.as_str(), Some("90s"));
    }

    #[test]
    fn interface_names_follow_one_rule() {
        for good in [
            "wg0",
            "komnet1",
            "eth0.100",
            "br-lan",
            "a",
            "wg_a=b+c",
            "x23456789012345",
        ] {
            assert_eq!(check_interface_name(good), Ok(()), "{good}");
        }
        for (bad, why) in [
            ("", "1 to 15"),
            ("x234567890123456", "1 to 15"),
            ("wg/0", "does not allow"),
            ("wg 0", "does not allow"),
            ("wg:0", "does not allow"),
            ("wg\"0", "does not allow"),
            ("wgä", "does not allow"),
            ("..", "does not allow"),
            (".", "does not allow"),
        ] {
            let e = check_interface_name(bad).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }

    #[test]
    fn policy_keys_and_endpoints_are_checked() {
        assert_eq!(
            decode_policy_public_key(&STANDARD.encode([1u8; 32]))
                .unwrap()
                .len(),
            32
        );
        assert!(decode_policy_public_key(&STANDARD.encode([1u8; 31]))
            .unwrap_err()
            .contains("31 bytes"));
        check_endpoint("192.0.2.1:51820").unwrap();
        check_endpoint("[2001:db8::1]:51820").unwrap();
        assert!(check_endpoint("2001:db8::1:51820").is_err());
        assert!(check_endpoint("host:0").is_err());
        assert!(check_endpoint(":51820").is_err());
    }
}
