//! Home-office output for the stock WireGuard app: a wg-quick configuration, and the same text
//! as a QR code for the terminal and as a PNG (the mobile apps import either).

use std::fmt::Write as _;

use komnet_proto::api::{EnrollResponse, HubPeer};

#[derive(Debug, thiserror::Error)]
pub enum HomeOfficeError {
    #[error("no hub is enrolled yet, so there is no peer to put in the configuration")]
    NoHub,
    #[error(
        "no enrolled hub has an endpoint (hubs: {hubs}): set SITE = \"host:port\" under \
         [hub_endpoints] in enroll.toml"
    )]
    NoHubEndpoint { hubs: String },
    #[error("QR code: {0}")]
    Qr(String),
    #[error("PNG: {0}")]
    Png(String),
}

/// The wg-quick configuration. `private_key` is `None` when the user brought their own key
/// pair: the file then says where the private key goes. The peer is the first hub (by site)
/// with an endpoint: a key and an endpoint of different hubs would never complete a handshake.
pub fn wg_quick_config(
    enrollment: &EnrollResponse,
    private_key: Option<&str>,
) -> Result<String, HomeOfficeError> {
    let id = &enrollment.identity;
    if enrollment.hubs.is_empty() {
        return Err(HomeOfficeError::NoHub);
    }
    let mut hubs: Vec<&HubPeer> = enrollment.hubs.iter().collect();
    hubs.sort_by(|a, b| a.site.cmp(&b.site));
    let (hub, endpoint) = hubs
        .iter()
        .find_map(|h| Some((*h, h.endpoint.as_deref()?)))
        .ok_or_else(|| HomeOfficeError::NoHubEndpoint {
            hubs: hubs
                .iter()
                .map(|h| h.site.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })?;
    let mut out = String::new();
    let addrs = id
        .tunnel_addrs
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let until = time::OffsetDateTime::from_unix_timestamp(id.not_after)
        .map(|t| t.date().to_string())
        .unwrap_or_else(|_| id.not_after.to_string());
    let _ = writeln!(
        out,
        "# komnet home office: tenant {}, user {}, serial {}, valid until {until}",
        id.tenant, id.site, id.serial
    );
    let _ = writeln!(out, "[Interface]");
    match private_key {
        Some(k) => {
            let _ = writeln!(out, "PrivateKey = {k}");
        }
        None => {
            let _ = writeln!(
                out,
                "# PrivateKey = <the private key of {}, which never left your device>",
                id.wg_public_key
            );
        }
    }
    let _ = writeln!(out, "Address = {addrs}");
    let _ = writeln!(out);
    let _ = writeln!(out, "[Peer]");
    let _ = writeln!(out, "# hub {}", hub.site);
    let _ = writeln!(out, "PublicKey = {}", hub.wg_public_key);
    let _ = writeln!(out, "Endpoint = {endpoint}");
    let allowed = enrollment
        .allowed_ips
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let _ = writeln!(out, "AllowedIPs = {allowed}");
    let _ = writeln!(out, "PersistentKeepalive = 25");
    Ok(out)
}

fn qr(text: &str) -> Result<qrcode::QrCode, HomeOfficeError> {
    qrcode::QrCode::with_error_correction_level(text.as_bytes(), qrcode::EcLevel::L)
        .map_err(|e| HomeOfficeError::Qr(e.to_string()))
}

/// The QR code drawn with Unicode half blocks, two modules per character cell.
pub fn qr_terminal(text: &str) -> Result<String, HomeOfficeError> {
    Ok(qr(text)?
        .render::<qrcode::render::unicode::Dense1x2>()
        .dark_color(qrcode::render::unicode::Dense1x2::Light)
        .light_color(qrcode::render::unicode::Dense1x2::Dark)
        .quiet_zone(true)
        .build())
}

/// The QR code as a grayscale PNG, 8 pixels per module with a 4-module quiet zone.
pub fn qr_png(text: &str) -> Result<Vec<u8>, HomeOfficeError> {
    const SCALE: usize = 8;
    const QUIET: usize = 4;
    let code = qr(text)?;
    let width = code.width();
    let colors = code.to_colors();
    let side = (width + 2 * QUIET) * SCALE;
    let mut pixels = vec![255u8; side * side];
    for (i, color) in colors.iter().enumerate() {
        if *color != qrcode::Color::Dark {
            continue;
        }
        let (mx, my) = (i % width + QUIET, i / width + QUIET);
        for y in my * SCALE..(my + 1) * SCALE {
            pixels[y * side + mx * SCALE..y * side + (mx + 1) * SCALE].fill(0);
        }
    }
    let mut out = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut out, side as u32, side as u32);
        encoder.set_color(png::ColorType::Grayscale);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder
            .write_header()
            .map_err(|e| HomeOfficeError::Png(e.to_string()))?;
        writer
            .write_image_data(&pixels)
            .map_err(|e| HomeOfficeError::Png(e.to_string()))?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use komnet_proto::identity::{Identity, Role, SiteId, TenantId, WgPublicKey};

    fn hub(site: &str, key: u8, endpoint: Option<&str>) -> HubPeer {
        HubPeer {
            site: SiteId::parse(site).unwrap(),
            wg_public_key: WgPublicKey::from_bytes([key; 32]).unwrap(),
            tunnel_addrs: vec![],
            endpoint: endpoint.map(str::to_owned),
        }
    }

    fn response(hubs: Vec<HubPeer>) -> EnrollResponse {
        EnrollResponse {
            identity: Identity {
                tenant: TenantId::parse("musterstadt").unwrap(),
                site: SiteId::parse("anna").unwrap(),
                role: Role::HomeOffice,
                wg_public_key: WgPublicKey::from_bytes([3; 32]).unwrap(),
                tunnel_addrs: vec!["10.250.20.1/32".parse().unwrap()],
                not_after: 2_000_000_000,
                serial: "01".into(),
                admitted_until: None,
            },
            certificate_chain_pem: String::new(),
            renew_after: 0,
            hub_endpoints: hubs.iter().filter_map(|h| h.endpoint.clone()).collect(),
            hubs,
            allowed_ips: vec!["10.0.0.0/8".parse().unwrap()],
            policy_version: 7,
        }
    }

    #[test]
    fn the_peer_is_the_first_hub_by_site_that_has_an_endpoint() {
        // Listed out of order; hub1 has no endpoint, so hub2 (key 22) is the peer.
        let r = response(vec![
            hub("hub3", 33, Some("192.0.2.3:51820")),
            hub("hub1", 11, None),
            hub("hub2", 22, Some("192.0.2.2:51820")),
        ]);
        let conf = wg_quick_config(&r, None).unwrap();
        let key = WgPublicKey::from_bytes([22; 32]).unwrap();
        assert!(conf.contains(&format!("PublicKey = {key}")), "{conf}");
        assert!(conf.contains("Endpoint = 192.0.2.2:51820"), "{conf}");
        assert!(conf.contains("# hub hub2"), "{conf}");
        assert!(conf.contains("# PrivateKey = <"), "{conf}");
    }

    #[test]
    fn without_any_hub_endpoint_there_is_no_configuration() {
        let e = wg_quick_config(&response(vec![hub("hub1", 11, None)]), None).unwrap_err();
        assert!(matches!(e, HomeOfficeError::NoHubEndpoint { .. }), "{e}");
        assert!(e.to_string().contains("hub1"), "{e}");
        let e = wg_quick_config(&response(vec![]), None).unwrap_err();
        assert!(matches!(e, HomeOfficeError::NoHub), "{e}");
    }
}
