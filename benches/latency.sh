#!/usr/bin/env bash
# latency.sh — ping RTT through the tunnel while iperf3 saturates it (the reverse direction must
# not starve behind the data direction), komnet-gateway and wireguard-go 2023 in the same run.
# Usage: sudo benches/latency.sh [target/release/komnet-gateway]     (DUR=10 ROUNDS=2)
cd "$(dirname "$0")/.." || exit 1
. benches/lib.sh
BIN=$(readlink -f "${1:-target/release/komnet-gateway}")
[ -x "$BIN" ] || bdie "no $BIN: cargo build --release -p komnet-gateway"
DUR=${DUR:-10}; ROUNDS=${ROUNDS:-2}
bench_require
REF=$(wggo_2023)

# measure NAME BIN: idle ping, then ping during iperf3 -t DUR; prints median and p99 RTT.
measure() {
    local name=$1 bin=$2 idle loaded
    pair_up "$bin" "$bin"
    idle=$(ip netns exec "$NS_L" ping -c 50 -i 0.02 -q "$TUN_R" | awk -F/ '/^rtt/{print $5}')
    ip netns exec "$NS_R" iperf3 -s -1 -B "$TUN_R" >/dev/null 2>&1 & netns_track_pid $!
    sleep 0.3
    ip netns exec "$NS_L" iperf3 -c "$TUN_R" -t "$DUR" >/dev/null 2>&1 &
    local client=$!; netns_track_pid "$client"
    sleep 1
    loaded=$(ip netns exec "$NS_L" ping -c $(( (DUR - 2) * 50 )) -i 0.02 "$TUN_R" 2>/dev/null \
        | awk -F'time=' '/time=/{split($2,a," "); print a[1]}' | sort -g \
        | awk '{v[NR]=$1} END{if (NR==0) {print "FAIL FAIL"; exit} p=int(NR*0.99); if (p<1) p=1; printf "%s %s\n", v[int((NR+1)/2)], v[p]}')
    wait "$client" 2>/dev/null
    printf '%-16s idle avg %6s ms   under load: median %6s ms  p99 %6s ms\n' "$name" "$idle" $loaded
}
for r in $(seq "$ROUNDS"); do
    measure "komnet-gateway" "$BIN"
    measure "wireguard-go-2023" "$REF"
done
