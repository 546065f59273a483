//! netprobe: real TCP/UDP/ICMP traffic for the firewall tests, run inside a namespace.
//!
//! `netprobe serve tcp:ADDR:PORT udp:[V6]:PORT …` listens (TCP answers "ok", UDP echoes),
//! prints `ready` once every socket is bound, and runs until killed.
//! `netprobe serve echo:ADDR:PORT` is a TCP echo server (greeting "ok" first) for `netprobe hold SRC DST PORT SECS`,
//! which keeps one connection open for SECS seconds, exchanging a byte every 100 ms, and
//! prints `held` or `broken after MS ms: ERROR` (a connection that must survive a change).
//! `netprobe probe --timeout-ms N tcp,SRC,DST,PORT udp,SRC,DST,PORT icmp,SRC,DST …` tries each
//! flow at once from its source address and prints one line per flow, in order: `pass` when
//! the packet reached the destination (an answer, a TCP reset or an ICMP port-unreachable all
//! prove that) or `blocked` when nothing came back before the timeout.
//! `netprobe lose-answers LISTEN UPSTREAM FLAG` is a TCP proxy for TLS that loses answers: on
//! a connection accepted while the file FLAG exists, the client's bytes all reach UPSTREAM, but
//! once the client has sent application data (its second encrypted record: the first is its
//! handshake Finished) the server's bytes are swallowed, and after the first KiB of its answer
//! the client's side is closed, `lost answer N` printed, and the server read to its end (so the
//! service finishes what it committed). Without FLAG it forwards both ways.

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpListener, UdpSocket};
use std::process::{Command, ExitCode};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("serve") => serve(&args[1..]),
        Some("probe") => probe(&args[1..]),
        Some("hold") => hold(&args[1..]),
        Some("lose-answers") => lose_answers(&args[1..]),
        _ => Err("usage: netprobe serve SPEC… | netprobe probe --timeout-ms N FLOW…".to_owned()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("netprobe: {e}");
            ExitCode::from(2)
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Listen {
    Tcp,
    Echo,
    Udp,
}

fn parse_listen(spec: &str) -> Result<(Listen, SocketAddr), String> {
    let (proto, addr) = spec
        .split_once(':')
        .ok_or_else(|| format!("bad listen spec {spec:?}"))?;
    let addr: SocketAddr = addr
        .parse()
        .map_err(|e| format!("bad address in {spec:?}: {e}"))?;
    match proto {
        "tcp" => Ok((Listen::Tcp, addr)),
        "echo" => Ok((Listen::Echo, addr)),
        "udp" => Ok((Listen::Udp, addr)),
        _ => Err(format!("bad protocol in {spec:?}")),
    }
}

/// Counts the complete TLS records of type application data (23) in one direction of a
/// connection, from the plaintext record headers (type, version, length).
#[derive(Default)]
struct AppRecords {
    header: Vec<u8>,
    body_left: usize,
    in_app_record: bool,
    complete: usize,
}

impl AppRecords {
    fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.body_left > 0 {
                let n = self.body_left.min(bytes.len());
                self.body_left -= n;
                bytes = &bytes[n..];
                if self.body_left == 0 && self.in_app_record {
                    self.complete += 1;
                }
                continue;
            }
            let n = (5 - self.header.len()).min(bytes.len());
            self.header.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if self.header.len() == 5 {
                self.in_app_record = self.header[0] == 23;
                self.body_left = usize::from(u16::from_be_bytes([self.header[3], self.header[4]]));
                self.header.clear();
                if self.body_left == 0 && self.in_app_record {
                    self.complete += 1;
                }
            }
        }
    }
}

