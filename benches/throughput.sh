#!/usr/bin/env bash
# throughput.sh — komnet-gateway <-> itself against wireguard-go 0.0.20231211 <-> itself in
# alternating rounds of one run (iperf3 TCP through the tunnel between two namespaces joined by
# one veth, tunnel MTU 1420), then komnet -> wireguard-go interop; prints the medians and their
# ratio last. With BASE=<another komnet-gateway binary> (e.g. a build of an older commit) every
# round runs that build as well, and its ratio to the current one is printed: "the data plane
# stays within noise" is checked in the same run, on the same machine state.
#
# Usage: sudo benches/throughput.sh [target/release/komnet-gateway]
#   ROUNDS=3 DUR=10 PARALLEL=1 (iperf3 -P) BASE= (unset: no baseline)
# An older build for BASE, e.g. of commit c0632cf:
#   git worktree add /tmp/komnet-c0632cf c0632cf && (cd /tmp/komnet-c0632cf && cargo build --release -p komnet-gateway)
# Everything comes from this repository: benches/lib.sh sets up the pair, wireguard-go
# 0.0.20231211 comes from scripts/wireguard-go-2023.sh.
cd "$(dirname "$0")/.." || exit 1
. benches/lib.sh
if [ -z "${1:-}" ]; then
    cargo build --release --locked -p komnet-gateway >&2 || bdie "cargo build failed"
fi
BIN=$(readlink -f "${1:-target/release/komnet-gateway}")
[ -x "$BIN" ] || bdie "no $BIN: cargo build --release -p komnet-gateway"
BASE=${BASE:-}
if [ -n "$BASE" ]; then
    BASE=$(readlink -f "$BASE")
    [ -x "$BASE" ] || bdie "BASE=$BASE is not executable"
fi
ROUNDS=${ROUNDS:-3}; DUR=${DUR:-10}; PARALLEL=${PARALLEL:-1}
bench_require
command -v python3 >/dev/null || bdie "python3 missing (reads iperf3's JSON)"
REF=$(wggo_2023)

# measure BIN_L BIN_R: one iperf3 run left -> right through a fresh tunnel; prints
# "GBITS RETRANSMITS" (FAIL when the run failed).
measure() {
    pair_up "$1" "$2"
    ip netns exec "$NS_R" iperf3 -s -1 -B "$TUN_R" >/dev/null 2>&1 &
    netns_track_pid $!
    sleep 0.3
    ip netns exec "$NS_L" timeout $((DUR + 30)) iperf3 -c "$TUN_R" -t "$DUR" -P "$PARALLEL" -J 2>/dev/null \
        | python3 -c '
import json, sys
try:
    end = json.load(sys.stdin)["end"]
    print("%.2f %d" % (end["sum_received"]["bits_per_second"] / 1e9, end["sum_sent"].get("retransmits", 0)))
except Exception:
    print("FAIL FAIL")'
}
med() { printf '%s\n' "$@" | grep -v FAIL | sort -g | awk '{a[NR]=$1} END{if (NR) print a[int((NR+1)/2)]; else print 0}'; }

blog "komnet $BIN${BASE:+, baseline $BASE}, wireguard-go $REF; $ROUNDS rounds of ${DUR}s, iperf3 -P $PARALLEL"
ours=(); base=(); ref=()
for r in $(seq "$ROUNDS"); do
    read -r a ra <<<"$(measure "$BIN" "$BIN")"
    line="round $r: komnet-gateway $a Gbit/s ($ra retr)"
    if [ -n "$BASE" ]; then
        read -r b rb <<<"$(measure "$BASE" "$BASE")"
        line="$line   baseline $b Gbit/s ($rb retr)"
        base+=("$b")
    fi
    read -r w rw <<<"$(measure "$REF" "$REF")"
    echo "$line   wireguard-go-2023 $w Gbit/s ($rw retr)"
    ours+=("$a"); ref+=("$w")
done
read -r i ri <<<"$(measure "$BIN" "$REF")"
echo "interop: komnet-gateway -> wireguard-go-2023 $i Gbit/s ($ri retr)"
mo=$(med "${ours[@]}"); mr=$(med "${ref[@]}")
awk -v o="$mo" -v r="$mr" 'BEGIN{printf "ratio komnet-gateway/wireguard-go-2023 = %.2f (medians %s / %s Gbit/s)\n", (r>0?o/r:0), o, r}'
if [ -n "$BASE" ]; then
    mb=$(med "${base[@]}")
    awk -v o="$mo" -v b="$mb" 'BEGIN{printf "ratio komnet-gateway/baseline = %.2f (medians %s / %s Gbit/s)\n", (b>0?o/b:0), o, b}'
fi
