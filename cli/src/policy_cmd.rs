//! `komnet policy …`: the policy verbs. Exit status 0 when everything is fine, 1 when the
//! policy has errors, a test fails or a flow is not what was asked; clap's 2 for usage errors.

use std::fmt::Write as _;
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use base64::Engine as _;
use clap::Subcommand;
use komnet_policy::format::format_file;
use komnet_policy::{
    bundle, destination_hint, diff, explain_at, nft, query_segment, query_service, run_tests,
    schema, version_finding, Arrival, Binding, Policy, ReloadError,
};

use std::path::{Path, PathBuf};

use crate::policy_report::{self, CheckFormat, DiffFormat};

#[derive(Debug, Subcommand)]
pub(crate) enum PolicyCommand {
    /// Parse and validate a policy directory; prints every error with file:line:col.
    Check {
        /// The policy directory (operator.toml and tenants/*.toml).
        dir: PathBuf,
        /// How to print the findings: text for people; json, gitlab (code-quality report) or
        /// sarif for CI, on stdout (the exit status is the same).
        #[arg(long, value_enum, default_value = "text")]
        format: CheckFormat,
        #[command(flatten)]
        strict: Strictness,
    },
    /// Run the inline `[[expect]]` tests of a policy.
    Test {
        /// The policy directory (operator.toml and tenants/*.toml).
        dir: PathBuf,
        #[command(flatten)]
        strict: Strictness,
    },
    /// Decide one flow and show the rule (or default deny) that decided it.
    Explain {
        /// The policy directory (operator.toml and tenants/*.toml).
        dir: PathBuf,
        /// Source: an address (10.20.1.7), a segment (musterstadt/verwaltung).
        #[arg(long)]
        from: String,
        /// Destination: SERVICE[:PROTO/PORT], ADDR:PROTO/PORT, [V6ADDR]:PROTO/PORT, …:icmp.
        #[arg(long)]
        to: String,
        /// Decide as the site's appliance does for a packet that arrived tagged with this VLAN
        /// id: a source that is not of the segment on that VLAN is dropped (segment_spoof).
        #[arg(long, conflicts_with = "port", value_parser = clap::value_parser!(u16).range(1..=4094))]
        vlan: Option<u16>,
        /// Like --vlan, for a packet that arrived untagged on this port of the appliance.
        #[arg(long)]
        port: Option<String>,
        /// The site whose appliance it arrived at (with --vlan/--port; default: the site of
        /// the source address). Addresses in that town hall's own numbering (a segment's
        /// `local` prefixes) are shown with their unique ones and decided as those.
        #[arg(long)]
        site: Option<String>,
        #[command(flatten)]
        strict: Strictness,
    },
    /// Who can reach a service, or what a segment can reach.
    #[command(group(clap::ArgGroup::new("what").required(true).args(["service", "segment"])))]
    Query {
        /// The policy directory (operator.toml and tenants/*.toml).
        dir: PathBuf,
        /// List the segments that can reach this service (SERVICE or TENANT/SERVICE), and
        /// those a rule names but a guardrail blocks.
        #[arg(long)]
        service: Option<String>,
        /// List the services this segment (TENANT/SEGMENT) can reach, with ports and rules.
        #[arg(long)]
        segment: Option<String>,
        #[command(flatten)]
        strict: Strictness,
    },
    /// Flows newly allowed and newly denied between two versions of a policy.
    Diff {
        /// The policy directory as it was (e.g. a checkout of the target branch).
        old: PathBuf,
        /// The policy directory as it is to become.
        new: PathBuf,
        /// text: one line per change; markdown: tables for a merge request's description.
        #[arg(long, value_enum, default_value = "text")]
        format: DiffFormat,
        #[command(flatten)]
        strict: Strictness,
    },
    /// Print what one site's appliance would install.
    Compile {
        /// The policy directory (operator.toml and tenants/*.toml).
        dir: PathBuf,
        /// The site: SITE, or TENANT/SITE when several tenants use the name.
        #[arg(long)]
        site: String,
        /// Print the nftables ruleset (nft syntax).
        #[arg(long, required = true)]
        nft: bool,
        /// Print nft's JSON form (what `apply` feeds to `nft -j`) instead of its text syntax.
        #[arg(long, requires = "nft")]
        json: bool,
        /// The appliance's LAN interface(s); the first is the VLAN trunk.
        #[arg(long = "lan", default_value = "lan0")]
        lan: Vec<String>,
        /// The appliance's tunnel interface.
        #[arg(long, default_value = "komnet0")]
        tunnel: String,
        #[command(flatten)]
        strict: Strictness,
    },
    /// What one site's appliance sets up on its LAN, for the technician who connects the
    /// switch: per segment where it arrives (VLAN or port), the appliance's address there and
    /// what it serves (DHCP, router advertisements); what the switch port to the trunk carries.
    Lan {
        /// The policy directory (operator.toml and tenants/*.toml).
        dir: PathBuf,
        /// The site: SITE, or TENANT/SITE when several tenants use the name.
        #[arg(long)]
        site: String,
        /// The appliance's LAN interface(s); the first is the VLAN trunk (the image's: eth1).
        #[arg(long = "lan", default_value = "eth1")]
        lan: Vec<String>,
        #[command(flatten)]
        strict: Strictness,
    },
    /// Rewrite a policy's files in the one layout (key order, spacing, blank lines), keeping
    /// comments, so that diffs between admins show only what changed.
    Fmt {
        /// The policy directory (operator.toml and tenants/*.toml), or single policy files.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Change nothing; list the files that are not in the layout and exit 1 if there are
        /// any (for CI).
        #[arg(long)]
        check: bool,
    },
    /// Print the JSON Schema of a policy file (for editors: taplo, Even Better TOML), or write
    /// both (operator.schema.json, tenant.schema.json) into a directory.
    #[command(group(clap::ArgGroup::new("which").required(true).args(["file", "out_dir"])))]
    Schema {
        /// Which file's schema to print: operator (operator.toml) or tenant (tenants/*.toml).
        #[arg(value_enum)]
        file: Option<SchemaFile>,
        /// Write both schemas into this directory instead.
        #[arg(long)]
        out_dir: Option<PathBuf>,
    },
    /// Create the operator's Ed25519 key for signing policy bundles: KEY (private, 0600) and
    /// KEY.pub (what gateways pin).
    Keygen {
        /// Path of the private key file to create; the public key goes to PATH.pub.
        #[arg(long)]
        out: PathBuf,
    },
    /// Check, test and sign a policy into a versioned bundle for the gateways.
    Bundle {
        /// The policy directory (operator.toml and tenants/*.toml).
        dir: PathBuf,
        /// The private key from `komnet policy keygen`.
        #[arg(long)]
        key: PathBuf,
        /// Where to write the signed bundle (written to a temporary file, then renamed).
        #[arg(long)]
        out: PathBuf,
        /// Gateways refuse to install the bundle after this long (e.g. 90d); it stays in force
        /// where it runs. Without it the bundle never expires.
        #[arg(long)]
        valid_for: Option<komnet_proto::config::HumanDuration>,
        /// Announce the key that signs the next bundles (the .pub file of a new `komnet policy
        /// keygen`): gateways accept it from this bundle on, and only it once they installed a
        /// bundle it signed.
        #[arg(long)]
        next_key: Option<PathBuf>,
        #[command(flatten)]
        strict: Strictness,
    },
    /// Verify a bundle's signature against a public key and show what it holds.
    Verify {
        /// The bundle file (from `komnet policy bundle`).
        bundle: PathBuf,
        /// The public key the bundle must be signed with (KEY.pub of `komnet policy keygen`).
        #[arg(long = "public-key")]
        public_key: PathBuf,
    },
    /// Install a site's ruleset with nft: checked with `nft -c`, applied as one transaction,
    /// read back and compared. Needs CAP_NET_ADMIN. On failure the previous ruleset stays.
    Apply {
        /// The policy directory (operator.toml and tenants/*.toml).
        dir: PathBuf,
        /// The site: SITE, or TENANT/SITE when several tenants use the name.
        #[arg(long)]
        site: String,
        /// The appliance's LAN interface(s); the first is the VLAN trunk.
        #[arg(long = "lan", required = true)]
        lan: Vec<String>,
        /// The appliance's tunnel interface.
        #[arg(long)]
        tunnel: String,
        #[command(flatten)]
        strict: Strictness,
    },
}

