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
//!
//! The file transfers, UDP catches and HTTP fetches of the tests and demos (one tool instead of
//! embedded Python copies):
//! `netprobe receive ADDR:PORT OUT READY` accepts one TCP connection (within 60 s), writes what
//! it carries into OUT, creates the file READY once it listens (so a sender never races the
//! bind) and prints the byte count.
//! `netprobe send ADDR:PORT FILE [RATE]` sends FILE over one TCP connection, paced to RATE
//! bytes/s if given and not 0, then half-closes and waits for the receiver to close (so when it
//! exits, every byte was read) and prints the byte count.
//! `netprobe catch-udp ADDR:PORT SECS` binds, prints `ready`, then `got HEX` for the first
//! datagram within SECS seconds or `none`.
//! `netprobe send-udp ADDR:PORT TEXT` sends TEXT as one datagram.
//! `netprobe get http://ADDR:PORT/PATH` prints the body of a plain-HTTP GET; an answer other
//! than 200 is an error.

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
        Some("receive") => receive(&args[1..]),
        Some("send") => send(&args[1..]),
        Some("catch-udp") => catch_udp(&args[1..]),
        Some("send-udp") => send_udp(&args[1..]),
        Some("get") => get(&args[1..]),
        _ => Err(
            "usage: netprobe serve SPEC… | probe --timeout-ms N FLOW… | hold SRC DST PORT \
                  SECS | lose-answers LISTEN UPSTREAM FLAG | receive ADDR:PORT OUT READY | send \
                  ADDR:PORT FILE [RATE] | catch-udp ADDR:PORT SECS | send-udp ADDR:PORT TEXT | get URL"
                .to_owned(),
        ),
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

/// How long a transfer waits for its peer (a connection, the next bytes, the close).
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(60);

fn socket_addr(text: &str) -> Result<SocketAddr, String> {
    text.parse()
        .map_err(|e| format!("bad address {text:?} (ADDR:PORT, [V6]:PORT): {e}"))
}

fn receive(args: &[String]) -> Result<(), String> {
    let [addr, out, ready] = args else {
        return Err("usage: netprobe receive ADDR:PORT OUT READY".to_owned());
    };
    let addr = socket_addr(addr)?;
    let listener = TcpListener::bind(addr).map_err(|e| format!("bind {addr}: {e}"))?;
    std::fs::File::create(ready).map_err(|e| format!("creating {ready}: {e}"))?;
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let start = std::time::Instant::now();
    let mut conn = loop {
        match listener.accept() {
            Ok((conn, _)) => break conn,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if start.elapsed() > TRANSFER_TIMEOUT {
                    return Err(format!("no connection on {addr} within 60 s"));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(format!("accept on {addr}: {e}")),
        }
    };
    conn.set_nonblocking(false).map_err(|e| e.to_string())?;
    conn.set_read_timeout(Some(TRANSFER_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let mut file = std::fs::File::create(out).map_err(|e| format!("creating {out}: {e}"))?;
    let total = std::io::copy(&mut conn, &mut file).map_err(|e| format!("receiving: {e}"))?;
    file.sync_all().map_err(|e| format!("writing {out}: {e}"))?;
    println!("{total}");
    Ok(())
}

fn send(args: &[String]) -> Result<(), String> {
    let (addr, path, rate) = match args {
        [addr, path] => (addr, path, 0.0),
        [addr, path, rate] => (
            addr,
            path,
            rate.parse::<f64>()
                .map_err(|e| format!("bad rate {rate:?}: {e}"))?,
        ),
        _ => return Err("usage: netprobe send ADDR:PORT FILE [RATE]".to_owned()),
    };
    let addr = socket_addr(addr)?;
    let mut conn = std::net::TcpStream::connect_timeout(&addr, TRANSFER_TIMEOUT)
        .map_err(|e| format!("connect {addr}: {e}"))?;
    conn.set_write_timeout(Some(TRANSFER_TIMEOUT))
        .map_err(|e| e.to_string())?;
    conn.set_read_timeout(Some(TRANSFER_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let mut file = std::fs::File::open(path).map_err(|e| format!("opening {path}: {e}"))?;
    let start = std::time::Instant::now();
    let mut sent: u64 = 0;
    let mut chunk = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut chunk)
            .map_err(|e| format!("reading {path}: {e}"))?;
        if n == 0 {
            break;
        }
        conn.write_all(&chunk[..n])
            .map_err(|e| format!("sending to {addr}: {e}"))?;
        sent += n as u64;
        if rate > 0.0 {
            let ahead = sent as f64 / rate - start.elapsed().as_secs_f64();
            if ahead > 0.0 {
                std::thread::sleep(Duration::from_secs_f64(ahead));
            }
        }
    }
    conn.shutdown(std::net::Shutdown::Write)
        .map_err(|e| format!("closing the sending side: {e}"))?;
    // The receiver closes once it has read everything.
    let mut rest = [0u8; 1];
    conn.read(&mut rest)
        .map_err(|e| format!("waiting for {addr} to close: {e}"))?;
    println!("{sent}");
    Ok(())
}

fn catch_udp(args: &[String]) -> Result<(), String> {
    let [addr, secs] = args else {
        return Err("usage: netprobe catch-udp ADDR:PORT SECS".to_owned());
    };
    let addr = socket_addr(addr)?;
    let secs: f64 = secs
        .parse()
        .map_err(|e| format!("bad seconds {secs:?}: {e}"))?;
    let socket = UdpSocket::bind(addr).map_err(|e| format!("bind udp {addr}: {e}"))?;
    socket
        .set_read_timeout(Some(Duration::from_secs_f64(secs.max(0.001))))
        .map_err(|e| e.to_string())?;
    println!("ready");
    let _ = std::io::stdout().flush();
    let mut buf = vec![0u8; 65535];
    match socket.recv_from(&mut buf) {
        Ok((n, _)) => {
            let hex: String = buf[..n].iter().map(|b| format!("{b:02x}")).collect();
            println!("got {hex}");
        }
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            println!("none");
        }
        Err(e) => return Err(format!("receiving on {addr}: {e}")),
    }
    Ok(())
}

fn send_udp(args: &[String]) -> Result<(), String> {
    let [addr, text] = args else {
        return Err("usage: netprobe send-udp ADDR:PORT TEXT".to_owned());
    };
    let addr = socket_addr(addr)?;
    let any: SocketAddr = if addr.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(any).map_err(|e| format!("bind udp: {e}"))?;
    socket
        .send_to(text.as_bytes(), addr)
        .map_err(|e| format!("sending to {addr}: {e}"))?;
    Ok(())
}

fn get(args: &[String]) -> Result<(), String> {
    let [url] = args else {
        return Err("usage: netprobe get http://ADDR:PORT/PATH".to_owned());
    };
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url:?}: only http:// URLs"))?;
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let addr = socket_addr(authority)?;
    let mut conn = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    write!(conn, "GET /{path} HTTP/1.0\r\nHost: {authority}\r\n\r\n")
        .map_err(|e| format!("sending to {addr}: {e}"))?;
    let mut answer = Vec::new();
    conn.read_to_end(&mut answer)
        .map_err(|e| format!("reading from {addr}: {e}"))?;
    let text = String::from_utf8_lossy(&answer);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{url}: not an HTTP answer"))?;
    let status = head.lines().next().unwrap_or_default();
    if status.split(' ').nth(1) != Some("200") {
        return Err(format!("{url}: {status}"));
    }
    print!("{body}");
    Ok(())
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
