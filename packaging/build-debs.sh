#!/usr/bin/env bash
# Builds the Debian packages komnet-gateway, komnet-enroll and komnet into
# ${CARGO_TARGET_DIR:-target}/debian/ (docs/appliance.md says what each holds).
#
#   packaging/build-debs.sh            # build, then package
#   packaging/build-debs.sh --check    # also list each package and run lintian, if installed
#
# Needs cargo-deb (cargo install --locked cargo-deb) and dpkg-dev for the shared-library
# dependencies. Nothing is installed on this machine.
set -euo pipefail

cd "$(dirname "$0")/.."
check=false
case "${1:-}" in
    "") ;;
    --check) check=true ;;
    *) echo "usage: packaging/build-debs.sh [--check]" >&2; exit 2 ;;
esac

if ! command -v cargo-deb >/dev/null 2>&1; then
    echo "build-debs.sh: cargo-deb is not installed; run: cargo install --locked cargo-deb" >&2
    exit 1
fi

target="${CARGO_TARGET_DIR:-target}"
out="$target/debian"

echo "== cargo build --release (komnet-gateway, komnet-enroll, komnet)"
cargo build --release --locked -p komnet-gateway -p komnet-enroll -p komnet-cli --bins

# The CLI's man pages and completions come from its clap definition, so they cannot drift from
# the binary (komnet-gateway's page, packaging/man/komnet-gateway.8, is generated from its clap
# definition too and checked in; `cargo test -p komnet-gateway` fails when they differ); cargo-deb picks them up from the target directory (Cargo.toml of cli/).
gen="$target/release/packaging"
rm -rf "$gen"
mkdir -p "$gen/man" "$gen/completions" "$gen/schema"
"$target/release/komnet" manpages "$gen/man" >/dev/null
# cargo-deb compresses only the man pages it does not take from the target directory.
gzip -9n "$gen"/man/*.1
"$target/release/komnet" completions bash >"$gen/completions/komnet.bash"
"$target/release/komnet" completions zsh >"$gen/completions/_komnet"
"$target/release/komnet" completions fish >"$gen/completions/komnet.fish"
# The policy files' JSON Schemas (editors, CI), generated from the parser's types.
"$target/release/komnet" policy schema --out-dir "$gen/schema" >/dev/null

mkdir -p "$out"
debs=()
for crate in komnet-gateway komnet-enroll komnet-cli; do
    echo "== cargo deb -p $crate"
    # cargo-deb prints the path of the package it wrote, last.
    deb=$(cargo deb --no-build --locked --strip -p "$crate" --output "$out/" | tail -n 1)
    if [ ! -f "$deb" ]; then
        echo "build-debs.sh: cargo deb -p $crate did not name the package it wrote (got: $deb)" >&2
        exit 1
    fi
    debs+=("$deb")
done

if $check; then
    for deb in "${debs[@]}"; do
        echo "== $deb"
        dpkg-deb --info "$deb"
        dpkg-deb --contents "$deb"
    done
    if command -v lintian >/dev/null 2>&1; then
        echo "== lintian"
        lintian --tag-display-limit 0 "${debs[@]}"
    else
        echo "== lintian not installed (apt-get install lintian); skipped"
    fi
fi

echo "== packages"
ls -l "${debs[@]}"
