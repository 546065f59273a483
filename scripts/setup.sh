#!/usr/bin/env bash
# setup.sh — installs the system packages one komnet command needs, with apt-get, idempotently:
# packages already installed are left alone, `apt-get update` runs only when something is
# missing, and it says in one line what it installs. Needs root only when it installs.
#
#   scripts/setup.sh demo    # scripts/demo.sh, demo-interop.sh: nftables, iproute2, wireguard tools, ...
#   scripts/setup.sh console # scripts/demo.sh --console: the demo's packages, Node.js and npm, and the
#                            # OpenID provider's npm packages (npm ci in console/tests/e2e)
#   scripts/setup.sh bench   # benches/*.sh: the demo's packages and iperf3
#   scripts/setup.sh test    # scripts/test.sh: all of the above, the image tools (qemu, OVMF,
#                            # debootstrap, ...) and cargo-deb
#
# Never removes a package to install one, and never pins a version the machine's apt sources do
# not carry: qemu-system-x86 is taken from the suite the installed qemu-utils came from (adding
# bookworm-backports when that is where it came from).
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
)
BENCH=(
    iperf3:iperf3
    # benches/throughput.sh reads iperf3's JSON with it (the demo and the namespace tests move
    # their files with the tests' own netprobe).
    python3:python3
)
TESTS=(
    # The namespace tests start an enrollment service whose clock runs days behind, to hand an
    # appliance a certificate that has expired by the time it starts again.
    faketime:faketime
    # policy/tests/schema.rs checks the policy files' JSON Schema with a real validator.
    /usr/lib/python3/dist-packages/jsonschema/__init__.py:python3-jsonschema
    # DHCP on a spoke's LAN (issue 13): the appliance's DHCP server, and a client.
    /usr/sbin/dnsmasq:dnsmasq-base
    /usr/sbin/udhcpc:udhcpc
    # The enrollment service on PostgreSQL (enroll/tests): each test runs a throwaway cluster
    # with the server's initdb and pg_ctl, of whichever major version Debian ships.
    '/usr/lib/postgresql/*/bin/initdb':postgresql
    # Hubs on separate machines announce their peers by BGP (issue 17): BIRD 2 on the hubs
    # and on the data-centre router in tests/tests/bgp.rs. Debian's package enables a
    # bird.service that the tests do not use; each test runs its own daemons.
    /usr/sbin/bird:bird2
    /usr/sbin/birdc:bird2
    # The data-centre router with FRR (the FRR configuration in docs/operations.md, run by
    # tests/tests/bgp.rs with zebra and bgpd in the router's namespace; not frr.service).
    /usr/lib/frr/bgpd:frr
    vtysh:frr
    # The web console's browser test (console/tests/browser.rs, issue 18): a real OpenID
    # provider (npm oidc-provider) and Debian's Chromium driven by Playwright; the npm
    # packages come from console/tests/e2e/package-lock.json (npm ci, below). Never a
    # downloaded browser: playwright-core uses /usr/bin/chromium.
    node:nodejs
    npm:npm
    chromium:chromium
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
    # Updates are signed (packaging/test-update.sh, test-image.sh); sticks are read with mtools.
    minisign:minisign
    mdir:mtools
)

case "$profile" in
    demo) NEED=("${DEMO[@]}"); cargo_deb=no ;;
    console) NEED=("${DEMO[@]}" node:nodejs npm:npm); cargo_deb=no ;;
    bench) NEED=("${DEMO[@]}" "${BENCH[@]}"); cargo_deb=no ;;
    test | all) NEED=("${DEMO[@]}" "${BENCH[@]}" "${TESTS[@]}" "${IMAGE[@]}"); cargo_deb=yes ;;
    *)
        echo "setup.sh: unknown profile '$profile' (demo, console, bench or test)" >&2
        exit 2
        ;;
esac

missing=()
for pair in "${NEED[@]}"; do
    cmd=${pair%%:*}; pkg=${pair##*:}
    case "$cmd" in
        # A path may be a glob (a file of any version of a package).
        /*) compgen -G "$cmd" >/dev/null || missing+=("$pkg") ;;
        *) command -v "$cmd" >/dev/null 2>&1 || missing+=("$pkg") ;;
    esac
done
# resolvconf is not needed: wg-quick only calls it for DNS= lines, which komnet's configs do not use.

# qemu-system-x86 must come from the same qemu build as an installed qemu-utils (their common
# files conflict otherwise, and apt would remove qemu-utils). When that qemu-utils came from
# bookworm-backports and the apt sources lack that suite, the suite is added (same mirror).
backports_for_qemu() {
    local utils
    utils=$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null) || return 1
    [[ "$utils" == *bpo12* ]] || return 1
    if ! apt-cache madison qemu-system-x86 2>/dev/null | grep -q bookworm-backports; then
        local uri
        uri=$(awk '/^URIs:/ { print $2; exit }' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
        [ -n "$uri" ] || uri=$(awk '/^deb .* bookworm / { print $2; exit }' /etc/apt/sources.list 2>/dev/null || true)
        [ -n "$uri" ] || return 1
        echo "setup ($profile): qemu-utils $utils is from bookworm-backports; adding that suite to apt ($uri)"
        printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
            "$uri" >/etc/apt/sources.list.d/komnet-bookworm-backports.sources
        apt-get update -qq
    fi
    return 0
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
    backports=()
    for pkg in "${uniq[@]}"; do
        if [ "$pkg" = qemu-system-x86 ] && backports_for_qemu; then
            # Its dependencies (qemu-system-common/-data, seabios) must come from that suite
            # too: a pin on the one package leaves them at bookworm's versions, which apt
            # cannot combine ("held broken packages"). -t applies to this call only.
            backports+=(-t bookworm-backports qemu-system-x86)
        else
            args+=("$pkg")
        fi
    done
    # --no-remove: installing what a command needs never takes away what the machine has.
    install() {
        echo "setup ($profile): apt-get install $*"
        if ! apt-get install -y -qq --no-install-recommends --no-remove "$@" >/dev/null; then
            echo "setup ($profile): apt-get could not install $* without removing other packages;" >&2
            echo "  see 'apt-get install --no-install-recommends $*' for what is in the way" >&2
            exit 1
        fi
    }
    [ ${#args[@]} -eq 0 ] || install "${args[@]}"
    [ ${#backports[@]} -eq 0 ] || install "${backports[@]}"
    echo "setup ($profile): done"
fi

# The console's browser test and the demo's console (its OpenID provider): the npm packages
# exactly as console/tests/e2e/package-lock.json pins them, installed again only when the lock
# file changed (its hash is kept beside them).
if [ "$profile" = test ] || [ "$profile" = all ] || [ "$profile" = console ]; then
    e2e="$(cd "$(dirname "$0")/.." && pwd)/console/tests/e2e"
    want=$(sha256sum "$e2e/package-lock.json" | cut -d' ' -f1)
    stamp="$e2e/node_modules/.komnet-lock-sha256"
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        echo "setup ($profile): npm ci in console/tests/e2e (oidc-provider, playwright-core, axe-core)"
        (cd "$e2e" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
        echo "$want" >"$stamp"
    fi
fi

# The Debian packages (packaging/build-debs.sh, which the appliance image installs) are made
# with cargo-deb.
if [ "$cargo_deb" = yes ] && ! command -v cargo-deb >/dev/null 2>&1; then
    echo "setup ($profile): cargo install --locked cargo-deb 3.8.0 (a few minutes, once)"
    cargo install --locked --quiet cargo-deb --version 3.8.0
fi
