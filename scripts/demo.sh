#!/usr/bin/env bash
# demo.sh — the README's main job: the district of St. Wendel in miniature, end to end.
#
#   sudo scripts/demo.sh             # the district, its report, then everything is removed
#   sudo scripts/demo.sh --console   # ... and then the web console on it, until Ctrl-C
#
# Installs the system packages (scripts/setup.sh), builds komnet in release mode, then runs
# komnet-demo: in network namespaces on this machine, a data centre (hub, enrollment service,
# a file server per commune, the district's DMS), the communes Nohfelden and Tholey (each a
# spoke appliance with a staff LAN and a guest WLAN), Marpingen and Namborn (whose town halls
# both use the LAN 192.168.178.0/24; their appliances translate it 1:1 to unique prefixes) and
# a home-office worker on Debian's stock wireguard-go with the wg-quick config the enrollment
# service issued. Everything enrols from one-time tokens; the policy (examples/policy/st-wendel)
# is signed and published through the enrollment service. It prints the reachability matrix the
# policy expects next to the one observed with real TCP connections (with a guest that gives
# itself a staff address, and both PCs at 192.168.178.10), what `komnet policy explain` says
# about those, the appliance's segment_spoof count and the addresses the data centre received;
# revokes Tholey's appliance and shows it cut off (with the seconds it took), and removes every
# namespace and process, also on failure or Ctrl-C.
# Exits non-zero when an observation differs from the policy.
#
# With --console the district stays up after the report: the web console (komnet-console) runs
# on http://localhost:8080 against the district's enrollment service, with a local OpenID
# provider (npm oidc-provider, as in the console's browser test) whose people are the demo's
# (see what it prints); Ctrl-C ends both and removes the district. Needs Node.js (installed).
set -euo pipefail
cd "$(dirname "$0")/.."
console=no
for arg in "$@"; do
    case "$arg" in
        --console) console=yes ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "demo.sh: unknown argument '$arg' (--console, --help)" >&2; exit 2 ;;
    esac
done
[ "$(id -u)" = 0 ] || { echo "demo.sh needs root (network namespaces, TUN devices, nftables): run 'sudo scripts/demo.sh'" >&2; exit 1; }
if [ "$console" = yes ]; then
    scripts/setup.sh console
    echo "[demo] cargo build --release (komnet-gateway, komnet-enroll, komnet, komnet-demo, komnet-console)" >&2
    cargo build --release --locked -p komnet-gateway -p komnet-enroll -p komnet-cli -p komnet-netns-tests -p komnet-console --bins
    exec target/release/komnet-demo --console
fi
scripts/setup.sh demo
echo "[demo] cargo build --release (komnet-gateway, komnet-enroll, komnet, komnet-demo)" >&2
cargo build --release --locked -p komnet-gateway -p komnet-enroll -p komnet-cli -p komnet-netns-tests --bins
exec target/release/komnet-demo