fn lose_answers(args: &[String]) -> Result<(), String> {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    let [listen, upstream, flag] = args else {
        return Err("usage: netprobe lose-answers LISTEN UPSTREAM FLAG".to_owned());
    };
    let listen: SocketAddr = listen
        .parse()
        .map_err(|e| format!("bad listen address: {e}"))?;
    let upstream: SocketAddr = upstream
        .parse()
        .map_err(|e| format!("bad upstream address: {e}"))?;
    let flag = std::path::PathBuf::from(flag);
    let listener = TcpListener::bind(listen).map_err(|e| format!("bind {listen}: {e}"))?;
    println!("ready");
    let _ = std::io::stdout().flush();
    let lost = Arc::new(AtomicUsize::new(0));
    for client in listener.incoming() {
        let Ok(client) = client else { continue };
        let lossy = flag.exists();
        let Ok(server) = std::net::TcpStream::connect(upstream) else {
            continue;
        };
        let request_sent = Arc::new(AtomicBool::new(false));
        let (mut c_read, mut s_write) = (
            client.try_clone().map_err(|e| e.to_string())?,
            server.try_clone().map_err(|e| e.to_string())?,
        );
        let sent = request_sent.clone();
        // Client to server: everything, counting the client's encrypted records.
        std::thread::spawn(move || {
            let mut records = AppRecords::default();
            let mut buf = [0u8; 16384];
            loop {
                match c_read.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if s_write.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        records.feed(&buf[..n]);
                        if records.complete >= 2 {
                            sent.store(true, Ordering::SeqCst);
                        }
                    }
                }
            }
            if !lossy {
                let _ = s_write.shutdown(std::net::Shutdown::Write);
            }
        });
        let lost = lost.clone();
        std::thread::spawn(move || {
            let (mut s_read, mut c_write) = (server, client);
            let mut swallowed = 0usize;
            let mut closed = false;
            let mut buf = [0u8; 16384];
            loop {
                match s_read.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) if lossy && request_sent.load(Ordering::SeqCst) => {
                        swallowed += n;
                        if swallowed >= 1024 && !closed {
                            let _ = c_write.shutdown(std::net::Shutdown::Both);
                            closed = true;
                            println!("lost answer {}", lost.fetch_add(1, Ordering::SeqCst) + 1);
                            let _ = std::io::stdout().flush();
                        }
                    }
                    Ok(n) => {
                        if !closed && c_write.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = c_write.shutdown(std::net::Shutdown::Both);
        });
    }
    Ok(())
}

