#!/usr/bin/env bash
# wireguard-go-2023.sh — makes wireguard-go 0.0.20231211 (Debian's bookworm-backports build:
# TUN offloads, UDP GSO/GRO, batched I/O) available without installing it over Debian's default
# wireguard-go, and prints the path of its binary. The conformance tests and the benchmarks
# compare komnet-gateway against this build.
#
#   scripts/wireguard-go-2023.sh        # prints e.g. /opt/komnet-peers/wireguard-go-0.0.20231211/usr/bin/wireguard-go
#
# The package is fetched with `apt-get download` (the suite bookworm-backports is added to the
# apt sources once, with the mirror the machine already uses) and unpacked with `dpkg -x` into
# $KOMNET_PEERS_DIR (default /opt/komnet-peers). Idempotent: a present binary of the right version
# is printed at once. Needs root only when it has to fetch.
set -euo pipefail

VERSION=0.0.20231211
DEB_VERSION=0.0.20231211-1~bpo12+1
DEST=${KOMNET_PEERS_DIR:-/opt/komnet-peers}/wireguard-go-$VERSION
BIN=$DEST/usr/bin/wireguard-go

die() { echo "wireguard-go-2023.sh: $*" >&2; exit 1; }

# The binary cannot tell: upstream's 0.0.20231211 still prints "v0.0.20230223" for --version.
# The package version is kept beside it instead.
STAMP=$DEST/DEBIAN-VERSION
has_version() { [ -x "$BIN" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$DEB_VERSION" ]; }

if has_version; then echo "$BIN"; exit 0; fi
[ "$(id -u)" = 0 ] || die "wireguard-go $VERSION is not at $BIN yet; fetching it needs root"

if ! grep -rqs '^[^#]*bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    [ -n "$mirror" ] || mirror=$(awk '/^deb .* bookworm / {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
    [ -n "$mirror" ] || die "cannot tell which Debian mirror the apt sources use (to add bookworm-backports)"
    printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
        "$mirror" >/etc/apt/sources.list.d/komnet-bookworm-backports.sources
fi
if ! apt-cache madison wireguard-go 2>/dev/null | grep -qF "$DEB_VERSION"; then
    apt-get update -qq >/dev/null || die "apt-get update failed"
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download -qq -o APT::Sandbox::User=root "wireguard-go=$DEB_VERSION" >/dev/null) \
    || die "apt-get download wireguard-go=$DEB_VERSION failed (is bookworm-backports reachable?)"
mkdir -p "$DEST"
deb=$(echo "$work"/wireguard-go_*.deb)
[ "$(dpkg-deb -f "$deb" Version)" = "$DEB_VERSION" ] || die "$deb is not version $DEB_VERSION"
dpkg -x "$deb" "$DEST"
dpkg-deb -f "$deb" Version >"$STAMP"
has_version || die "$BIN missing after unpacking $deb"
echo "$BIN"
