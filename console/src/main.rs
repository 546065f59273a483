//! komnet-console: the web console for operators and commune admins (issue 18).
//!
//! A process of its own next to `komnet-enroll`: it signs people in through the
//! municipality's identity provider and acts for them over the service's admin socket, which
//! records every action with the person's name. It holds no CA key, no database and no
//! registry of its own (docs/console.md).
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser;

use komnet_console::{config, oidc, pages, session, web};

/// The komnet web console (single sign-on, fleet, tokens, revocation, audit log).
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The console's configuration (docs/console.md).
    #[arg(
        long,
        env = "KOMNET_CONSOLE_CONFIG",
        default_value = "/etc/komnet/console.toml"
    )]
    config: PathBuf,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("komnet-console: tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("komnet-console: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let config = Arc::new(config::Config::load(&args.config)?);
    pages::layout::set_time_zone(config.time_zone.clone());
    let app = Arc::new(web::App {
        oidc: oidc::Oidc::new(config.clone())?,
        sessions: session::Sessions::new(config.session_idle, config.session_max),
        throttle: session::Throttle::new(config.logins_per_minute),
        admin: komnet_enroll_admin::AdminClient::new(config.admin_socket.clone()),
        config: config.clone(),
    });
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listen on {}", config.listen))?;
    let addr = listener.local_addr().context("local address")?;
    tracing::info!(%addr, public_url = %config.public_url, issuer = %config.issuer, "komnet-console listening");
    let router = web::router(app);
    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(async {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return std::future::pending().await,
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    })
    .await
    .context("serving")?;
    Ok(())
}
