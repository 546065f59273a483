#!/usr/bin/env bash
# idle-memory.sh — RSS of an idle daemon with no peers and with N peers configured by
# `wg setconf` (each with a key, an endpoint and two allowed IPs), komnet-gateway next to
# wireguard-go 2023 in the same run. Goal: 1,000 peers cost komnet ≤ 5 MiB. Also times
# `wg show dump` with those peers (the daemon holds its peer table while answering).
# Usage: sudo benches/idle-memory.sh [target/release/komnet-gateway]     (PEERS=1000)
cd "$(dirname "$0")/.." || exit 1
. benches/lib.sh
BIN=$(readlink -f "${1:-target/release/komnet-gateway}")
[ -x "$BIN" ] || bdie "no $BIN: cargo build --release -p komnet-gateway"
PEERS=${PEERS:-1000}
bench_require
REF=$(wggo_2023)
CONF=$(mktemp); trap 'rm -f "$CONF"; bench_cleanup' EXIT
{
    echo "[Interface]"; echo "PrivateKey = $(wg genkey)"; echo "ListenPort = 51999"
    for i in $(seq "$PEERS"); do
        echo "[Peer]"; echo "PublicKey = $(wg genkey | wg pubkey)"
        echo "Endpoint = 192.0.2.$((i % 250 + 1)):$((10000 + i))"
        echo "AllowedIPs = 10.$((i / 250 + 100)).$((i % 250)).0/24, fd77:$i::/64"
    done
} >"$CONF"

rss_kib() { awk '/^VmRSS:/{print $2}' "/proc/$1/status"; }

measure() {
    local name=$1 bin=$2 ifn=kbm$BENCH_ID$3 pid before after
    netns_add "$NS_L" || bdie "ip netns add"
    netns_wg_start "$NS_L" "$ifn" "$bin" || bdie "$name did not start"
    pid=$NETNS_LAST_PID
    ip -n "$NS_L" link set "$ifn" up
    sleep 1; before=$(rss_kib "$pid")
    ip netns exec "$NS_L" wg setconf "$ifn" "$CONF" || bdie "wg setconf on $name"
    sleep 2; after=$(rss_kib "$pid")
    [ "$(ip netns exec "$NS_L" wg show "$ifn" peers | wc -l)" = "$PEERS" ] || bdie "$name did not take $PEERS peers"
    local t0 t1
    t0=$(date +%s%N)
    for _ in 1 2 3 4 5; do ip netns exec "$NS_L" wg show "$ifn" dump >/dev/null; done
    t1=$(date +%s%N)
    awk -v n="$name" -v b="$before" -v a="$after" -v p="$PEERS" -v ms="$(( (t1 - t0) / 5000000 ))" \
        'BEGIN{printf "%-18s RSS idle %7.1f MiB   with %d peers %7.1f MiB   cost %6.2f MiB   wg show dump %d ms\n", n, b/1024, p, a/1024, (a-b)/1024, ms}'
    netns_del "$NS_L"
}
measure komnet-gateway "$BIN" a
measure wireguard-go-2023 "$REF" b
