//! The one identity every part of komnet keys on, and the validated names it is made of.
//!
//! Values are parsed once at the edge (`TenantId::parse`, `WgPublicKey::from_base64`, ...) and
//! trusted everywhere after. The enrollment service writes an [`Identity`] into each certificate
//! (subject and the URI SANs below) and reads it back from there (`komnet-enroll`), so a hub
//! needs nothing but the certificate.

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a name, key or certificate is not a valid part of an identity.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("{what} {value:?} is not valid: {rule}")]
    InvalidName {
        what: &'static str,
        value: String,
        rule: &'static str,
    },
    #[error("role {0:?} is not one of spoke, hub, homeoffice")]
    InvalidRole(String),
    #[error("WireGuard public key is not 32 bytes of base64: {0}")]
    WgKeyEncoding(String),
    #[error("WireGuard public key is a low-order point (all-zero or small-subgroup key); such a key gives no shared secret")]
    WgKeyLowOrder,
    #[error("certificate cannot be parsed: {0}")]
    CertificateParse(String),
    #[error("certificate carries no komnet identity: {0}")]
    CertificateMissing(&'static str),
}

fn check_name(
    what: &'static str,
    value: &str,
    extra: &[char],
    rule: &'static str,
) -> Result<(), IdentityError> {
    let ok = !value.is_empty()
        && value.len() <= 63
        && value
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && value.chars().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || extra.contains(&c)
        });
    if ok {
        Ok(())
    } else {
        Err(IdentityError::InvalidName {
            what,
            value: value.chars().take(80).collect(),
            rule,
        })
    }
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $what:literal, $extra:expr, $rule:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            /// Parses and validates the name.
            pub fn parse(value: &str) -> Result<Self, IdentityError> {
                check_name($what, value, $extra, $rule)?;
                Ok(Self(value.to_owned()))
            }

            /// The name as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $name {
            type Err = IdentityError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::parse(s)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let raw = String::deserialize(d)?;
                Self::parse(&raw).map_err(serde::de::Error::custom)
            }
        }
    };
}

name_type!(
    /// A tenant (commune), e.g. `nohfelden`: 1–63 of `a-z 0-9 -`, starting with a letter or digit.
    TenantId,
    "tenant",
    &[],
    "1-63 characters of a-z, 0-9 and '-', starting with a letter or digit"
);
name_type!(
    /// A site of a tenant (a town hall, a hub, or a home-office user's device), e.g.
    /// `rathaus` or `anna.schmidt`: 1–63 of `a-z 0-9 - . _`, starting with a letter or digit.
    SiteId,
    "site",
    &['.', '_'],
    "1-63 characters of a-z, 0-9, '-', '.' and '_', starting with a letter or digit"
);

impl SiteId {
    /// As a home-office device: its device name when it belongs to the person `owner`, i.e.
    /// it is `OWNER_DEVICE` (the web console's naming; the last `_` separates them, owner
    /// names have none) or `OWNER` itself (issued from the shell for the person's name).
    pub fn device_of(&self, owner: &str) -> Option<&str> {
        let site = self.as_str();
        if site == owner {
            return Some(site);
        }
        let (o, device) = site.rsplit_once('_')?;
        (o == owner).then_some(device)
    }
}

/// What an identity may do in the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A town-hall appliance.
    Spoke,
    /// A data-centre concentrator; only hubs may follow the registry.
    Hub,
    /// A home-office device using the stock WireGuard app.
    #[serde(rename = "homeoffice")]
    HomeOffice,
}

impl Role {
    /// The role as it appears in certificates, tokens and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Spoke => "spoke",
            Role::Hub => "hub",
            Role::HomeOffice => "homeoffice",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "spoke" => Ok(Role::Spoke),
            "hub" => Ok(Role::Hub),
            "homeoffice" => Ok(Role::HomeOffice),
            other => Err(IdentityError::InvalidRole(other.chars().take(40).collect())),
        }
    }
}

/// A WireGuard (X25519) public key that is not a low-order point.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WgPublicKey([u8; 32]);

