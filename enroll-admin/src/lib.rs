//! komnet-enroll-admin: the admin commands (`komnet token create`, `komnet revoke`, `komnet homeoffice issue`,
//! `komnet audit`, `komnet policy-publish`, `komnet policy-version set`): clap definitions and
//! their implementation.
//!
//! They talk to the running service over its local admin socket (`DATA_DIR/admin.sock`, mode
//! 0600, peer uid checked), never over the network and never unauthenticated. The service
//! records each as an audit entry with the caller's uid.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use http_body_util::{BodyExt as _, Full};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;

use komnet_enroll_client::WgKeys;
use komnet_proto::api::admin::{
    self, AuditRecord, CreateTokenRequest, CreateTokenResponse, HomeOfficeRequest,
    HomeOfficeResponse, PolicyPublishResponse, PolicyVersionRequest, RevokeRequest, RevokeResponse,
};
use komnet_proto::api::{ApiError, RevocationReason};
use komnet_proto::bootstrap::{Bootstrap, BootstrapError};
use komnet_proto::config::HumanDuration;
use komnet_proto::files::FileError;
use komnet_proto::identity::{Role, SiteId, TenantId, WgPublicKey};

pub mod client;
pub mod homeoffice;

pub use client::AdminClient;

use homeoffice::HomeOfficeError;

