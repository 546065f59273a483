#!/usr/bin/env bash
# demo-interop.sh — komnet-gateway and Debian's stock wireguard-go talking
# WireGuard to each other, end to end, with a report.
#
#   sudo scripts/demo-interop.sh
#
# It installs the system packages (scripts/setup.sh), builds komnet-gateway in release mode,
# then builds two network namespaces joined by a veth pair, runs komnet-gateway in one and
# wireguard-go in the other (both in the foreground, configured with `wg` over the UAPI socket
# /run/wireguard/IFNAME.sock), pings through the tunnel both ways over inner IPv4 and IPv6,
# transfers a 100 MB random file over TCP each way with sha256 compared at both ends, and prints
# a report: handshake times and counters from `wg show` on both sides, ping RTTs, throughput,
# checksum match. All traffic stays inside the two namespaces this script creates. Everything
# it starts is ended (scripts/netns.sh) and both namespaces are deleted on exit, also on failure
# or Ctrl-C.
# Exits non-zero on any failure.
#
# Knobs (environment):
#   KOMNET_GATEWAY_BIN   use this komnet-gateway binary and skip the cargo build
#   KOMNET_NETPROBE_BIN  use this netprobe binary (the file transfers) and skip its build
#   DEMO_MB              size of each transfer in MB (default 100)
#   LOGDIR               keep the daemon logs here (default: a temp dir, removed on exit)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/netns.sh
. scripts/netns.sh

DEMO_MB=${DEMO_MB:-100}