impl WgPublicKey {
    /// Accepts the 32 raw bytes unless they are a low-order point.
    ///
    /// A low-order key (all zeros, or one of the few small-subgroup points and their
    /// non-canonical encodings) makes every Diffie-Hellman result a constant, so a peer with
    /// such a key authenticates nothing. X25519 ignores the top bit, and Curve25519 has exactly
    /// these seven such u-coordinates below 2^255 (the list libsodium blocks); a test checks the
    /// list against the definition (a clamped scalar times the point is zero).
    pub fn from_bytes(bytes: [u8; 32]) -> Result<Self, IdentityError> {
        let mut masked = bytes;
        masked[31] &= 0x7f;
        if LOW_ORDER_POINTS.contains(&masked) {
            return Err(IdentityError::WgKeyLowOrder);
        }
        Ok(Self(bytes))
    }

    /// Parses the standard base64 form used by `wg` and wg-quick.
    pub fn from_base64(text: &str) -> Result<Self, IdentityError> {
        let raw = STANDARD
            .decode(text.trim())
            .map_err(|e| IdentityError::WgKeyEncoding(e.to_string()))?;
        let bytes: [u8; 32] = raw
            .try_into()
            .map_err(|v: Vec<u8>| IdentityError::WgKeyEncoding(format!("{} bytes", v.len())))?;
        Self::from_bytes(bytes)
    }

    /// The standard base64 form.
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }

    /// The raw key.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

/// Curve25519 u-coordinates of order 1, 2, 4 or 8, and their encodings plus p (top bit clear).
const LOW_ORDER_POINTS: [[u8; 32]; 7] = [
    [0; 32],
    [
        1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0, 0,
    ],
    [
        0xe0, 0xeb, 0x7a, 0x7c, 0x3b, 0x41, 0xb8, 0xae, 0x16, 0x56, 0xe3, 0xfa, 0xf1, 0x9f, 0xc4,
        0x6a, 0xda, 0x09, 0x8d, 0xeb, 0x9c, 0x32, 0xb1, 0xfd, 0x86, 0x62, 0x05, 0x16, 0x5f, 0x49,
        0xb8, 0x00,
    ],
    [
        0x5f, 0x9c, 0x95, 0xbc, 0xa3, 0x50, 0x8c, 0x24, 0xb1, 0xd0, 0xb1, 0x55, 0x9c, 0x83, 0xef,
        0x5b, 0x04, 0x44, 0x5c, 0xc4, 0x58, 0x1c, 0x8e, 0x86, 0xd8, 0x22, 0x4e, 0xdd, 0xd0, 0x9f,
        0x11, 0x57,
    ],
    [
        0xec, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0x7f,
    ],
    [
        0xed, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0x7f,
    ],
    [
        0xee, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0x7f,
    ],
];

impl FromStr for WgPublicKey {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::from_base64(s)
    }
}

impl fmt::Debug for WgPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WgPublicKey({})", self.to_base64())
    }
}

impl fmt::Display for WgPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

impl Serialize for WgPublicKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_base64())
    }
}

impl<'de> Deserialize<'de> for WgPublicKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        Self::from_base64(&raw).map_err(serde::de::Error::custom)
    }
}

/// The identity a certificate binds: who (tenant, site, role), which WireGuard key, which
/// tunnel addresses, until when, under which serial.
///
/// ```
/// # use komnet_proto::identity::*;
/// let tenant = TenantId::parse("nohfelden").unwrap();
/// assert!(TenantId::parse("Nohfelden").is_err()); // names are lower case
/// assert!(WgPublicKey::from_bytes([0; 32]).is_err()); // the all-zero key is low order
/// # let _ = tenant;
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    pub tenant: TenantId,
    pub site: SiteId,
    pub role: Role,
    pub wg_public_key: WgPublicKey,
    pub tunnel_addrs: Vec<IpNet>,
    /// Unix seconds.
    pub not_after: i64,
    /// Lower-case hex of the certificate serial number.
    pub serial: String,
    /// MFA-gated home office (a tenant with `[mfa_window]` in enroll.toml): hubs admit the
    /// peer only until this moment (Unix seconds), the end of the window its person's last
    /// sign-in with a second factor opened; absent: for as long as the certificate is valid.
    /// Not in the certificate: the registry carries it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admitted_until: Option<i64>,
}

impl Identity {
    /// Until when a hub may admit this peer: the certificate's end, or the MFA window's
    /// when that comes first.
    pub fn admitted_until(&self) -> i64 {
        self.admitted_until
            .map_or(self.not_after, |until| until.min(self.not_after))
    }
}