/// Why an admin command failed. Each names what and where; causes (an I/O error, the service's
/// answer) are the error's source, so `{:#}` prints the whole chain.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(
        "cannot reach komnet-enroll at {} (is `komnet-enroll serve` running, and are you its \
         user or root?)",
        socket.display()
    )]
    Connect {
        socket: PathBuf,
        source: std::io::Error,
    },
    /// The HTTP exchange over the admin socket failed.
    #[error("admin socket: {what}")]
    Http {
        what: &'static str,
        source: hyper::Error,
    },
    /// The service answered something that is not its API.
    #[error("admin socket: {0}")]
    Answer(String),
    /// The service refused, with its typed error.
    #[error("{}: {}", code_name(&.0.code), .0.message)]
    Refused(ApiError),
    #[error("{}: exists; not overwriting a bootstrap file", path.display())]
    BootstrapExists { path: PathBuf },
    #[error("writing the bootstrap file")]
    Bootstrap(#[source] BootstrapError),
    #[error("{}", path.display())]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    File(#[from] FileError),
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {len} bytes, more than a bundle may have ({max})", path.display())]
    BundleTooLarge { path: PathBuf, len: u64, max: usize },
    #[error("publishing {}", path.display())]
    Publish {
        path: PathBuf,
        source: Box<AdminError>,
    },
    #[error(transparent)]
    HomeOffice(#[from] HomeOfficeError),
    #[error("encoding the request: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("writing the output: {0}")]
    Output(#[from] std::io::Error),
}

/// An error code as the API spells it (`token_used`).
fn code_name(code: &komnet_proto::api::ErrorCode) -> String {
    serde_json::to_value(code)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("{code:?}"))
}

/// Where `komnet-enroll serve` puts its admin socket by default.
pub const DEFAULT_SOCKET: &str = "/var/lib/komnet-enroll/admin.sock";

/// How to reach the service.
#[derive(Debug, Clone, clap::Args)]
pub struct SocketArg {
    /// The service's admin socket (DATA_DIR/admin.sock).
    #[arg(long, env = "KOMNET_ENROLL_SOCKET", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum AdminCommand {
    /// One-time enrollment tokens and bootstrap files.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Revoke certificates by serial, site or tenant; hubs drop them within seconds.
    Revoke(RevokeArgs),
    /// Home-office identities for the stock WireGuard app.
    #[command(subcommand)]
    Homeoffice(HomeofficeCommand),
    /// Show the audit log (oldest first).
    Audit(AuditArgs),
    /// Publish a signed policy bundle (from `komnet policy bundle`): the service verifies it
    /// with policy_public_key, compiles it, refuses rollbacks, serves it to the gateways and
    /// hands out its version with enrollments.
    PolicyPublish(PolicyPublishArgs),
    /// The policy version handed out with enrollments (set by policy-publish; by hand only
    /// for policies distributed some other way).
    #[command(subcommand)]
    PolicyVersion(PolicyVersionCommand),
}

#[derive(Debug, Clone, clap::Args)]
pub struct PolicyPublishArgs {
    /// The signed bundle file.
    pub bundle_file: PathBuf,
    #[command(flatten)]
    pub socket: SocketArg,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum TokenCommand {
    /// Create a single-use token bound to tenant, site and role, and write a bootstrap file
    /// (mode 0600) for the field technician's USB stick.
    Create(TokenCreateArgs),
}

#[derive(Debug, Clone, clap::Args)]
pub struct TokenCreateArgs {
    /// The commune the appliance belongs to, e.g. nohfelden.
    #[arg(long)]
    pub tenant: TenantId,
    /// The site, e.g. rathaus (a hub: its name in the data centre).
    #[arg(long)]
    pub site: SiteId,
    /// spoke, hub or homeoffice.
    #[arg(long, value_parser = parse_role)]
    pub role: Role,
    /// How long the token stays valid (e.g. 30m, 24h, 7d).
    #[arg(long, default_value = "24h")]
    pub ttl: HumanDuration,
    /// Bootstrap file to write (default: komnet-bootstrap-TENANT-SITE.json).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Enroll URL(s) for the file, instead of the service's configured ones.
    #[arg(long = "url")]
    pub urls: Vec<String>,
    #[command(flatten)]
    pub socket: SocketArg,
}

fn parse_role(s: &str) -> Result<Role, String> {
    s.parse()
        .map_err(|e: komnet_proto::identity::IdentityError| e.to_string())
}

/// The RFC 5280 reason names as the command line writes them (`key-compromise`).
const REASONS: [(&str, RevocationReason); 6] = [
    ("unspecified", RevocationReason::Unspecified),
    ("key-compromise", RevocationReason::KeyCompromise),
    ("affiliation-changed", RevocationReason::AffiliationChanged),
    ("superseded", RevocationReason::Superseded),
    (
        "cessation-of-operation",
        RevocationReason::CessationOfOperation,
    ),
    ("privilege-withdrawn", RevocationReason::PrivilegeWithdrawn),
];

fn reason_parser() -> impl clap::builder::TypedValueParser<Value = RevocationReason> {
    use clap::builder::TypedValueParser as _;
    clap::builder::PossibleValuesParser::new(REASONS.map(|(name, _)| name)).map(|name| {
        REASONS
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(RevocationReason::Unspecified, |(_, r)| *r)
    })
}

#[derive(Debug, Clone, clap::Args)]
pub struct RevokeArgs {
    /// A certificate serial (hex).
    #[arg(long, conflicts_with_all = ["tenant", "site"])]
    pub serial: Option<String>,
    /// Every certificate of this tenant (with --site: of that site only).
    #[arg(long, required_unless_present = "serial")]
    pub tenant: Option<TenantId>,
    /// Only the certificates of this site of the tenant.
    #[arg(long, requires = "tenant")]
    pub site: Option<SiteId>,
    /// Why (RFC 5280 reason, in the audit log and the CRL): key-compromise, superseded, ….
    #[arg(long, default_value = "unspecified", value_parser = reason_parser())]
    pub reason: RevocationReason,
    /// The site is decommissioned: reason cessation_of_operation, its tunnel addresses are
    /// released.
    #[arg(long, conflicts_with = "reason")]
    pub decommission: bool,
    #[command(flatten)]
    pub socket: SocketArg,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum HomeofficeCommand {
    /// Issue a device identity and a wg-quick configuration (file, terminal QR code, PNG).
    Issue(HomeofficeIssueArgs),
}

#[derive(Debug, Clone, clap::Args)]
pub struct HomeofficeIssueArgs {
    /// The commune the user works for.
    #[arg(long)]
    pub tenant: TenantId,
    /// The user (device) name, e.g. anna.schmidt.
    #[arg(long, value_parser = parse_user)]
    pub user: SiteId,
    /// The device's own WireGuard public key; without it a key pair is generated here, shown
    /// once and never stored by the service.
    #[arg(long)]
    pub public_key: Option<WgPublicKey>,
    /// Lifetime of the identity (default: the service's homeoffice_lifetime).
    #[arg(long)]
    pub ttl: Option<HumanDuration>,
    /// Directory for USER.conf and USER.png (mode 0600).
    #[arg(long, default_value = ".")]
    pub out_dir: PathBuf,
    /// Do not draw the QR code on the terminal.
    #[arg(long)]
    pub no_qr: bool,
    #[command(flatten)]
    pub socket: SocketArg,
}

#[derive(Debug, Clone, clap::Args)]
pub struct AuditArgs {
    /// Show at most this many entries (the newest).
    #[arg(long, default_value_t = 50)]
    pub limit: usize,
    /// One JSON object per line instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub socket: SocketArg,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum PolicyVersionCommand {
    /// Sets the version handed out with enrollments: appliances that enrol refuse any policy
    /// bundle older than it (their anti-rollback floor)
    Set {
        /// The policy version (the `version` in operator.toml of the policy in force)
        version: u64,
        #[command(flatten)]
        socket: SocketArg,
    },
}

/// Calls the admin API over the Unix socket with a JSON body.
async fn call<T: serde::de::DeserializeOwned>(
    socket: &Path,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
) -> Result<T, AdminError> {
    call_with(socket, method, path, body, "application/json", None).await
}

/// Calls the admin API over the Unix socket.
pub(crate) async fn call_with<T: serde::de::DeserializeOwned>(
    socket: &Path,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
    content_type: &'static str,
    on_behalf_of: Option<&str>,
) -> Result<T, AdminError> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|source| AdminError::Connect {
            socket: socket.to_owned(),
            source,
        })?;
    let http = |what| move |source| AdminError::Http { what, source };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(http("HTTP handshake"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, "komnet-enroll")
        .header(hyper::header::CONTENT_TYPE, content_type);
    if let Some(person) = on_behalf_of {
        req = req.header(admin::ON_BEHALF_OF_HEADER, person);
    }
    let req = req
        .body(Full::new(bytes::Bytes::from(body.unwrap_or_default())))
        .map_err(|e| AdminError::Answer(format!("request: {e}")))?;
    let resp = sender.send_request(req).await.map_err(http("request"))?;
    let status = resp.status();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(http("answer"))?
        .to_bytes();
    if !status.is_success() {
        let err: ApiError = serde_json::from_slice(&bytes).map_err(|_| {
            AdminError::Answer(format!(
                "service answered {status}: {}",
                String::from_utf8_lossy(&bytes)
            ))
        })?;
        return Err(AdminError::Refused(err));
    }
    serde_json::from_slice(&bytes)
        .map_err(|e| AdminError::Answer(format!("unexpected answer: {e}")))
}

/// Runs an admin command, printing to stdout.
pub async fn run(cmd: AdminCommand) -> Result<ExitCode, AdminError> {
    let mut out = std::io::stdout().lock();
    run_to(cmd, &mut out).await
}

/// Runs an admin command, printing to `out` (tests capture it).
pub async fn run_to(cmd: AdminCommand, out: &mut dyn Write) -> Result<ExitCode, AdminError> {
    match cmd {
        AdminCommand::Token(TokenCommand::Create(a)) => token_create(a, out).await,
        AdminCommand::Revoke(a) => revoke(a, out).await,
        AdminCommand::Homeoffice(HomeofficeCommand::Issue(a)) => homeoffice_issue(a, out).await,
        AdminCommand::Audit(a) => audit(a, out).await,
        AdminCommand::PolicyPublish(a) => policy_publish(a, out).await,
        AdminCommand::PolicyVersion(PolicyVersionCommand::Set { version, socket }) => {
            let body = serde_json::to_vec(&PolicyVersionRequest { version })?;
            let () = call(
                &socket.socket,
                Method::POST,
                admin::POLICY_VERSION,
                Some(body),
            )
            .await?;
            writeln!(out, "policy version set to {version}")?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn token_create(a: TokenCreateArgs, out: &mut dyn Write) -> Result<ExitCode, AdminError> {
    let path = a
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("komnet-bootstrap-{}-{}.json", a.tenant, a.site)));
    if path.exists() {
        return Err(AdminError::BootstrapExists { path });
    }
    let body = serde_json::to_vec(&CreateTokenRequest {
        tenant: a.tenant.clone(),
        site: a.site.clone(),
        role: a.role,
        ttl_secs: a.ttl.0.as_secs(),
    })?;
    let resp: CreateTokenResponse =
        call(&a.socket.socket, Method::POST, admin::TOKENS, Some(body)).await?;
    let root_fingerprint = resp.root_fingerprint.clone();
    let (token_id, token_text, expires_at) =
        (resp.token_id.clone(), resp.token.clone(), resp.expires_at);
    let bootstrap = Bootstrap::from_token(resp, a.urls);
    bootstrap.write(&path).map_err(AdminError::Bootstrap)?;
    writeln!(
        out,
        "token {token_id} for {}/{} ({}), expires at {expires_at} (unix)",
        a.tenant, a.site, a.role
    )?;
    writeln!(
        out,
        "bootstrap file: {} (mode 0600; copy it to the USB stick)",
        path.display()
    )?;
    writeln!(out, "root fingerprint: {root_fingerprint}")?;
    writeln!(out, "token (shown once): {token_text}")?;
    Ok(ExitCode::SUCCESS)
}

async fn revoke(a: RevokeArgs, out: &mut dyn Write) -> Result<ExitCode, AdminError> {
    let reason = if a.decommission {
        RevocationReason::CessationOfOperation
    } else {
        a.reason
    };
    let body = serde_json::to_vec(&RevokeRequest {
        serial: a.serial,
        tenant: a.tenant,
        site: a.site,
        reason,
    })?;
    let resp: RevokeResponse =
        call(&a.socket.socket, Method::POST, admin::REVOKE, Some(body)).await?;
    for s in &resp.revoked_serials {
        writeln!(out, "revoked {s} ({})", reason.as_str())?;
    }
    writeln!(out, "registry version {}", resp.registry_version)?;
    Ok(ExitCode::SUCCESS)
}

async fn homeoffice_issue(
    a: HomeofficeIssueArgs,
    out: &mut dyn Write,
) -> Result<ExitCode, AdminError> {
    // The key pair is made here, on the admin's machine: the service only sees the public key.
    let (public, generated) = match a.public_key {
        Some(key) => (key, None),
        None => {
            let keys = WgKeys::generate();
            (keys.public(), Some(keys))
        }
    };
    let body = serde_json::to_vec(&HomeOfficeRequest {
        tenant: a.tenant.clone(),
        user: a.user.clone(),
        wg_public_key: public,
        ttl_secs: a.ttl.map(|t| t.0.as_secs()),
        // Issued from the shell: in an MFA-gated tenant the device waits for its person's
        // first sign-in to the console with a second factor.
        mfa_at: None,
    })?;
    let resp: HomeOfficeResponse = call(
        &a.socket.socket,
        Method::POST,
        admin::HOMEOFFICE,
        Some(body),
    )
    .await?;
    let private = generated.as_ref().map(|g| g.private_base64());
    let config = crate::homeoffice::wg_quick_config(&resp.enrollment, private.as_deref())?;
    let png = crate::homeoffice::qr_png(&config)?;
    std::fs::create_dir_all(&a.out_dir).map_err(|source| AdminError::CreateDir {
        path: a.out_dir.clone(),
        source,
    })?;
    let mut written = Vec::new();
    for (ext, bytes) in [("conf", config.as_bytes()), ("png", png.as_slice())] {
        let path = a.out_dir.join(format!("{}.{ext}", a.user));
        komnet_proto::files::create_secret(&path, bytes)?;
        written.push(path);
    }
    let id = &resp.enrollment.identity;
    writeln!(
        out,
        "home-office identity {}/{} serial {}",
        id.tenant, id.site, id.serial
    )?;
    writeln!(out, "{}", config)?;
    if !a.no_qr {
        writeln!(out, "{}", crate::homeoffice::qr_terminal(&config)?)?;
    }
    for p in &written {
        writeln!(out, "wrote {} (mode 0600)", p.display())?;
    }
    if generated.is_some() {
        writeln!(
            out,
            "The private key above is shown once and stored nowhere else: hand the files to the user, then delete them."
        )?;
    }
    if id.admitted_until.is_some() {
        writeln!(
            out,
            "{}'s home offices are MFA-gated ([mfa_window] in enroll.toml): the hubs let this device in only after its person signs in to the web console with a second factor.",
            id.tenant
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

async fn policy_publish(a: PolicyPublishArgs, out: &mut dyn Write) -> Result<ExitCode, AdminError> {
    let path = &a.bundle_file;
    let max = komnet_policy::bundle::MAX_BUNDLE_BYTES;
    // Checked before reading, so a wrong path (a disk image, say) is not read into memory.
    let unreadable = |source| AdminError::Read {
        path: path.clone(),
        source,
    };
    let len = std::fs::metadata(path).map_err(unreadable)?.len();
    if len > max as u64 {
        return Err(AdminError::BundleTooLarge {
            path: path.clone(),
            len,
            max,
        });
    }
    let bytes = std::fs::read(path).map_err(unreadable)?;
    let resp: PolicyPublishResponse = call_with(
        &a.socket.socket,
        Method::POST,
        admin::POLICY_PUBLISH,
        Some(bytes),
        "application/octet-stream",
        None,
    )
    .await
    .map_err(|source| AdminError::Publish {
        path: path.clone(),
        source: Box::new(source),
    })?;
    if resp.unchanged {
        writeln!(
            out,
            "policy {:?} version {} is already published (key id {}); nothing changed",
            resp.name, resp.version, resp.key_id
        )?;
    } else {
        writeln!(
            out,
            "published policy {:?} version {} (key id {}); gateways fetch it from /v1/policy",
            resp.name, resp.version, resp.key_id
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

async fn audit(a: AuditArgs, out: &mut dyn Write) -> Result<ExitCode, AdminError> {
    let records: Vec<AuditRecord> = call(
        &a.socket.socket,
        Method::GET,
        &format!("{}?limit={}", admin::AUDIT, a.limit),
        None,
    )
    .await?;
    for r in records {
        if a.json {
            writeln!(out, "{}", serde_json::to_string(&r)?)?;
        } else {
            writeln!(
                out,
                "{:>6} {} {:<12} {:<18} {}",
                r.id, r.at, r.actor, r.action, r.details
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A home-office user's name: stored like a site name, but the error speaks of users.
fn parse_user(text: &str) -> Result<SiteId, String> {
    SiteId::parse(text).map_err(|_| {
        format!(
            "user name {text:?} is not valid: 1-63 characters of a-z, 0-9, '-', '.' and '_', \
             starting with a letter or digit (e.g. anna.schmidt)"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The error and its causes as the binaries print them (`{:#}` of anyhow, by hand).
    fn chain(e: &AdminError) -> String {
        let mut text = e.to_string();
        let mut source = std::error::Error::source(e);
        while let Some(cause) = source {
            text = format!("{text}: {cause}");
            source = cause.source();
        }
        text
    }

    fn socket(dir: &Path) -> SocketArg {
        SocketArg {
            socket: dir.join("admin.sock"),
        }
    }

    #[tokio::test]
    async fn a_missing_service_is_named_with_its_socket_and_the_cause() {
        let tmp = tempfile::tempdir().expect("temporary directory");
        let dir = tmp.path();
        let e = run_to(
            AdminCommand::Audit(AuditArgs {
                limit: 5,
                json: false,
                socket: socket(dir),
            }),
            &mut Vec::new(),
        )
        .await
        .expect_err("no service listens");
        assert!(matches!(e, AdminError::Connect { .. }), "{e:?}");
        let text = chain(&e);
        assert!(
            text.starts_with(&format!(
                "cannot reach komnet-enroll at {}/admin.sock (is `komnet-enroll serve` running",
                dir.display()
            )) && text.contains("No such file or directory"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn bad_files_are_refused_before_the_service_is_asked() {
        let tmp = tempfile::tempdir().expect("temporary directory");
        let dir = tmp.path();
        // A bootstrap file is never overwritten.
        let existing = dir.join("stick.json");
        std::fs::write(&existing, "{}").expect("write");
        let e = run_to(
            AdminCommand::Token(TokenCommand::Create(TokenCreateArgs {
                tenant: TenantId::parse("nohfelden").expect("tenant"),
                site: SiteId::parse("rathaus").expect("site"),
                role: Role::Spoke,
                ttl: "1h".parse().expect("ttl"),
                out: Some(existing.clone()),
                urls: vec![],
                socket: socket(dir),
            })),
            &mut Vec::new(),
        )
        .await
        .expect_err("exists");
        assert!(matches!(e, AdminError::BootstrapExists { .. }), "{e:?}");
        assert_eq!(
            e.to_string(),
            format!(
                "{}: exists; not overwriting a bootstrap file",
                existing.display()
            )
        );
        assert_eq!(std::fs::read_to_string(&existing).expect("read"), "{}");

        // A bundle that is not there, and one larger than any bundle.
        let publish = |file: PathBuf| {
            AdminCommand::PolicyPublish(PolicyPublishArgs {
                bundle_file: file,
                socket: socket(dir),
            })
        };
        let missing = dir.join("missing.bundle");
        let e = run_to(publish(missing.clone()), &mut Vec::new())
            .await
            .expect_err("missing");
        assert!(matches!(e, AdminError::Read { .. }), "{e:?}");
        assert!(
            chain(&e).starts_with(&format!("cannot read {}: ", missing.display())),
            "{}",
            chain(&e)
        );
        let huge = dir.join("huge.bundle");
        let file = std::fs::File::create(&huge).expect("create");
        file.set_len(komnet_policy::bundle::MAX_BUNDLE_BYTES as u64 + 1)
            .expect("size");
        let e = run_to(publish(huge), &mut Vec::new())
            .await
            .expect_err("too large");
        assert!(matches!(e, AdminError::BundleTooLarge { .. }), "{e:?}");
        assert!(e.to_string().contains("more than a bundle may have"), "{e}");

        // With the service away, publishing says which file it was publishing.
        let small = dir.join("small.bundle");
        std::fs::write(&small, b"bundle").expect("write");
        let e = run_to(publish(small.clone()), &mut Vec::new())
            .await
            .expect_err("no service");
        assert!(
            chain(&e).starts_with(&format!(
                "publishing {}: cannot reach komnet-enroll",
                small.display()
            )),
            "{}",
            chain(&e)
        );
    }

    #[test]
    fn a_refusal_reads_as_the_apis_code_and_message() {
        let e = AdminError::Refused(ApiError {
            code: komnet_proto::api::ErrorCode::NotInPolicy,
            message: "tenant x is not in the published policy".into(),
        });
        assert_eq!(
            e.to_string(),
            "not_in_policy: tenant x is not in the published policy"
        );
    }
}
