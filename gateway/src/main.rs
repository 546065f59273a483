//! `komnet-gateway [-f|--foreground] IFNAME`: the wireguard-go compatible daemon.
fn main() {
    eprintln!("komnet-gateway: not wired yet");
    std::process::exit(2);
}