fn hold(args: &[String]) -> Result<(), String> {
    let [src, dst, port, secs] = args else {
        return Err("usage: netprobe hold SRC DST PORT SECS".to_owned());
    };
    let src: IpAddr = src.parse().map_err(|e| format!("bad source: {e}"))?;
    let dst: IpAddr = dst.parse().map_err(|e| format!("bad destination: {e}"))?;
    let port: u16 = port.parse().map_err(|e| format!("bad port: {e}"))?;
    let secs: u64 = secs.parse().map_err(|e| format!("bad seconds: {e}"))?;
    let dst = SocketAddr::new(dst, port);
    let socket = Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))
        .map_err(|e| e.to_string())?;
    socket
        .bind(&SocketAddr::new(src, 0).into())
        .map_err(|e| format!("bind {src}: {e}"))?;
    socket
        .connect_timeout(&dst.into(), Duration::from_secs(3))
        .map_err(|e| format!("connect {dst}: {e}"))?;
    let mut stream: std::net::TcpStream = socket.into();
    stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .map_err(|e| e.to_string())?;
    let mut greeting = [0u8; 2];
    stream
        .read_exact(&mut greeting)
        .map_err(|e| format!("no greeting from {dst}: {e}"))?;
    println!("connected");
    let _ = std::io::stdout().flush();
    let start = std::time::Instant::now();
    let mut n: u8 = 0;
    while start.elapsed() < Duration::from_secs(secs) {
        n = n.wrapping_add(1);
        let mut back = [0u8; 1];
        let result = stream
            .write_all(&[n])
            .and_then(|()| stream.read_exact(&mut back));
        match result {
            Ok(()) if back[0] == n => {}
            Ok(()) => return Err(format!("echo returned {} for {n}", back[0])),
            Err(e) => {
                println!("broken after {} ms: {e}", start.elapsed().as_millis());
                return Ok(());
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("held");
    Ok(())
}

fn serve(specs: &[String]) -> Result<(), String> {
    for spec in specs {
        let (kind, addr) = parse_listen(spec)?;
        if kind == Listen::Echo {
            let listener = TcpListener::bind(addr).map_err(|e| format!("bind tcp {addr}: {e}"))?;
            std::thread::spawn(move || {
                for mut conn in listener.incoming().flatten() {
                    std::thread::spawn(move || {
                        // "ok" first, as the plain TCP server: `probe` works against it too.
                        if conn.write_all(b"ok").is_err() {
                            return;
                        }
                        let mut buf = [0u8; 512];
                        while let Ok(n) = conn.read(&mut buf) {
                            if n == 0 || conn.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    });
                }
            });
        } else if kind == Listen::Tcp {
            let listener = TcpListener::bind(addr).map_err(|e| format!("bind tcp {addr}: {e}"))?;
            std::thread::spawn(move || {
                for mut conn in listener.incoming().flatten() {
                    let _ = conn.write_all(b"ok");
                }
            });
        } else {
            let socket = UdpSocket::bind(addr).map_err(|e| format!("bind udp {addr}: {e}"))?;
            std::thread::spawn(move || {
                let mut buf = [0u8; 1500];
                while let Ok((n, from)) = socket.recv_from(&mut buf) {
                    let _ = socket.send_to(&buf[..n], from);
                }
            });
        }
    }
    println!("ready");
    let _ = std::io::stdout().flush();
    loop {
        std::thread::park();
    }
}

fn probe(args: &[String]) -> Result<(), String> {
    let (timeout, flows) = match args {
        [flag, ms, rest @ ..] if flag == "--timeout-ms" => (
            Duration::from_millis(ms.parse().map_err(|e| format!("bad timeout: {e}"))?),
            rest,
        ),
        _ => return Err("probe needs --timeout-ms N first".to_owned()),
    };
    let handles: Vec<_> = flows
        .iter()
        .cloned()
        .map(|flow| std::thread::spawn(move || try_flow(&flow, timeout)))
        .collect();
    for h in handles {
        let line = h
            .join()
            .map_err(|_| "a probe thread panicked".to_owned())??;
        println!("{line}");
    }
    Ok(())
}

fn try_flow(flow: &str, timeout: Duration) -> Result<&'static str, String> {
    let parts: Vec<&str> = flow.split(',').collect();
    let ip = |s: &str| {
        s.parse::<IpAddr>()
            .map_err(|e| format!("bad address {s:?}: {e}"))
    };
    let port = |s: &str| s.parse::<u16>().map_err(|e| format!("bad port {s:?}: {e}"));
    let passed = match parts.as_slice() {
        ["tcp", src, dst, p] => tcp_passes(ip(src)?, SocketAddr::new(ip(dst)?, port(p)?), timeout)?,
        ["udp", src, dst, p] => udp_passes(ip(src)?, SocketAddr::new(ip(dst)?, port(p)?), timeout)?,
        ["icmp", src, dst] => icmp_passes(ip(src)?, ip(dst)?, timeout)?,
        _ => return Err(format!("bad flow {flow:?}")),
    };
    Ok(if passed { "pass" } else { "blocked" })
}

fn tcp_passes(src: IpAddr, dst: SocketAddr, timeout: Duration) -> Result<bool, String> {
    let socket = Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))
        .map_err(|e| e.to_string())?;
    socket
        .bind(&SocketAddr::new(src, 0).into())
        .map_err(|e| format!("bind {src}: {e}"))?;
    match socket.connect_timeout(&dst.into(), timeout) {
        Ok(()) => {
            let mut stream: std::net::TcpStream = socket.into();
            let _ = stream.set_read_timeout(Some(timeout));
            let mut buf = [0u8; 2];
            Ok(stream.read_exact(&mut buf).is_ok() && &buf == b"ok")
        }
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(true),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
            ) =>
        {
            Ok(false)
        }
        // Unreachable answers come from a router on the way: the packet did not get through.
        Err(_) => Ok(false),
    }
}

fn udp_passes(src: IpAddr, dst: SocketAddr, timeout: Duration) -> Result<bool, String> {
    let socket =
        UdpSocket::bind(SocketAddr::new(src, 0)).map_err(|e| format!("bind {src}: {e}"))?;
    socket.connect(dst).map_err(|e| e.to_string())?;
    socket
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    socket.send(b"probe").map_err(|e| e.to_string())?;
    let mut buf = [0u8; 16];
    match socket.recv(&mut buf) {
        Ok(n) => Ok(&buf[..n] == b"probe"),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(true),
        Err(_) => Ok(false),
    }
}

fn icmp_passes(src: IpAddr, dst: IpAddr, timeout: Duration) -> Result<bool, String> {
    let wait = timeout.as_secs().max(1).to_string();
    let status = Command::new("ping")
        .args([
            "-n",
            "-q",
            "-c",
            "1",
            "-W",
            &wait,
            "-I",
            &src.to_string(),
            &dst.to_string(),
        ])
        .output()
        .map_err(|e| format!("cannot run ping: {e}"))?;
    Ok(status.status.success())
}