/// URI subject-alternative-name prefixes that carry the identity inside the certificate, next to
/// the subject (O = tenant, OU = role, CN = site). Standard SAN URIs need no private OID.
pub const SAN_IDENTITY_PREFIX: &str = "urn:komnet:identity:";
/// See [`SAN_IDENTITY_PREFIX`]; followed by the unpadded base64url WireGuard public key.
pub const SAN_WG_KEY_PREFIX: &str = "urn:komnet:wg-key:";

/// The identity URI: `urn:komnet:identity:TENANT:SITE:ROLE`.
pub fn identity_uri(tenant: &TenantId, site: &SiteId, role: Role) -> String {
    format!("{SAN_IDENTITY_PREFIX}{tenant}:{site}:{role}")
}

/// The WireGuard key URI: `urn:komnet:wg-key:BASE64URL`.
pub fn wg_key_uri(key: &WgPublicKey) -> String {
    format!(
        "{SAN_WG_KEY_PREFIX}{}",
        URL_SAFE_NO_PAD.encode(key.as_bytes())
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_with_a_message_naming_the_field() {
        assert!(TenantId::parse("nohfelden").is_ok());
        assert!(SiteId::parse("anna.schmidt").is_ok());
        let device = |s: &str, owner: &str| {
            SiteId::parse(s)
                .unwrap()
                .device_of(owner)
                .map(str::to_owned)
        };
        assert_eq!(device("anna_laptop", "anna").as_deref(), Some("laptop"));
        assert_eq!(device("anna", "anna").as_deref(), Some("anna"));
        assert_eq!(device("anna_laptop", "ann"), None);
        assert_eq!(device("hanna_laptop", "anna"), None);
        let err = TenantId::parse("bad/name").unwrap_err();
        assert!(err.to_string().contains("tenant \"bad/name\""), "{err}");
        assert!(TenantId::parse("").is_err());
        assert!(TenantId::parse(&"a".repeat(64)).is_err());
        assert!(SiteId::parse("-x").is_err());
        assert!(
            SiteId::parse("a:b").is_err(),
            "':' separates the identity URI"
        );
        assert_eq!("homeoffice".parse::<Role>(), Ok(Role::HomeOffice));
        assert!("admin".parse::<Role>().is_err());
    }

    #[test]
    fn low_order_wireguard_keys_are_rejected() {
        // The small-subgroup points of Curve25519 (from the X25519 literature), each also in a
        // non-canonical encoding (+p) where one exists.
        let low_order: [[u8; 32]; 7] = [
            [0; 32],
            {
                let mut k = [0; 32];
                k[0] = 1;
                k
            },
            hex_key("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
            hex_key("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
            hex_key("ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
            hex_key("edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
            hex_key("eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
        ];
        for key in low_order {
            assert_eq!(
                WgPublicKey::from_bytes(key),
                Err(IdentityError::WgKeyLowOrder),
                "{}",
                hex::encode(key)
            );
        }
        // The list agrees with the definition: for each listed point (also with the top bit
        // set) DH with a clamped scalar is zero; for random points it is not.
        let probe = x25519_dalek::StaticSecret::from([0x5a; 32]);
        for key in LOW_ORDER_POINTS {
            for top in [0u8, 0x80] {
                let mut k = key;
                k[31] |= top;
                let shared = probe.diffie_hellman(&x25519_dalek::PublicKey::from(k));
                assert!(!shared.was_contributory(), "{}", hex::encode(k));
                assert_eq!(
                    WgPublicKey::from_bytes(k),
                    Err(IdentityError::WgKeyLowOrder)
                );
            }
        }
        for _ in 0..1000 {
            let k: [u8; 32] = rand::random();
            let shared = probe.diffie_hellman(&x25519_dalek::PublicKey::from(k));
            assert_eq!(
                shared.was_contributory(),
                WgPublicKey::from_bytes(k).is_ok(),
                "{}",
                hex::encode(k)
            );
        }
        let good = x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from([7; 32]));
        assert!(WgPublicKey::from_bytes(good.to_bytes()).is_ok());
        assert!(WgPublicKey::from_base64("AAAA").is_err());
    }

    fn hex_key(s: &str) -> [u8; 32] {
        hex::decode(s).unwrap().try_into().unwrap()
    }
}
