#!/usr/bin/env bash
# setup.sh — installs the system packages one komnet command needs, with apt-get, idempotently:
# packages already installed are left alone, `apt-get update` runs only when something is
# missing, and it says in one line what it installs. Needs root only when it installs.
#
#   scripts/setup.sh demo    # scripts/demo.sh, demo-interop.sh: nftables, iproute2, wireguard tools, ...
#   scripts/setup.sh bench   # benches/*.sh: the demo's packages and iperf3
#   scripts/setup.sh test    # scripts/test.sh: all of the above, the image tools (qemu, OVMF,
#                            # debootstrap, ...) and cargo-deb
#
# Never fails on a version pin it cannot satisfy: a pin is tried first and, when the machine's
# apt sources do not carry that version, the package is installed unpinned.
set -euo pipefail

profile=${1:-test}

# command:package — a package is installed when its command (or file) is missing.
DEMO=(
    nft:nftables
    ip:iproute2
    nstat:iproute2
    wg:wireguard-tools
    wg-quick:wireguard-tools
    wireguard-go:wireguard-go
    ping:iputils-ping
    jq:jq
    sha256sum:coreutils
    # The demo and the namespace tests move files through the tunnel with small python3
    # TCP senders/receivers (a checksum needs a real file; iperf3 does not keep one).
    python3:python3
)
BENCH=(
    iperf3:iperf3
)
IMAGE=(
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

case "$profile" in
    demo) NEED=("${DEMO[@]}"); cargo_deb=no ;;
    bench) NEED=("${DEMO[@]}" "${BENCH[@]}"); cargo_deb=no ;;
    test | all) NEED=("${DEMO[@]}" "${BENCH[@]}" "${IMAGE[@]}"); cargo_deb=yes ;;
    *)
        echo "setup.sh: unknown profile '$profile' (demo, bench or test)" >&2
        exit 2
        ;;
esac

missing=()
for pair in "${NEED[@]}"; do
    cmd=${pair%%:*}; pkg=${pair##*:}
    case "$cmd" in
        /*) [ -e "$cmd" ] || missing+=("$pkg") ;;
        *) command -v "$cmd" >/dev/null 2>&1 || missing+=("$pkg") ;;
    esac
done
# resolvconf is not needed: wg-quick only calls it for DNS= lines, which komnet's configs do not use.

# The version to ask for: qemu-system-x86 should match an installed qemu-utils (which may come
# from backports), but only when the apt sources carry that version.
wanted() {
    local pkg=$1 utils
    if [ "$pkg" = qemu-system-x86 ] && utils=$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null) && [ -n "$utils" ] &&
        apt-cache madison qemu-system-x86 2>/dev/null | awk -F'|' '{gsub(/ /,"",$2); print $2}' | grep -qxF "$utils"; then
        echo "$pkg=$utils"
    else
        echo "$pkg"
    fi
}

if [ ${#missing[@]} -eq 0 ]; then
    echo "setup ($profile): system packages present"
else
    mapfile -t uniq < <(printf '%s\n' "${missing[@]}" | sort -u)
    if [ "$(id -u)" != 0 ]; then
        echo "setup ($profile): these packages are missing and installing them needs root: ${uniq[*]}" >&2
        echo "setup ($profile): run this command again with sudo" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    args=()
    for pkg in "${uniq[@]}"; do args+=("$(wanted "$pkg")"); done
    echo "setup ($profile): apt-get install ${args[*]}"
    if ! apt-get install -y -qq --no-install-recommends "${args[@]}" >/dev/null; then
        # A pin that resolved but cannot be installed with the rest: take what apt offers.
        echo "setup ($profile): retrying without version pins: ${uniq[*]}"
        apt-get install -y -qq --no-install-recommends "${uniq[@]}" >/dev/null
    fi
    echo "setup ($profile): done"
fi

# The Debian packages (packaging/build-debs.sh, which the appliance image installs) are made
# with cargo-deb.
if [ "$cargo_deb" = yes ] && ! command -v cargo-deb >/dev/null 2>&1; then
    echo "setup ($profile): cargo install --locked cargo-deb 3.8.0 (a few minutes, once)"
    cargo install --locked --quiet cargo-deb --version 3.8.0
fi
