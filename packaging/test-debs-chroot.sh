#!/usr/bin/env bash
# Installs the three packages into a throwaway Debian 12 chroot (debootstrap, minbase), checks
# users, directories, modes, conffiles, man pages, completions and that the units are not
# enabled; runs `komnet-enroll init` as root and `serve` as komnet-enroll; then removes and
# purges and checks that nothing is left but what an operator put in /etc/komnet. Never
# installs anything on this machine itself. Root needed (debootstrap, chroot).
#
#   packaging/build-debs.sh && sudo packaging/test-debs-chroot.sh [DEB_DIR]
#
# The chroot shares this machine's kernel: nft(8) is diverted inside it so that the purge cannot
# touch the host's nftables, and no daemon is started that would create interfaces.
set -euo pipefail

cd "$(dirname "$0")/.."
debs="${1:-${CARGO_TARGET_DIR:-target}/debian}"
suite=bookworm
mirror=http://deb.debian.org/debian

if [ "$(id -u)" != 0 ]; then
    echo "test-debs-chroot.sh: needs root (debootstrap, chroot)" >&2
    exit 1
fi
command -v debootstrap >/dev/null 2>&1 || {
    echo "test-debs-chroot.sh: debootstrap is missing: apt-get install debootstrap" >&2
    exit 1
}
for name in komnet-gateway komnet-enroll komnet; do
    if ! ls "$debs/${name}"_*.deb >/dev/null 2>&1; then
        echo "test-debs-chroot.sh: no ${name}_*.deb in $debs (run packaging/build-debs.sh)" >&2
        exit 1
    fi
done

root=$(mktemp -d /var/tmp/komnet-chroot.XXXXXX)
# mktemp's 0700 would be the chroot's "/": no system user could run anything in it.
chmod 0755 "$root"
cleanup() {
    # Unmount before deleting: an rm -rf through a live /proc mount must never happen.
    if mountpoint -q "$root/proc"; then
        umount "$root/proc" || { echo "test-debs-chroot.sh: could not unmount $root/proc; left $root" >&2; return; }
    fi
    rm -rf --one-file-system "$root"
}
trap cleanup EXIT

echo "== debootstrap $suite (minbase) into $root"
debootstrap --variant=minbase "$suite" "$root" "$mirror" >"$root.log" 2>&1 ||
    { tail -n 20 "$root.log" >&2; exit 1; }
rm -f "$root.log"
mount -t proc proc "$root/proc"
cp /etc/resolv.conf "$root/etc/resolv.conf"
for name in komnet-gateway komnet-enroll komnet; do
    cp "$(ls -t "$debs/${name}"_*.deb | head -n 1)" "$root/tmp/${name}.deb"
done

in_root() { chroot "$root" /usr/bin/env DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 sh -euc "$1"; }
fail() { echo "FAIL: $*" >&2; exit 1; }

echo "== apt-get install ./komnet-*.deb"
in_root 'apt-get update -q >/dev/null && apt-get install -y -q /tmp/komnet-gateway.deb /tmp/komnet-enroll.deb /tmp/komnet.deb >/tmp/install.log 2>&1 || { tail -n 30 /tmp/install.log; exit 1; }'
in_root 'dpkg-divert --quiet --local --rename --add /usr/sbin/nft'

