# lib.sh — shared by komnet's end-to-end benchmark scripts (sourced, not run).
# Two network namespaces joined by one veth pair, one WireGuard daemon following wireguard-go's
# CLI in each (komnet-gateway or wireguard-go), configured with `wg`. Namespaces, veths and
# daemons come from scripts/netns.sh, which also ends everything started (tracked PIDs and every
# process left in the namespaces) and deletes the namespaces on exit, also on failure.
set -u
# shellcheck source=scripts/netns.sh
. "$(dirname "${BASH_SOURCE[0]}")/../scripts/netns.sh"

BENCH_ID=$$
NS_L=kbl-$BENCH_ID; NS_R=kbr-$BENCH_ID
UNDER_L=10.231.$((BENCH_ID % 250)).1; UNDER_R=10.231.$((BENCH_ID % 250)).2
TUN_L=10.232.$((BENCH_ID % 250)).1; TUN_R=10.232.$((BENCH_ID % 250)).2
PAIR_N=0

blog() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
bdie() { blog "ERROR: $*"; exit 1; }

# bench_cleanup: everything netns.sh tracks, and the pair's namespaces by name with whatever
# runs in them (throughput.sh sets pairs up in command substitutions, subshells whose tracking
# does not come back to it).
bench_cleanup() {
    netns_cleanup
    netns_del "$NS_L" "$NS_R"
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
# shellcheck disable=SC2034 # PID_L, PID_R are for the callers
pair_up() {
    local bin_l=$1 bin_r=$2 kl kr
    bench_cleanup
    PAIR_N=$((PAIR_N + 1))
    IF_L=kbl$BENCH_ID-$PAIR_N; IF_R=kbr$BENCH_ID-$PAIR_N
    netns_add "$NS_L" "$NS_R" || bdie "ip netns add"
    netns_veth "$NS_L" veth0 "$UNDER_L/30" "$NS_R" veth0 "$UNDER_R/30" || bdie "veth"
    netns_wg_start "$NS_L" "$IF_L" "$bin_l" || bdie "left daemon did not start"
    PID_L=$NETNS_LAST_PID
    netns_wg_start "$NS_R" "$IF_R" "$bin_r" || bdie "right daemon did not start"
    PID_R=$NETNS_LAST_PID
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
