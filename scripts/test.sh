#!/usr/bin/env bash
# test.sh — the README's test command: installs what the tests need (scripts/setup.sh), then
# runs every test of the workspace, the network-namespace tests included. Those need root
# (network namespaces, TUN devices): run as root or with sudo; without root they fail with a
# message that says so, they are never skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
    echo "test.sh: the network-namespace tests need root (netns, veth, /dev/net/tun): run 'sudo scripts/test.sh'" >&2
    exit 1
fi
phase() { echo "== test.sh [${SECONDS}s] $*"; }
phase "setup"
# shellcheck source=scripts/test-build-env.sh
. scripts/test-build-env.sh
scripts/setup.sh test
# The crate graph: the appliance never compiles the enrollment server, database or CA, the
# admins' command line never the packet path (docs/architecture.md).
phase "crate graph"
scripts/check-crate-graph.sh
# The conformance tests' reference: wireguard-go 0.0.20231211, unpacked beside (not over) Debian's.
KOMNET_WIREGUARD_GO_2023=$(scripts/wireguard-go-2023.sh)
export KOMNET_WIREGUARD_GO_2023
# Every systemd unit komnet ships, rated (systemd-analyze security); the update checks
# (signature, version floor, sums) on this machine, without qemu.
phase "systemd units and update checks"
packaging/check-units.sh
packaging/test-update.sh
# The tests start release-mode daemons: build them first so one test's timeout never pays for it.
# One build for both: with the test targets in the same command, cargo resolves features as
# `cargo test` does (dev-dependencies turn on features of shared crates, e.g. rustix's `fs`
# through tempfile); a `cargo build --bins` alone would compile every workspace crate twice.
phase "build"
cargo build --release --locked --workspace --bins --tests
phase "tests"
cargo test --workspace --locked --release
# The appliance image: built (packaging/image/build-image.sh) and booted in qemu with OVMF
# against a real enrollment service and hub; fails with a message when the machine cannot run
# qemu. About 10 minutes under TCG.
phase "appliance image in qemu"
packaging/test-image.sh
phase "done"
