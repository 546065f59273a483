#!/usr/bin/env bash
# throughput.sh — komnet-gateway <-> itself against wireguard-go 0.0.20231211 <-> itself in
# alternating rounds of one run (iperf3 TCP through the tunnel between two namespaces), then
# komnet -> wireguard-go interop; prints the ratio of medians last. It runs the shared peer
# harness (../shared/bench/peers/compare.sh), so both daemons meet exactly the same setup.
# Usage: sudo benches/throughput.sh          (ROUNDS=3 DUR=10 PARALLEL=1; PARALLEL=4 for -P4)
set -eu
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "throughput.sh: must run as root" >&2; exit 1; }
cargo build --release --locked -p komnet-gateway >&2
CMP=${COMPARE_SH:-../shared/bench/peers/compare.sh}
[ -x "$CMP" ] || { echo "throughput.sh: $CMP not found (set COMPARE_SH)" >&2; exit 1; }
exec "$CMP" "$(pwd)/target/release/komnet-gateway"