/// The policy files a schema describes.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub(crate) enum SchemaFile {
    /// operator.toml
    Operator,
    /// tenants/TENANT.toml
    Tenant,
}

impl SchemaFile {
    fn kind(self) -> schema::FileKind {
        match self {
            SchemaFile::Operator => schema::FileKind::Operator,
            SchemaFile::Tenant => schema::FileKind::Tenant,
        }
    }
}

/// How strict loading is; every verb that reads a policy takes it.
#[derive(Debug, Clone, Copy, Default, clap::Args)]
pub(crate) struct Strictness {
    /// Treat warnings (rules left inactive by a guardrail or a withdrawn export, a home-office
    /// pool without a segment, …) as errors: exit 1 and use nothing.
    #[arg(long)]
    deny_warnings: bool,
}

/// `1 warning`, `2 warnings`.
pub(crate) fn plural(n: usize, word: &str) -> String {
    if n == 1 {
        format!("1 {word}")
    } else {
        format!("{n} {word}s")
    }
}

/// Loads a policy, printing its warnings once (with their count), or prints all its errors
/// (exit 1). With `--deny-warnings` a policy with warnings is not used either.
fn load(dir: &Path, strict: Strictness) -> Result<Policy, ExitCode> {
    match Policy::load(dir) {
        Ok(p) => {
            for w in &p.warnings {
                eprint!("{}", w.render(&p.sources));
            }
            let count = p.warnings.iter().filter(|w| w.is_warning()).count();
            if count > 0 {
                if strict.deny_warnings {
                    eprintln!(
                        "{}: {} (--deny-warnings: treated as errors); the policy is not usable",
                        dir.display(),
                        plural(count, "warning")
                    );
                    return Err(ExitCode::from(1));
                }
                eprintln!("{}: {}", dir.display(), plural(count, "warning"));
            }
            Ok(p)
        }
        Err(errors) => {
            eprint!("{}", errors.render());
            let warnings = errors.diagnostics.iter().filter(|d| d.is_warning()).count();
            eprintln!(
                "{}: {}{}; the policy is not usable",
                dir.display(),
                plural(errors.error_count(), "error"),
                if warnings > 0 {
                    format!(", {}", plural(warnings, "warning"))
                } else {
                    String::new()
                }
            );
            Err(ExitCode::from(1))
        }
    }
}

