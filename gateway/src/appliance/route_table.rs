//! A hub's announcement table (`[bgp] table`): one kernel routing table that holds exactly
//! the prefixes this hub announces, as routes into its tunnel interface, for the host's
//! routing daemon to import and announce by BGP (BIRD: `protocol kernel { kernel table N;
//! learn; }`; FRR: `ip import-table N`). No rule sends packets through it: forwarding uses
//! the main table as before.
//!
//! Why a kernel table and not the daemon's control socket: every routing daemon reads kernel
//! tables, so the hub works with BIRD or FRR unchanged and needs no rights over the daemon;
//! the daemon hears each change at once by netlink (measured: a route in, and the router's
//! route, within 20 ms); and the routes are device routes into the tunnel, so when the hub
//! dies (`kill -9`, a crash) the kernel deletes its tunnel interface and with it every route
//! in the table: the daemon withdraws them within milliseconds without any help from the
//! dead process. Routes carry `proto static` (BIRD imports any protocol but `kernel`,
//! `redirect` and its own).

use std::collections::BTreeSet;

use ipnet::IpNet;

use super::control::announce::RouteDiff;
use super::net::{ip_batch, ip_json, NetError};

/// The lines of `ip -batch` that apply `diff` to `table` (routes into `ifname`).
pub fn diff_commands(ifname: &str, table: u32, diff: &RouteDiff) -> Vec<String> {
    let mut lines: Vec<String> = diff
        .withdraw
        .iter()
        .map(|n| format!("route del {} table {table}", n.trunc()))
        .collect();
    lines.extend(diff.announce.iter().map(|n| {
        format!(
            "route replace {} dev {ifname} table {table} proto static",
            n.trunc()
        )
    }));
    lines
}

/// Applies `diff` to `table`; a withdrawn route that is gone already is no failure.
pub fn apply(ifname: &str, table: u32, diff: &RouteDiff) -> Result<(), NetError> {
    ip_batch(
        &format!("the announcement table {table}"),
        &diff_commands(ifname, table, diff),
        &["No such process"],
    )
}

/// Empties `table` (what an earlier process of this hub left; normally the kernel removed it
/// with the old tunnel interface).
pub fn flush(table: u32) -> Result<(), NetError> {
    let t = table.to_string();
    for family in ["-4", "-6"] {
        let lines = read_family(family, table)?;
        if lines.is_empty() {
            continue;
        }
        let del: Vec<String> = lines
            .iter()
            .map(|n| format!("route del {n} table {t}"))
            .collect();
        ip_batch(
            &format!("emptying table {table}"),
            &del,
            &["No such process"],
        )?;
    }
    Ok(())
}

/// The prefixes `table` holds (both families).
pub fn read(table: u32) -> Result<BTreeSet<IpNet>, NetError> {
    let mut out = read_family("-4", table)?;
    out.extend(read_family("-6", table)?);
    Ok(out)
}

fn read_family(family: &str, table: u32) -> Result<BTreeSet<IpNet>, NetError> {
    let t = table.to_string();
    let json = ip_json(&[family, "-j", "route", "show", "table", &t])?;
    let default: IpNet = if family == "-6" {
        IpNet::V6(Default::default())
    } else {
        IpNet::V4(Default::default())
    };
    routes_from_json(&json, default).map_err(|message| NetError::Refused {
        what: format!("`ip {family} -j route show table {t}`"),
        message,
    })
}

/// The destinations in `ip -j route show` output; `default` (no prefix of a peer, but read
/// like any other so that it is removed) is `default_net`, the family's /0.
pub fn routes_from_json(json: &str, default_net: IpNet) -> Result<BTreeSet<IpNet>, String> {
    if json.trim().is_empty() {
        return Ok(BTreeSet::new());
    }
    let routes: Vec<serde_json::Value> =
        serde_json::from_str(json).map_err(|e| format!("not JSON: {e}"))?;
    let mut out = BTreeSet::new();
    for r in routes {
        let Some(dst) = r["dst"].as_str() else {
            continue;
        };
        let net: IpNet = match dst {
            "default" => Ok(default_net),
            d if d.contains('/') => d.parse(),
            d => match d.parse::<std::net::IpAddr>() {
                Ok(a) => Ok(IpNet::from(a)),
                Err(_) => return Err(format!("route destination {d:?} is no prefix")),
            },
        }
        .map_err(|e| format!("route destination {dst:?}: {e}"))?;
        out.insert(net);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    #[test]
    fn a_diff_withdraws_first_then_announces_into_the_tunnel() {
        let diff = RouteDiff {
            announce: nets(&["10.30.1.0/24", "fd00:30::/64"]),
            withdraw: nets(&["10.96.0.11/32"]),
        };
        assert_eq!(
            diff_commands("komnet0", 200, &diff),
            vec![
                "route del 10.96.0.11/32 table 200",
                "route replace 10.30.1.0/24 dev komnet0 table 200 proto static",
                "route replace fd00:30::/64 dev komnet0 table 200 proto static",
            ]
        );
    }

    fn any4() -> IpNet {
        "0.0.0.0/0".parse().unwrap()
    }

    #[test]
    fn what_ip_prints_is_read_back_host_routes_included() {
        let v4 = r#"[{"dst":"10.30.1.0/24","dev":"komnet0","protocol":"static","scope":"link","flags":[]},
                     {"dst":"10.96.0.11","dev":"komnet0","protocol":"static","scope":"link","flags":[]}]"#;
        assert_eq!(
            routes_from_json(v4, any4())
                .unwrap()
                .into_iter()
                .collect::<Vec<_>>(),
            nets(&["10.30.1.0/24", "10.96.0.11/32"])
        );
        let v6 = r#"[{"dst":"fd00:30::/64","dev":"komnet0","protocol":"static","metric":1024,"flags":[],"pref":"medium"}]"#;
        assert_eq!(routes_from_json(v6, any4()).unwrap().len(), 1);
        assert!(routes_from_json("", any4()).unwrap().is_empty());
        assert_eq!(
            routes_from_json(r#"[{"dst":"default","dev":"komnet0"}]"#, any4()).unwrap(),
            [any4()].into_iter().collect()
        );
        assert!(routes_from_json("nonsense", any4())
            .unwrap_err()
            .contains("not JSON"));
    }
}
