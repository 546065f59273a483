# lib.sh — shared by komnet's end-to-end benchmark scripts (sourced, not run).
# Two network namespaces joined by one veth pair, one WireGuard daemon following wireguard-go's
# CLI in each (komnet-gateway or wireguard-go), configured with `wg`. Everything started is
# killed by PID and both namespaces are deleted on exit, also on failure.
set -u

BENCH_ID=$$
NS_L=kbl-$BENCH_ID; NS_R=kbr-$BENCH_ID
UNDER_L=10.231.$((BENCH_ID % 250)).1; UNDER_R=10.231.$((BENCH_ID % 250)).2
TUN_L=10.232.$((BENCH_ID % 250)).1; TUN_R=10.232.$((BENCH_ID % 250)).2
BENCH_PIDS=()
PAIR_N=0

blog() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
bdie() { blog "ERROR: $*"; exit 1; }

bench_cleanup() {
    local p
    for p in "${BENCH_PIDS[@]}"; do kill "$p" 2>/dev/null; done
    sleep 0.3
    for p in "${BENCH_PIDS[@]}"; do kill -9 "$p" 2>/dev/null; done
    BENCH_PIDS=()
    ip netns del "$NS_L" 2>/dev/null
    ip netns del "$NS_R" 2>/dev/null
    rm -f /run/wireguard/kb[lr]"$BENCH_ID"-*.sock
}

bench_require() {
    [ "$(id -u)" = 0 ] || bdie "must run as root (network namespaces, TUN)"
    [ -c /dev/net/tun ] || bdie "/dev/net/tun missing"
    local c
    for c in ip wg iperf3 ping; do command -v "$c" >/dev/null || bdie "$c missing: run scripts/setup.sh bench"; done
    trap bench_cleanup EXIT
    trap 'exit 130' INT TERM
}

# pair_up BIN_L BIN_R: fresh namespaces, a daemon on each side, tunnel up. Sets IF_L, IF_R,
# PID_L, PID_R.
pair_up() {
    local bin_l=$1 bin_r=$2 kl kr
    bench_cleanup
    PAIR_N=$((PAIR_N + 1))
    IF_L=kbl$BENCH_ID-$PAIR_N; IF_R=kbr$BENCH_ID-$PAIR_N
    ip netns add "$NS_L" && ip netns add "$NS_R" || bdie "ip netns add"
    ip link add veth0 netns "$NS_L" type veth peer name veth0 netns "$NS_R" || bdie "veth"
    ip -n "$NS_L" addr add "$UNDER_L/30" dev veth0; ip -n "$NS_R" addr add "$UNDER_R/30" dev veth0
    for ns in "$NS_L" "$NS_R"; do ip -n "$ns" link set lo up; ip -n "$ns" link set veth0 up; done
    ip netns exec "$NS_L" env WG_PROCESS_FOREGROUND=1 LOG_LEVEL=error "$bin_l" -f "$IF_L" >/dev/null 2>&1 &
    PID_L=$!; BENCH_PIDS+=("$PID_L")
    ip netns exec "$NS_R" env WG_PROCESS_FOREGROUND=1 LOG_LEVEL=error "$bin_r" -f "$IF_R" >/dev/null 2>&1 &
    PID_R=$!; BENCH_PIDS+=("$PID_R")
    for _ in $(seq 100); do
        [ -S "/run/wireguard/$IF_L.sock" ] && [ -S "/run/wireguard/$IF_R.sock" ] && break
        sleep 0.05
    done
    kl=$(wg genkey); kr=$(wg genkey)
    ip netns exec "$NS_L" wg set "$IF_L" private-key <(echo "$kl") listen-port 51820 \
        peer "$(wg pubkey <<<"$kr")" endpoint "$UNDER_R:51820" allowed-ips "$TUN_R/32" || bdie "wg set left"
    ip netns exec "$NS_R" wg set "$IF_R" private-key <(echo "$kr") listen-port 51820 \
        peer "$(wg pubkey <<<"$kl")" endpoint "$UNDER_L:51820" allowed-ips "$TUN_L/32" || bdie "wg set right"
    ip -n "$NS_L" addr add "$TUN_L/24" dev "$IF_L"; ip -n "$NS_L" link set "$IF_L" mtu 1420 up
    ip -n "$NS_R" addr add "$TUN_R/24" dev "$IF_R"; ip -n "$NS_R" link set "$IF_R" mtu 1420 up
    ip netns exec "$NS_L" ping -c 3 -i 0.2 -W 2 "$TUN_R" >/dev/null || bdie "no ping through the tunnel"
}

# Path of wireguard-go 0.0.20231211 (the fast userspace anchor): $WGGO_2023 if set, else what
# scripts/wireguard-go-2023.sh fetches and unpacks (from this repository, nothing outside it).
wggo_2023() {
    if [ -n "${WGGO_2023:-}" ]; then
        [ -x "$WGGO_2023" ] || bdie "WGGO_2023=$WGGO_2023 is not executable"
        echo "$WGGO_2023"; return
    fi
    scripts/wireguard-go-2023.sh || bdie "wireguard-go 0.0.20231211 not available (scripts/wireguard-go-2023.sh)"
}