macro_rules! load_or_exit {
    ($dir:expr, $strict:expr) => {
        match load($dir, $strict) {
            Ok(p) => p,
            Err(code) => return Ok(code),
        }
    };
}

/// Appends a line to the command's output, written in one go at the end (a closed pipe, as
/// with `| head`, then ends the output quietly instead of failing).
macro_rules! say {
    ($out:ident, $($arg:tt)*) => {{
        let _ = writeln!($out, $($arg)*);
    }};
}

macro_rules! say_raw {
    ($out:ident, $($arg:tt)*) => {{
        let _ = write!($out, $($arg)*);
    }};
}

pub(crate) fn run(cmd: PolicyCommand) -> anyhow::Result<ExitCode> {
    let mut out = String::new();
    let code = run_into(cmd, &mut out)?;
    crate::emit(&out)?;
    Ok(code)
}

fn run_into(cmd: PolicyCommand, out: &mut String) -> anyhow::Result<ExitCode> {
    match cmd {
        PolicyCommand::Check {
            dir,
            format,
            strict,
        } if format != CheckFormat::Text => {
            let (sources, diagnostics, valid) = match Policy::load(&dir) {
                Ok(p) => {
                    let warned = p.warnings.iter().any(|w| w.is_warning());
                    let valid = !(strict.deny_warnings && warned);
                    (p.sources, p.warnings, valid)
                }
                Err(e) => (e.sources, e.diagnostics, false),
            };
            let report = match format {
                CheckFormat::Json => policy_report::json(&dir, &sources, &diagnostics, valid),
                CheckFormat::Gitlab => policy_report::gitlab(&dir, &sources, &diagnostics),
                CheckFormat::Sarif => policy_report::sarif(&dir, &sources, &diagnostics),
                CheckFormat::Text => unreachable!("handled below"),
            };
            say!(
                out,
                "{}",
                serde_json::to_string_pretty(&report).context("cannot encode the report")?
            );
            Ok(if valid {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        PolicyCommand::Check { dir, strict, .. } => {
            let p = load_or_exit!(&dir, strict);
            say!(out,
                "{}: policy {:?} version {} is valid: {} tenants, {} sites, {} segments, {} services, {} rules, {} guardrails, {} tests{}",
                dir.display(),
                p.name,
                p.version,
                p.tenants.len(),
                p.sites.len(),
                p.segments.len(),
                p.services.len(),
                p.rules.len(),
                p.guardrails.len(),
                p.expectations.len(),
                match p.warnings.iter().filter(|w| w.is_warning()).count() {
                    0 => String::new(),
                    n => format!(" ({})", plural(n, "warning")),
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Test { dir, strict } => {
            let p = load_or_exit!(&dir, strict);
            let report = run_tests(&p);
            for o in &report.outcomes {
                say!(out, "{}", o.line);
            }
            say!(
                out,
                "{} passed, {} failed ({} tests)",
                report.passed,
                report.failed,
                p.expectations.len()
            );
            Ok(if report.failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        PolicyCommand::Explain {
            dir,
            from,
            to,
            vlan,
            port,
            site,
            strict,
        } => {
            let p = load_or_exit!(&dir, strict);
            let binding = match (vlan, port) {
                (Some(id), _) => Some(Binding::Vlan(id)),
                (None, Some(port)) => Some(Binding::Port(port)),
                (None, None) => None,
            };
            let arrival = match (binding, site) {
                (None, None) => None,
                (binding, site) => Some(Arrival { site, binding }),
            };
            if let Some(hint) = destination_hint(&to) {
                eprintln!("warning: --to {to:?}: {hint}");
            }
            let lines = explain_at(&p, &from, &to, arrival.as_ref()).map_err(anyhow::Error::msg)?;
            for l in lines {
                say!(out, "{l}");
            }
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Query {
            dir,
            service,
            segment,
            strict,
        } => {
            let p = load_or_exit!(&dir, strict);
            let (title, reach) = match (service, segment) {
                (Some(s), _) => (format!("who can reach {s}"), query_service(&p, &s)),
                (None, Some(s)) => (format!("what {s} can reach"), query_segment(&p, &s)),
                (None, None) => bail!("give --service or --segment"),
            };
            let reach = reach.map_err(anyhow::Error::msg)?;
            say!(out, "{title}:");
            if reach.is_empty() {
                say!(out, "  nothing (default deny)");
            }
            for r in reach {
                say!(out, "  {r}");
            }
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Diff {
            old,
            new,
            format,
            strict,
        } => {
            // The old version's warnings are history: only the new one's are shown (and count
            // for --deny-warnings); its errors are shown, since it must load to compare.
            let a = match Policy::load(&old) {
                Ok(p) => p,
                Err(errors) => {
                    eprint!("{}", errors.render());
                    eprintln!(
                        "{}: {}; the old version is not usable, nothing to compare",
                        old.display(),
                        plural(errors.error_count(), "error")
                    );
                    return Ok(ExitCode::from(1));
                }
            };
            let b = load_or_exit!(&new, strict);
            let finding = version_finding(&a, &b);
            if let Some(finding) = &finding {
                eprintln!("warning: {}: {finding}", new.display());
            }
            let (changes, moved) = diff(&a, &b);
            if format == DiffFormat::Markdown {
                say_raw!(
                    out,
                    "{}",
                    policy_report::diff_markdown(
                        &b.name,
                        (a.version, b.version),
                        &changes,
                        &moved,
                        finding.as_deref()
                    )
                );
                return Ok(ExitCode::SUCCESS);
            }
            say!(
                out,
                "policy {:?}: version {} -> {}",
                b.name,
                a.version,
                b.version
            );
            let allowed = changes.iter().filter(|c| c.now_allowed).count();
            for c in &changes {
                say!(out, "{c}");
            }
            for m in &moved {
                say!(out, "~ {m}");
            }
            say!(
                out,
                "{allowed} flow(s) newly allowed, {} newly denied, {} address change(s)",
                changes.len() - allowed,
                moved.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Compile {
            dir,
            site,
            nft: _,
            json,
            lan,
            tunnel,
            strict,
        } => {
            let p = load_or_exit!(&dir, strict);
            let ruleset = site_ruleset(&p, &site, lan, tunnel)?;
            if json {
                say!(
                    out,
                    "{}",
                    serde_json_pretty(&ruleset).context("cannot encode the ruleset")?
                );
            } else {
                say_raw!(out, "{ruleset}");
            }
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Lan {
            dir,
            site,
            lan,
            strict,
        } => {
            let p = load_or_exit!(&dir, strict);
            let site = p.find_site(&site).map_err(anyhow::Error::msg)?;
            say_raw!(out, "{}", crate::policy_lan::lan_sheet(&p, site, &lan)?);
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Fmt { paths, check } => {
            let mut files = Vec::new();
            for path in &paths {
                if path.is_dir() {
                    files.push((path.join("operator.toml"), schema::FileKind::Operator));
                    let tenants = path.join("tenants");
                    if tenants.is_dir() {
                        let mut list: Vec<PathBuf> = std::fs::read_dir(&tenants)
                            .with_context(|| format!("cannot list {}", tenants.display()))?
                            .filter_map(|e| e.ok().map(|e| e.path()))
                            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
                            .collect();
                        list.sort();
                        files.extend(list.into_iter().map(|p| (p, schema::FileKind::Tenant)));
                    }
                } else {
                    let kind = if path.file_name().is_some_and(|n| n == "operator.toml") {
                        schema::FileKind::Operator
                    } else {
                        schema::FileKind::Tenant
                    };
                    files.push((path.clone(), kind));
                }
            }
            let mut unformatted = 0;
            let mut failed = 0;
            for (path, kind) in files {
                let text = std::fs::read_to_string(&path)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                let tidy = match format_file(kind, &text) {
                    Ok(t) => t,
                    Err(e) => {
                        eprintln!("{}: {e}", path.display());
                        failed += 1;
                        continue;
                    }
                };
                if tidy == text {
                    continue;
                }
                unformatted += 1;
                if check {
                    say!(out, "would reformat {}", path.display());
                } else {
                    replace_file(&path, &tidy)?;
                    say!(out, "formatted {}", path.display());
                }
            }
            Ok(if failed > 0 || (check && unformatted > 0) {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        PolicyCommand::Schema { file, out_dir } => {
            match (file, out_dir) {
                (_, Some(dir)) => {
                    std::fs::create_dir_all(&dir)
                        .with_context(|| format!("cannot create {}", dir.display()))?;
                    for kind in [schema::FileKind::Operator, schema::FileKind::Tenant] {
                        let path = dir.join(kind.schema_file_name());
                        std::fs::write(&path, schema::schema_text(kind))
                            .with_context(|| format!("cannot write {}", path.display()))?;
                        say!(out, "{}", path.display());
                    }
                }
                (Some(file), None) => say_raw!(out, "{}", schema::schema_text(file.kind())),
                (None, None) => bail!("name the file (operator or tenant) or give --out-dir"),
            }
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Keygen { out: path } => {
            let (private, public) = bundle::generate_key()?;
            let pub_path = path.with_extension("pub");
            for p in [&path, &pub_path] {
                if p.exists() {
                    bail!("{} exists; not overwriting a key", p.display());
                }
            }
            write_private(&path, &B64.encode(&private))?;
            std::fs::write(&pub_path, format!("{}\n", B64.encode(&public)))
                .with_context(|| format!("cannot write {}", pub_path.display()))?;
            say!(
                out,
                "private key {} (0600), public key {} (key id {})",
                path.display(),
                pub_path.display(),
                bundle::key_id(&public)
            );
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Bundle {
            dir,
            key,
            out: dest,
            valid_for,
            next_key,
            strict,
        } => {
            // Shows the warnings once and honours --deny-warnings; the bundle is made from
            // the files as read again below.
            let _ = load_or_exit!(&dir, strict);
            let private = read_key(&key)?;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0);
            let next_key = match &next_key {
                None => None,
                Some(path) => {
                    let k = read_key(path)?;
                    if k.len() != 32 {
                        bail!(
                            "{}: not an Ed25519 public key (the .pub file of `komnet policy keygen`)",
                            path.display()
                        );
                    }
                    Some(k)
                }
            };
            let options = bundle::BundleOptions {
                not_before: valid_for.map(|_| now - bundle::CLOCK_SKEW_SECS),
                expires: valid_for.map(|d| now + d.0.as_secs() as i64),
                next_key,
            };
            let bytes = match bundle::create_with(&dir, &private, &options) {
                Ok(b) => b,
                Err(bundle::BundleError::Load(ReloadError::Invalid(errors))) => {
                    eprint!("{}", errors.render());
                    bail!(
                        "{}: the policy has errors; no bundle written",
                        dir.display()
                    );
                }
                Err(e) => return Err(e.into()),
            };
            let verified_version = bundle::verify(&bytes, &public_of(&private)?)?.version;
            let tmp = dest.with_extension("tmp");
            std::fs::write(&tmp, &bytes)
                .with_context(|| format!("cannot write {}", tmp.display()))?;
            std::fs::rename(&tmp, &dest)
                .with_context(|| format!("cannot write {}", dest.display()))?;
            say!(
                out,
                "wrote {} (policy version {verified_version}, {} bytes)",
                dest.display(),
                bytes.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Verify {
            bundle: path,
            public_key,
        } => {
            let size = std::fs::metadata(&path)
                .with_context(|| format!("cannot read {}", path.display()))?
                .len();
            if size > bundle::MAX_BUNDLE_BYTES as u64 {
                bail!(
                    "{}: {size} bytes, more than a bundle may have ({})",
                    path.display(),
                    bundle::MAX_BUNDLE_BYTES
                );
            }
            let bytes =
                std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
            let public = read_key(&public_key)?;
            let verified = bundle::verify(&bytes, &public)?;
            let compiled = verified.compile()?;
            say!(
                out,
                "{}: signature valid (key id {}), policy {:?} version {}, {} rules",
                path.display(),
                bundle::key_id(&public),
                verified.name,
                verified.version,
                compiled.policy.rules.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Apply {
            dir,
            site,
            lan,
            tunnel,
            strict,
        } => {
            let p = load_or_exit!(&dir, strict);
            let report = run_tests(&p);
            if report.failed > 0 {
                for o in report.outcomes.iter().filter(|o| !o.passed) {
                    eprintln!("{}", o.line);
                }
                bail!(
                    "{} inline test(s) fail: not applying this policy",
                    report.failed
                );
            }
            let ruleset = site_ruleset(&p, &site, lan, tunnel)?;
            ruleset.apply()?;
            say!(
                out,
                "applied policy {:?} version {} for site {site}: {} rules in table inet {}",
                p.name,
                p.version,
                ruleset.rule_count(),
                nft::TABLE
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

fn read_key(path: &Path) -> anyhow::Result<Vec<u8>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    B64.decode(text.trim())
        .with_context(|| format!("{}: not a base64 key file", path.display()))
}

fn public_of(private: &[u8]) -> anyhow::Result<Vec<u8>> {
    use ring::signature::KeyPair as _;
    let pair = ring::signature::Ed25519KeyPair::from_pkcs8(private)
        .map_err(|e| anyhow::anyhow!("not an Ed25519 private key: {e}"))?;
    Ok(pair.public_key().as_ref().to_vec())
}

/// Creates `path` with mode 0600 before any secret is written into it.
fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    writeln!(f, "{contents}").with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Replaces a policy file with `text` in one step (temporary file, rename), keeping its mode.
fn replace_file(path: &Path, text: &str) -> anyhow::Result<()> {
    let mode = std::fs::metadata(path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .permissions();
    let mut tmp_name = path.file_name().unwrap_or_default().to_owned();
    tmp_name.push(format!(".fmt-{}.tmp", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    std::fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::set_permissions(&tmp, mode)
        .and_then(|()| std::fs::rename(&tmp, path))
        .with_context(|| format!("cannot replace {}", path.display()))
        .inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })
}

fn site_ruleset(
    p: &Policy,
    site: &str,
    lan: Vec<String>,
    tunnel: String,
) -> anyhow::Result<nft::Ruleset> {
    let site_id = p.find_site(site).map_err(anyhow::Error::msg)?;
    Ok(nft::ruleset_for_site(
        p,
        site_id,
        &nft::Interfaces { lan, tunnel },
    )?)
}

fn serde_json_pretty(ruleset: &nft::Ruleset) -> anyhow::Result<String> {
    Ok(nft::to_json_pretty(ruleset)?)
}
