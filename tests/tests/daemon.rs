//! The komnet-gateway daemon as an operator meets it, over its real UAPI socket in a network
//! namespace: protocol errors answer the right errno and change nothing, the socket is root
//! only, and the daemon exits cleanly (socket removed) on SIGTERM and when its interface is
//! deleted. Needs root; never skipped.

// Helpers outside #[test] functions panic on purpose: a failed step fails the test.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use komnet_netns_tests::{
    komnet_gateway_binary, require_root_and_tools, uapi_socket_path, wait_until, Daemon,
    DaemonKind, Netns, TempDir,
};

const K1: &str = "a0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebf";
const K2: &str = "0101010101010101010101010101010101010101010101010101010101010101";

/// Sends one raw UAPI request and returns the answer up to and including the empty line.
fn uapi(socket: &Path, request: &str) -> String {
    let mut conn = UnixStream::connect(socket).expect("connect to the UAPI socket");
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    conn.write_all(request.as_bytes()).unwrap();
    let mut answer = Vec::new();
    let mut byte = [0u8; 1];
    while !answer.ends_with(b"\n\n") {
        match conn.read(&mut byte) {
            Ok(0) => break,
            Ok(_) => answer.push(byte[0]),
            Err(e) => panic!("reading the UAPI answer to {request:?}: {e}"),
        }
    }
    String::from_utf8(answer).expect("UAPI answers are text")
}

fn start(label: &str) -> (Netns, Daemon, String, TempDir) {
    require_root_and_tools();
    let ns = Netns::new(label).expect("netns");
    let logs = TempDir::new(label).expect("temp dir");
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let ifname = format!("kd{}-{n}", std::process::id() % 100_000);
    let daemon = Daemon::start(DaemonKind::Komnet, &ns, &ifname, logs.path()).expect("daemon");
    (ns, daemon, ifname, logs)
}

#[test]
fn uapi_errors_answer_the_right_errno_and_change_nothing() {
    let (_ns, daemon, ifname, _logs) = start("uapierr");
    let socket = uapi_socket_path(&ifname);
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        mode, 0o600,
        "the UAPI socket hands out the private key: root only"
    );

    let good = format!(
        "set=1\nprivate_key={K1}\nlisten_port=51999\npublic_key={K2}\nallowed_ip=10.9.0.0/24\n\n"
    );
    assert_eq!(uapi(&socket, &good), "errno=0\n\n");
    let before = uapi(&socket, "get=1\n\n");
    assert!(
        before.contains("listen_port=51999\n") && before.contains("allowed_ip=10.9.0.0/24\n"),
        "{before}"
    );

    // (request, errno wg turns into the message it prints)
    let bad = [
        // A later line is invalid: the earlier, valid ones must not have been applied.
        (
            format!("set=1\nreplace_peers=true\npublic_key={K1}\nallowed_ip=10.8.0.0/33\n\n"),
            -libc_einval(),
        ),
        ("set=1\nlisten_port=99999\n\n".to_string(), -libc_einval()),
        ("set=1\nno_such_key=1\n\n".to_string(), -libc_einval()),
        ("set=1\nnot a key value line\n\n".to_string(), -71),
        (
            format!("set=1\npublic_key={K2}\nprotocol_version=2\n\n"),
            -libc_einval(),
        ),
        ("set=1\nprivate_key=not-hex\n\n".to_string(), -libc_einval()),
        ("get=2\n\n".to_string(), -71),
    ];
    for (request, errno) in &bad {
        assert_eq!(
            uapi(&socket, request),
            format!("errno={errno}\n\n"),
            "request {request:?}"
        );
        assert_eq!(
            uapi(&socket, "get=1\n\n"),
            before,
            "state changed after refused {request:?}"
        );
    }
    // The private key never appears in the daemon's log, whatever it was sent.
    let log = std::fs::read_to_string(daemon.log_path()).unwrap_or_default();
    assert!(
        !log.contains(K1) && !log.contains("not-hex"),
        "a key reached the log:\n{log}"
    );
}

fn libc_einval() -> i32 {
    22
}

#[test]
fn a_port_in_use_answers_eaddrinuse_and_keeps_the_old_port() {
    let (ns, _daemon, ifname, _logs) = start("portuse");
    let socket = uapi_socket_path(&ifname);
    assert_eq!(uapi(&socket, "set=1\nlisten_port=51998\n\n"), "errno=0\n\n");
    // Something else holds 51997 in the same namespace.
    let mut holder = ns
        .command(env!("CARGO_BIN_EXE_netprobe"))
        .args(["catch-udp", "0.0.0.0:51997", "30"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = [0u8; 6];
    holder
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut line)
        .unwrap();
    assert_eq!(&line, b"ready\n");
    assert_eq!(
        uapi(&socket, "set=1\nlisten_port=51997\n\n"),
        "errno=-98\n\n"
    );
    assert!(uapi(&socket, "get=1\n\n").contains("listen_port=51998\n"));
    let _ = holder.kill();
    let _ = holder.wait();
}

/// Waits for the daemon to exit after `cause`, and checks it exited with success and removed
/// its UAPI socket.
fn assert_exits_cleanly(daemon: &mut Daemon, socket: &Path, cause: &str) {
    let exit = wait_until(
        &format!("komnet-gateway to exit after {cause}"),
        Duration::from_secs(5),
        || Ok(daemon.poll_exit()),
    )
    .unwrap_or_else(|e| panic!("the daemon must exit after {cause}: {e:?}"));
    assert!(exit.success(), "exit status {exit} after {cause}");
    assert!(
        !socket.exists(),
        "{} left behind after {cause}",
        socket.display()
    );
}

#[test]
fn sigterm_stops_the_daemon_and_removes_its_socket() {
    let (_ns, mut daemon, ifname, _logs) = start("sigterm");
    let pid = daemon.pid().to_string();
    let status = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(status.success());
    assert_exits_cleanly(&mut daemon, &uapi_socket_path(&ifname), "SIGTERM");
}

#[test]
fn deleting_the_interface_stops_the_daemon() {
    let (ns, mut daemon, ifname, _logs) = start("linkdel");
    ns.ip(&["link", "del", &ifname]).expect("ip link del");
    assert_exits_cleanly(
        &mut daemon,
        &uapi_socket_path(&ifname),
        "its interface was deleted",
    );
}

#[test]
fn a_second_daemon_for_the_same_interface_refuses_clearly() {
    let (ns, _daemon, ifname, _logs) = start("twice");
    let out = ns
        .command(komnet_gateway_binary().unwrap())
        .args(["-f", &ifname])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&ifname) && stderr.contains("in use"),
        "{stderr}"
    );
    // The first daemon still serves its socket.
    assert!(uapi(&uapi_socket_path(&ifname), "get=1\n\n").ends_with("errno=0\n\n"));
}

#[test]
fn bad_command_lines_fail_with_usage() {
    require_root_and_tools();
    let bin = komnet_gateway_binary().unwrap();
    for args in [
        &["-x", "wg0"][..],
        &[][..],
        &["wg0", "wg1"][..],
        &["an-interface-name-too-long"][..],
    ] {
        let out = Command::new(&bin).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.starts_with("komnet-gateway: "), "{args:?}: {stderr}");
    }
    let out = Command::new(&bin).arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("komnet-gateway "));
}