echo "== installed"
got=$(in_root 'stat -c "%U:%G %a %n" /var/lib/komnet /var/lib/komnet-enroll /etc/komnet/gateway.toml')
echo "$got"
[ "$got" = "komnet:komnet 700 /var/lib/komnet
komnet-enroll:komnet-enroll 700 /var/lib/komnet-enroll
root:root 644 /etc/komnet/gateway.toml" ] || fail "owners or modes"
in_root 'getent passwd komnet komnet-dhcp komnet-enroll | grep -c nologin' | grep -qx 3 || fail "system users"
in_root 'ls /usr/lib/systemd/system/komnet-dhcp.service /usr/lib/systemd/system/komnet-dhcp.path /usr/lib/systemd/system/komnet-dhcp-restart.service >/dev/null' || fail "the DHCP units"
in_root 'dpkg-query -W -f="\${Conffiles}\n" komnet-gateway' | grep -q /etc/komnet/gateway.toml || fail "conffile"
in_root 'ls /usr/share/man/man8/komnet-gateway.8.gz /usr/share/man/man8/komnet-enroll.8.gz /usr/share/man/man1/komnet.1.gz /usr/share/man/man1/komnet-policy-check.1.gz /usr/share/bash-completion/completions/komnet /usr/share/zsh/vendor-completions/_komnet /usr/share/fish/vendor_completions.d/komnet.fish >/dev/null' || fail "man pages or completions"
in_root 'ls /usr/share/komnet/schema/operator.schema.json /usr/share/komnet/schema/tenant.schema.json >/dev/null' || fail "policy schemas"
in_root '! ls /etc/systemd/system/multi-user.target.wants/ | grep -q komnet' || fail "a unit was enabled on install"
for unit in komnet-gateway komnet-dhcp komnet-enroll; do
    in_root "systemd-analyze security --offline=yes /usr/lib/systemd/system/$unit.service | tail -n 1"
done

echo "== komnet-enroll init as root, serve as komnet-enroll"
in_root 'komnet policy keygen --out /root/policy.key >/dev/null && cp /root/policy.pub /etc/komnet/policy.pub'
in_root 'komnet-enroll init --data-dir /var/lib/komnet-enroll --server-name 127.0.0.1 --policy-public-key /etc/komnet/policy.pub >/dev/null'
in_root '[ -z "$(find /var/lib/komnet-enroll ! -user komnet-enroll)" ]' || fail "init left files the service cannot read"
# A loopback port the kernel picks; SIGTERM after 3 s (exit 124) means it was still serving.
rc=0
in_root 'timeout 3 runuser -u komnet-enroll -- komnet-enroll serve --data-dir /var/lib/komnet-enroll --listen 127.0.0.1:0 >/tmp/serve.out 2>/tmp/serve.err' || rc=$?
[ "$rc" = 124 ] && in_root 'grep -q "listening on https://127.0.0.1:" /tmp/serve.out' ||
    { in_root 'cat /tmp/serve.err' >&2; fail "serve as komnet-enroll (exit $rc)"; }

# The leases dnsmasq would have written (no daemon runs in the chroot).
in_root 'install -d -o komnet-dhcp /var/lib/komnet-dhcp && echo "0 52:54:00:00:00:01 10.30.1.100 pc *" >/var/lib/komnet-dhcp/leases'
echo "== remove keeps state, purge takes it"
in_root 'apt-get remove -y -q komnet-gateway komnet-enroll komnet >/dev/null 2>&1'
in_root 'test -d /var/lib/komnet && test -d /var/lib/komnet-enroll && test -f /var/lib/komnet-dhcp/leases && getent passwd komnet komnet-dhcp >/dev/null' || fail "remove lost state"
# komnet has no conffiles: once removed, dpkg has nothing left of it to purge.
in_root 'apt-get purge -y -q komnet-gateway komnet-enroll >/tmp/purge.log 2>&1 || { cat /tmp/purge.log; exit 1; }'
in_root 'grep -h "saved in" /tmp/purge.log' || fail "no CA backup on purge"
left=$(in_root 'find / -xdev \( -path /proc -o -path /tmp -o -path /var/backups \) -prune -o -name "*komnet*" -print; grep -l komnet /etc/passwd /etc/group /etc/shadow /etc/gshadow || true')
[ "$left" = "/etc/komnet" ] || fail "left behind: $left"
in_root 'ls /etc/komnet' | grep -qx policy.pub || fail "/etc/komnet holds more than the operator's policy.pub"
echo "== ok: installed, ran, removed and purged cleanly (left: the operator's /etc/komnet/policy.pub, the CA backup)"
