//! The one logging setup of komnet's programs (feature `logging`): events go to stderr (the
//! journal under systemd), filtered by `RUST_LOG` or else the program's default filter, as text
//! (coloured on a terminal) or as one JSON object per line with the event's fields at the top
//! level (one `message` key per line, as log shippers expect).
//!
//! ```no_run
//! komnet_proto::logging::init(komnet_proto::logging::Format::Text, "info");
//! tracing::info!(peers = 3, "running");
//! ```

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

impl Format {
    /// `Json` when `json`, for a configuration's `log_json` switch.
    pub fn json_if(json: bool) -> Self {
        if json {
            Format::Json
        } else {
            Format::Text
        }
    }
}

/// Installs the process's logger; `default_filter` (`"info"`, `"komnet_enroll=debug"`) applies
/// when `RUST_LOG` is unset or invalid. A second call changes nothing.
pub fn init(format: Format, default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        Format::Json => builder.json().flatten_event(true).try_init(),
        Format::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
    };
}

/// The default filter for wireguard-go's `LOG_LEVEL` (`verbose`, `error`, `silent`; anything
/// else is `info`), which scripts written for wireguard-go set.
pub fn wireguard_go_level(log_level: Option<&str>) -> &'static str {
    match log_level {
        Some("verbose") | Some("debug") => "debug",
        Some("error") => "error",
        Some("silent") => "off",
        _ => "info",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wireguard_gos_log_levels() {
        assert_eq!(wireguard_go_level(Some("verbose")), "debug");
        assert_eq!(wireguard_go_level(Some("debug")), "debug");
        assert_eq!(wireguard_go_level(Some("error")), "error");
        assert_eq!(wireguard_go_level(Some("silent")), "off");
        assert_eq!(wireguard_go_level(Some("loud")), "info");
        assert_eq!(wireguard_go_level(None), "info");
        assert_eq!(Format::json_if(true), Format::Json);
        assert_eq!(Format::json_if(false), Format::Text);
    }
}