log() { printf '[demo %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }

[ "$(id -u)" = 0 ] || { echo "demo-interop.sh needs root (network namespaces, TUN devices): run 'sudo scripts/demo-interop.sh'" >&2; exit 1; }

scripts/setup.sh demo
TARGET=${CARGO_TARGET_DIR:-$PWD/target}
if [ -n "${KOMNET_GATEWAY_BIN:-}" ]; then
    GATEWAY=$KOMNET_GATEWAY_BIN
    log "using KOMNET_GATEWAY_BIN=$GATEWAY (no build)"
else
    log "cargo build --release -p komnet-gateway"
    cargo build --release --locked -p komnet-gateway --bins
    GATEWAY=$TARGET/release/komnet-gateway
fi
[ -x "$GATEWAY" ] || die "komnet-gateway binary $GATEWAY missing"
# The file transfers go through the tests' traffic tool (no embedded script copies).
if [ -n "${KOMNET_NETPROBE_BIN:-}" ]; then
    NETPROBE=$KOMNET_NETPROBE_BIN
else
    log "cargo build --release -p komnet-netns-tests --bin netprobe"
    cargo build --release --locked -p komnet-netns-tests --bin netprobe
    NETPROBE=$TARGET/release/netprobe
fi
[ -x "$NETPROBE" ] || die "netprobe binary $NETPROBE missing"
WGGO=$(command -v wireguard-go) || die "wireguard-go not on PATH"
for tool in ip wg ping sha256sum; do
    command -v "$tool" >/dev/null || die "$tool not on PATH"
done
[ -c /dev/net/tun ] || die "/dev/net/tun missing: no TUN devices"

# Names carry our PID: several demos (or the tests) can run at once. Interface names must be
# unique machine-wide because the UAPI socket directory is shared by all namespaces.
NS_K=kndemo-komnet-$$;  NS_W=kndemo-wggo-$$
IF_K=kndk$$;            IF_W=kndw$$
VETH_K=veth-k;          VETH_W=veth-w
UNDER_K=10.250.0.1;     UNDER_W=10.250.0.2          # veth /30, inside our namespaces only
TUN4_K=10.251.0.1;      TUN4_W=10.251.0.2           # tunnel, /24
TUN6_K=fd01:251::1;     TUN6_W=fd01:251::2          # tunnel, /64
PORT_K=51820;           PORT_W=51821
XFER_PORT=5001

WORK=$(mktemp -d /tmp/komnet-demo.XXXXXX)
LOGDIR=${LOGDIR:-$WORK}
mkdir -p "$LOGDIR"
PIDS=()          # the two daemons

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    netns_cleanup   # the daemons, a transfer receiver if one runs, both namespaces
    rm -f "/run/wireguard/$IF_K.sock" "/run/wireguard/$IF_W.sock"
    if [ "$LOGDIR" = "$WORK" ]; then
        rm -rf "$WORK"
    else
        rm -f "$WORK"/*.sent "$WORK"/*.received
        log "daemon logs kept in $LOGDIR"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- underlay: two namespaces, one veth pair ------------------------------------------------
log "namespaces $NS_K (komnet-gateway) and $NS_W (wireguard-go), veth $UNDER_K <-> $UNDER_W"
netns_add "$NS_K" "$NS_W" || die "network namespaces"
netns_veth "$NS_K" "$VETH_K" "$UNDER_K/30" "$NS_W" "$VETH_W" "$UNDER_W/30" || die "veth pair"

# --- daemons ---------------------------------------------------------------------------------
# start_daemon NS BIN IFNAME LABEL: foreground daemon, logged, PID remembered; waits for its socket.
start_daemon() {
    local ns=$1 bin=$2 ifname=$3 label=$4 log=$LOGDIR/$3.$4.log
    if ! netns_wg_start "$ns" "$ifname" "$bin" "$log" verbose; then
        tail -20 "$log" >&2
        die "$label did not create /run/wireguard/$ifname.sock"
    fi
    PIDS+=("$NETNS_LAST_PID")
}
start_daemon "$NS_K" "$GATEWAY" "$IF_K" komnet-gateway
start_daemon "$NS_W" "$WGGO" "$IF_W" wireguard-go
log "komnet-gateway pid ${PIDS[0]} on $IF_K; wireguard-go ($("$WGGO" --version | sed -n 1p)) pid ${PIDS[1]} on $IF_W"

# --- keys and configuration with wg ----------------------------------------------------------
umask 077
KEY_K=$(wg genkey); KEY_W=$(wg genkey)
PUB_K=$(wg pubkey <<<"$KEY_K"); PUB_W=$(wg pubkey <<<"$KEY_W")
printf '%s\n' "$KEY_K" >"$WORK/k.key"; printf '%s\n' "$KEY_W" >"$WORK/w.key"
ip netns exec "$NS_K" wg set "$IF_K" listen-port "$PORT_K" private-key "$WORK/k.key" \
    peer "$PUB_W" endpoint "$UNDER_W:$PORT_W" allowed-ips "$TUN4_W/32,$TUN6_W/128" || die "wg set $IF_K"
ip netns exec "$NS_W" wg set "$IF_W" listen-port "$PORT_W" private-key "$WORK/w.key" \
    peer "$PUB_K" endpoint "$UNDER_K:$PORT_K" allowed-ips "$TUN4_K/32,$TUN6_K/128" || die "wg set $IF_W"
ip -n "$NS_K" addr add "$TUN4_K/24" dev "$IF_K"
ip -n "$NS_K" addr add "$TUN6_K/64" dev "$IF_K" nodad
ip -n "$NS_K" link set "$IF_K" mtu 1420 up
ip -n "$NS_W" addr add "$TUN4_W/24" dev "$IF_W"
ip -n "$NS_W" addr add "$TUN6_W/64" dev "$IF_W" nodad
ip -n "$NS_W" link set "$IF_W" mtu 1420 up

# --- pings -----------------------------------------------------------------------------------
# ping_avg NS DST: 5 pings; all must come back; prints the average RTT in ms.
ping_avg() {
    local ns=$1 dst=$2 out
    out=$(ip netns exec "$ns" ping -n -q -c 5 -i 0.2 -w 10 "$dst" 2>&1) \
        || { echo "$out" >&2; die "ping $dst from $ns: not all replies came back"; }
    awk -F'/' '/min\/avg\/max/ {print $5}' <<<"$out"
}
log "first ping komnet-gateway -> wireguard-go: komnet initiates the handshake"
FIRST_OUT=$(ip netns exec "$NS_K" ping -n -c 1 -w 10 "$TUN4_W" 2>&1) \
    || { echo "$FIRST_OUT" >&2; die "no reply to the first ping through the tunnel"; }
FIRST_RTT=$(sed -n 's/.*time=\([0-9.]*\) ms.*/\1/p' <<<"$FIRST_OUT")
log "ping komnet-gateway -> wireguard-go"
RTT_K2W_4=$(ping_avg "$NS_K" "$TUN4_W")
RTT_K2W_6=$(ping_avg "$NS_K" "$TUN6_W")
log "ping wireguard-go -> komnet-gateway"
RTT_W2K_4=$(ping_avg "$NS_W" "$TUN4_K")
RTT_W2K_6=$(ping_avg "$NS_W" "$TUN6_K")

# --- TCP transfers with sha256 at both ends ---------------------------------------------------
# netprobe's sender half-closes, then waits for the receiver to close: when it exits, every
# byte is in.
# transfer FROM_NS TO_NS DST LABEL: sets XFER_GBPS, XFER_MATCH, XFER_SHA
transfer() {
    local from=$1 to=$2 dst=$3 label=$4 src rcv ready rpid t0 t1 sha_src sha_rcv
    src=$WORK/$label.sent; rcv=$WORK/$label.received; ready=$WORK/$label.ready
    head -c "$((DEMO_MB * 1024 * 1024))" /dev/urandom >"$src"
    ip netns exec "$to" timeout 120 "$NETPROBE" receive "$dst:$XFER_PORT" "$rcv" "$ready" \
        >/dev/null 2>"$WORK/$label.receiver.err" &
    rpid=$!
    for _ in $(seq 100); do [ -e "$ready" ] && break; sleep 0.05; done
    [ -e "$ready" ] || { cat "$WORK/$label.receiver.err" >&2; die "$label: receiver did not start"; }
    t0=$(date +%s.%N)
    ip netns exec "$from" timeout 120 "$NETPROBE" send "$dst:$XFER_PORT" "$src" >/dev/null \
        || die "$label: sending failed"
    t1=$(date +%s.%N)
    wait "$rpid" || { cat "$WORK/$label.receiver.err" >&2; die "$label: receiver failed"; }
    sha_src=$(ip netns exec "$from" sha256sum "$src" | cut -d' ' -f1)
    sha_rcv=$(ip netns exec "$to" sha256sum "$rcv" | cut -d' ' -f1)
    XFER_GBPS=$(awk -v b="$((DEMO_MB * 1024 * 1024))" -v t0="$t0" -v t1="$t1" \
        'BEGIN {printf "%.2f", b * 8 / (t1 - t0) / 1e9}')
    XFER_SHA=$sha_src
    if [ "$sha_src" = "$sha_rcv" ]; then XFER_MATCH=yes; else XFER_MATCH=no; fi
    rm -f "$src" "$rcv"
    log "$label: $DEMO_MB MB at $XFER_GBPS Gbit/s, sha256 sent $sha_src received $sha_rcv"
}
transfer "$NS_K" "$NS_W" "$TUN4_W" komnet-to-wggo
GBPS_K2W=$XFER_GBPS; MATCH_K2W=$XFER_MATCH
transfer "$NS_W" "$NS_K" "$TUN4_K" wggo-to-komnet
GBPS_W2K=$XFER_GBPS; MATCH_W2K=$XFER_MATCH

# --- what wg show says -----------------------------------------------------------------------
NOW=$(date +%s)
# peer_field NS IF FIELD: the field of the single peer line of `wg show IF dump`
# (5 = latest handshake, 6 = rx bytes, 7 = tx bytes, 3 = endpoint).
peer_field() { ip netns exec "$1" wg show "$2" dump | awk -F'\t' -v f="$3" 'NR == 2 {print $f}'; }
handshake_text() {
    local t=$1
    if [ -z "$t" ] || [ "$t" = 0 ]; then echo "never"; return; fi
    echo "$(date -d "@$t" '+%F %T') ($((NOW - t)) s ago)"
}
HS_K=$(peer_field "$NS_K" "$IF_K" 5); HS_W=$(peer_field "$NS_W" "$IF_W" 5)
RX_K=$(peer_field "$NS_K" "$IF_K" 6); TX_K=$(peer_field "$NS_K" "$IF_K" 7)
RX_W=$(peer_field "$NS_W" "$IF_W" 6); TX_W=$(peer_field "$NS_W" "$IF_W" 7)
EP_K=$(peer_field "$NS_K" "$IF_K" 3); EP_W=$(peer_field "$NS_W" "$IF_W" 3)

RESULT=PASS
[ "$MATCH_K2W" = yes ] && [ "$MATCH_W2K" = yes ] || RESULT=FAIL
[ -n "$HS_K" ] && [ "$HS_K" != 0 ] && [ -n "$HS_W" ] && [ "$HS_W" != 0 ] || RESULT=FAIL
for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null || RESULT=FAIL; done

mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
cat <<EOF

================ komnet demo: komnet-gateway <-> wireguard-go ================
komnet-gateway  $GATEWAY
                netns $NS_K, interface $IF_K, public key $PUB_K
wireguard-go    $WGGO
                netns $NS_W, interface $IF_W, public key $PUB_W

latest handshake (wg show)   komnet side:       $(handshake_text "$HS_K")
                             wireguard-go side: $(handshake_text "$HS_W")
peer endpoint (wg show)      komnet side sees $EP_K, wireguard-go side sees $EP_W
first ping (with handshake)  $FIRST_RTT ms
ping RTT avg (5 pings each)  komnet -> wireguard-go: IPv4 $RTT_K2W_4 ms, IPv6 $RTT_K2W_6 ms
                             wireguard-go -> komnet: IPv4 $RTT_W2K_4 ms, IPv6 $RTT_W2K_6 ms
TCP transfer $DEMO_MB MB          komnet -> wireguard-go: $GBPS_K2W Gbit/s, sha256 match: $MATCH_K2W
                             wireguard-go -> komnet: $GBPS_W2K Gbit/s, sha256 match: $MATCH_W2K
counters (wg show transfer)  komnet side:       rx $(mib "$RX_K"), tx $(mib "$TX_K")
                             wireguard-go side: rx $(mib "$RX_W"), tx $(mib "$TX_W")
result: $RESULT
==============================================================================
EOF
[ "$RESULT" = PASS ] || die "see the report above"
