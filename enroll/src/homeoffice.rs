//! Home-office output for the stock WireGuard app: a wg-quick configuration, and the same text
//! as a QR code for the terminal and as a PNG (the mobile apps import either).

use std::fmt::Write as _;

use crate::api::EnrollResponse;

#[derive(Debug, thiserror::Error)]
pub enum HomeOfficeError {
    #[error("no hub is enrolled yet, so there is no peer to put in the configuration")]
    NoHub,
    #[error("QR code: {0}")]
    Qr(String),
    #[error("PNG: {0}")]
    Png(String),
}

/// The wg-quick configuration. `private_key` is `None` when the user brought their own key
/// pair: the file then says where the private key goes.
pub fn wg_quick_config(
    enrollment: &EnrollResponse,
    private_key: Option<&str>,
) -> Result<String, HomeOfficeError> {
    let id = &enrollment.identity;
    let hub = enrollment.hubs.first().ok_or(HomeOfficeError::NoHub)?;
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
    if let Some(endpoint) = enrollment.hub_endpoints.first() {
        let _ = writeln!(out, "Endpoint = {endpoint}");
    }
    for other in enrollment.hub_endpoints.iter().skip(1) {
        let _ = writeln!(out, "# alternative Endpoint = {other}");
    }
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
