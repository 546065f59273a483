#!/usr/bin/env bash
# setup.sh — installs the system packages komnet's demo, tests and benchmarks need, with apt-get,
# idempotently: packages already installed are left alone, `apt-get update` runs only when
# something is missing. Needs root (it says so and stops otherwise).
set -euo pipefail

# command:package — a package is installed when its command is missing.
NEED=(
    nft:nftables
    ip:iproute2
    wg:wireguard-tools
    wg-quick:wireguard-tools
    wireguard-go:wireguard-go
    iperf3:iperf3
    ping:iputils-ping
    jq:jq
    sha256sum:coreutils
    nstat:iproute2
    # The demo and the namespace tests move files through the tunnel with small python3
    # TCP senders/receivers (a checksum needs a real file; iperf3 does not keep one).
    python3:python3
    # The appliance image (packaging/image/build-image.sh) and its test in qemu
    # (packaging/test-image.sh).
    debootstrap:debootstrap
    sfdisk:fdisk
    mkfs.vfat:dosfstools
    mcopy:mtools
    zstd:zstd
    debugfs:e2fsprogs
    qemu-img:qemu-utils
    qemu-system-x86_64:qemu-system-x86
    /usr/share/OVMF/OVMF_CODE_4M.fd:ovmf
)

missing=()
for pair in "${NEED[@]}"; do
    cmd=${pair%%:*}; pkg=${pair##*:}
    case "$cmd" in
        /*) [ -e "$cmd" ] || missing+=("$pkg") ;;
        *) command -v "$cmd" >/dev/null 2>&1 || missing+=("$pkg") ;;
    esac
done
# resolvconf is not needed: wg-quick only calls it for DNS= lines, which komnet's configs do not use.

if [ ${#missing[@]} -eq 0 ]; then
    echo "setup: system packages present (nftables iproute2 wireguard-tools wireguard-go iperf3 jq python3 qemu ovmf debootstrap ...)"
else
    if [ "$(id -u)" != 0 ]; then
        echo "setup: these packages are missing and installing them needs root: ${missing[*]}" >&2
        echo "setup: run this command again with sudo" >&2
        exit 1
    fi
    mapfile -t uniq < <(printf '%s\n' "${missing[@]}" | sort -u)
    # qemu-system-x86 must match an installed qemu-utils (which may come from backports).
    for i in "${!uniq[@]}"; do
        if [ "${uniq[$i]}" = qemu-system-x86 ] && utils=$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null) && [ -n "$utils" ]; then
            uniq[$i]="qemu-system-x86=$utils"
        fi
    done
    echo "setup: apt-get install ${uniq[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${uniq[@]}" >/dev/null
    echo "setup: done"
fi

# The Debian packages (packaging/build-debs.sh, which the appliance image installs) are made
# with cargo-deb.
if ! command -v cargo-deb >/dev/null 2>&1; then
    echo "setup: cargo install --locked cargo-deb (a few minutes, once)"
    cargo install --locked --quiet cargo-deb --version 3.8.0
fi
