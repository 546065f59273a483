//! A throwaway PostgreSQL cluster for one test: Debian's `postgresql` package (initdb, pg_ctl)
//! in a temporary directory, run as an unprivileged user (initdb refuses root; as root the
//! cluster runs as `nobody`), reachable only on a unix socket in that directory. Dropping the
//! guard stops the server (`pg_ctl stop -m immediate`) and removes the directory, also when
//! the test panics.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use komnet_enroll::config::DatabaseUrl;

/// The superuser the tests connect as (trust authentication on the socket).
const USER: &str = "komnet";

pub struct Cluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    /// uid/gid the server runs as.
    owner: Option<(u32, u32)>,
    running: bool,
    /// The server's port (also in its socket's name).
    port: u16,
}

/// A server certificate and its key, PEM, for [`Cluster::start_tls`].
pub struct ServerTls {
    pub cert_pem: String,
    pub key_pem: String,
}

/// The newest installed server's bin directory (`/usr/lib/postgresql/N/bin`).
fn server_bin() -> PathBuf {
    if let Some(dir) = std::env::var_os("KOMNET_PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    match versions.pop() {
        Some((_, bin)) => bin,
        None => panic!(
            "PostgreSQL's server is not installed (no /usr/lib/postgresql/*/bin/initdb): run \
             `scripts/setup.sh test` (Debian package postgresql), or set KOMNET_PG_BIN"
        ),
    }
}

/// `nobody`'s uid and gid from /etc/passwd, when this process is root.
fn unprivileged_owner() -> Option<(u32, u32)> {
    use std::os::unix::fs::MetadataExt as _;
    // The owner of /proc/self is this process's effective user.
    if std::fs::metadata("/proc/self").unwrap().uid() != 0 {
        return None;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    let line = passwd
        .lines()
        .find(|l| l.starts_with("nobody:"))
        .expect("no user nobody in /etc/passwd to run the test cluster as (initdb refuses root)");
    let fields: Vec<&str> = line.split(':').collect();
    Some((fields[2].parse().unwrap(), fields[3].parse().unwrap()))
}

impl Cluster {
    /// initdb and start; about a second.
    pub fn start() -> Cluster {
        Self::start_with(&["-c", "fsync=off"])
    }

    /// With server settings (`-c name=value` pairs) of the caller's choice: the benchmark runs
    /// with fsync on, as a production server would.
    pub fn start_with(settings: &[&str]) -> Cluster {
        Self::start_inner(settings, None)
    }

    /// Also on 127.0.0.1 at a free port, with TLS (`tls`), and there for TLS connections
    /// only (pg_hba.conf: `hostssl` trusted, `hostnossl` rejected).
    pub fn start_tls(tls: &ServerTls) -> Cluster {
        Self::start_inner(&["-c", "fsync=off"], Some(tls))
    }

    fn start_inner(settings: &[&str], tls: Option<&ServerTls>) -> Cluster {
        let bin = server_bin();
        let owner = unprivileged_owner();
        let dir = tempfile::Builder::new()
            .prefix("komnet-pg-")
            .tempdir()
            .unwrap();
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
        }
        let port = match tls {
            None => 5432,
            Some(_) => std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port(),
        };
        let mut cluster = Cluster {
            dir,
            bin,
            owner,
            running: false,
            port,
        };
        let data = cluster.data_dir();
        cluster.run(
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                USER,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            ],
        );
        let socket = cluster.socket_dir();
        let mut options = format!(
            "-k {} -c port={port} -c max_connections=200",
            socket.display()
        );
        match tls {
            None => options.push_str(" -c listen_addresses="),
            Some(tls) => {
                let cert = data.join("server.crt");
                let key = data.join("server.key");
                std::fs::write(&cert, &tls.cert_pem).unwrap();
                std::fs::write(&key, &tls.key_pem).unwrap();
                // The server refuses a key others can read.
                use std::os::unix::fs::PermissionsExt as _;
                std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
                if let Some((uid, gid)) = owner {
                    std::os::unix::fs::chown(&cert, Some(uid), Some(gid)).unwrap();
                    std::os::unix::fs::chown(&key, Some(uid), Some(gid)).unwrap();
                }
                std::fs::write(
                    data.join("pg_hba.conf"),
                    "local all all trust\n\
                     hostssl all all 127.0.0.1/32 trust\n\
                     hostnossl all all 127.0.0.1/32 reject\n",
                )
                .unwrap();
                options.push_str(&format!(
                    " -c listen_addresses=127.0.0.1 -c ssl=on -c ssl_cert_file={} \
                     -c ssl_key_file={}",
                    cert.display(),
                    key.display()
                ));
            }
        }
        for s in settings {
            options.push(' ');
            options.push_str(s);
        }
        std::fs::create_dir(&socket).unwrap();
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&socket, Some(uid), Some(gid)).unwrap();
        }
        let log = cluster.dir.path().join("server.log");
        cluster.running = true;
        cluster.run(
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap(),
                "-l",
                log.to_str().unwrap(),
                "-o",
                &options,
                "-w",
                "-t",
                "30",
                "start",
            ],
        );
        cluster
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn socket_dir(&self) -> PathBuf {
        self.dir.path().join("sock")
    }

    /// Runs a server program as the cluster's owner; panics with its output and the server
    /// log when it fails.
    fn run(&self, program: &str, args: &[&str]) {
        let mut cmd = Command::new(self.bin.join(program));
        cmd.args(args)
            .current_dir(self.dir.path())
            .env("LC_ALL", "C");
        if let Some((uid, gid)) = self.owner {
            cmd.uid(uid).gid(gid);
        }
        let out = cmd.output().unwrap();
        if !out.status.success() {
            panic!(
                "{program} {args:?} failed: {}{}\nserver log:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
            );
        }
    }

    /// libpq's key=value form.
    pub fn conninfo(&self, dbname: &str) -> String {
        format!(
            "host={} port={} user={USER} dbname={dbname}",
            self.socket_dir().display(),
            self.port
        )
    }

    /// The URL form `komnet-enroll init --database` takes (the socket directory as the host,
    /// percent-encoded).
    pub fn url(&self, dbname: &str) -> String {
        let host: String = self.socket_dir().to_str().unwrap().replace('/', "%2F");
        format!("postgres://{USER}@{host}:{}/{dbname}", self.port)
    }

    /// The URL of `dbname` over TCP to `host` (a cluster from [`Cluster::start_tls`]).
    pub fn tcp_url(&self, host: &str, dbname: &str) -> String {
        format!("postgres://{USER}@{host}:{}/{dbname}", self.port)
    }

    pub fn database_url(&self, dbname: &str) -> DatabaseUrl {
        DatabaseUrl::parse(&self.url(dbname)).unwrap()
    }

    /// A connection for the test's own queries.
    pub async fn client(&self, dbname: &str) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.conninfo(dbname), tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        client
    }

    /// A new, empty database.
    pub async fn create_database(&self, name: &str) -> DatabaseUrl {
        self.client("postgres")
            .await
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        self.database_url(name)
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if !self.running {
            return;
        }
        let mut cmd = Command::new(self.bin.join("pg_ctl"));
        cmd.args(["-D", self.data_dir().to_str().unwrap_or_default()])
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        if let Some((uid, gid)) = self.owner {
            cmd.uid(uid).gid(gid);
        }
        let _ = cmd.status();
    }
}
