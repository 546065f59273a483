#!/usr/bin/env bash
# The crate graph shows the architecture, and this check keeps it so (docs/architecture.md):
# an appliance never compiles the enrollment service's server, database or CA, and the admins'
# command line never compiles the packet path. It reads `cargo tree -e normal` (what a release
# build links, without dev-dependencies) of each package on its own, so features another
# package turns on do not hide a violation.
set -euo pipefail
cd "$(dirname "$0")/.."

fail=0

# forbid PACKAGE CRATE... : none of CRATE may be in PACKAGE's normal dependency tree.
# PACKAGE may carry cargo flags after it, e.g. "komnet-gateway --no-default-features".
forbid() {
    local package=$1
    shift
    local -a args
    read -ra args <<<"$package"
    local tree
    tree=$(cargo tree --offline -e normal -p "${args[@]}" --prefix none --format '{p}' 2>/dev/null \
        || cargo tree -e normal -p "${args[@]}" --prefix none --format '{p}')
    for crate in "$@"; do
        if grep -Eq "^${crate} v" <<<"$tree"; then
            echo "crate graph: $package depends on $crate:" >&2
            cargo tree -e normal -p "${args[@]}" -i "$crate" --depth 6 >&2 || true
            fail=1
        fi
    done
}

# forbid_feature PACKAGE CRATE FEATURE : CRATE must not be built with FEATURE for PACKAGE.
forbid_feature() {
    local package=$1 crate=$2 feature=$3
    if cargo tree -e normal,features -p "$package" -i "$crate" --prefix none 2>/dev/null \
        | grep -Eq "^${crate} feature \"${feature}\""; then
        echo "crate graph: $package builds $crate with feature \"$feature\":" >&2
        cargo tree -e normal,features -p "$package" -i "$crate" >&2 || true
        fail=1
    fi
}

# The appliance: no enrollment server, database, CA or web framework. (Its own /metrics
# endpoint is a bare hyper http1 server.) Its binary parses its command line with clap (the
# default `cli` feature); the library, which is the packet path and the control plane, does not.
forbid komnet-gateway komnet-enroll komnet-enroll-admin rusqlite tokio-postgres rcgen axum tower-http
forbid "komnet-gateway --no-default-features" komnet-enroll komnet-enroll-admin rusqlite tokio-postgres rcgen axum tower-http clap
# The enrollment client is what the appliance links for enrolling: no server side at all.
forbid komnet-enroll-client komnet-enroll rusqlite tokio-postgres rcgen axum clap
forbid_feature komnet-enroll-client hyper server
# The admins' command line: no packet path (boringtun, TUN, UDP offloads) and no service.
forbid komnet-cli komnet-gateway boringtun tun-rs quinn-udp komnet-enroll rusqlite tokio-postgres rcgen axum
# The web console acts through the enrollment service's admin socket: no CA, no database, no
# registry of its own (docs/console.md), and no packet path.
forbid komnet-console komnet-enroll rusqlite tokio-postgres rcgen komnet-gateway boringtun tun-rs
# The vocabulary depends on nothing of komnet and does no networking.
forbid komnet-proto komnet-policy komnet-enroll komnet-enroll-client komnet-gateway tokio hyper rustls
# The policy language knows nothing of sockets, certificates or the packet path.
forbid komnet-policy tokio hyper rustls boringtun komnet-enroll komnet-enroll-client
# Test support is for tests only: no program links it or the service's test helpers.
for package in komnet-gateway komnet-enroll komnet-cli komnet-console komnet-policy; do
    forbid "$package" komnet-testkit
done
forbid_feature komnet-enroll komnet-enroll testing

if [ "$fail" -ne 0 ]; then
    echo "crate graph: FAILED (see docs/architecture.md for the intended graph)" >&2
    exit 1
fi
echo "crate graph: ok (gateway without server/database/CA, its library without clap; komnet CLI without the packet path)"
