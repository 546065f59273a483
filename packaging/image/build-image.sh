#!/usr/bin/env bash
# build-image.sh — builds the komnet appliance: a bootable UEFI disk image of Debian 12 with
# systemd-boot, two root slots (A/B) and a data partition, plus the update that carries the
# same root to an installed appliance. No loop devices, no container engine: debootstrap into
# a folder, file systems made from folders (mkfs.ext4 -d, mkfs.vfat + mtools), partitions
# placed into the disk file with dd.
#
#   sudo packaging/image/build-image.sh --release-key KEY --release-pub PUB [--version N]
#            [--floor N] [--debs DIR] [--out DIR] [--cache DIR] [--overlay DIR]
#            [--allow-drift] [--refresh-lock] [--kernel-args ARGS]
#
#   --release-key KEY  the release team's minisign secret key: signs the update's manifest
#   --release-pub PUB  its public key: the image checks every update against it (and an
#                      update that carries another one hands over to it: key rotation)
#                      Make a pair once with `minisign -G -p release.pub -s release.key` and
#                      keep release.key off the build machines' disks when not in use.
#   --version N     image version (a positive number; updates only go forward); default 1
#   --floor N       version floor (default 1, at most N): an appliance that installs this
#                   update refuses every update older than the floor from then on, however
#                   it is signed (raise it when an old version has a known fault)
#   --debs DIR      the komnet .debs to install; default: packaging/build-debs.sh builds them
#   --out DIR       where the results go; default ${CARGO_TARGET_DIR:-target}/image
#   --cache DIR     keeps the Debian base (debootstrap) between builds; default
#                   ${CARGO_TARGET_DIR:-target}/image-cache
#   --overlay DIR   files copied over the root last (an operator's additions, e.g. a syslog
#                   forwarder's configuration); may be given more than once
#   --allow-drift   build even when the mirror's packages differ from packages.lock (says
#                   which); without it such a build stops
#   --refresh-lock  write packages.lock from what debootstrap installed (after a Debian point
#                   release), then build
#   --kernel-args ARGS  added to the kernel command line (the boot entries and the update's
#                   manifest), e.g. no_timer_check for virtual machines on a busy host: the
#                   kernel's IO-APIC timer check panics when emulated timer ticks come late
#
# Writes into --out:
#   komnet-appliance-N.raw    the disk image (dd it onto the appliance's disk or a USB stick)
#   komnet-appliance-N.qcow2  the same for virtual machines
#   komnet-update-N/          the update (komnet-update.txt and its signature
#                             komnet-update.txt.minisig, root.img.zst, vmlinuz, initrd.img)
#   komnet-update-N.stick     a FAT image labelled KOMNET-UPD holding the update (dd it onto a
#                             USB stick; the appliance installs it when the stick is plugged in)
#   root-N.img                the root file system alone
#
# Layout (GPT): komnet-esp 256 MiB (systemd-boot, kernels and boot entries of both slots),
# komnet-a and komnet-b 768 MiB each (the root uses about 450) (ext4, mounted read-only), komnet-data 256 MiB (ext4,
# /var/lib/komnet: keys, enrollment, last-known-good policy). docs/appliance.md explains it.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
target_dir=${CARGO_TARGET_DIR:-$repo/target}

version=1
floor=1
release_key=""
release_pub=""
debs=""
out="$target_dir/image"
cache="$target_dir/image-cache"
allow_drift=false
refresh_lock=false
overlays=()
kernel_args=""
while [ $# -gt 0 ]; do
    case "$1" in
        --version) version=${2:?--version needs a number}; shift ;;
        --floor) floor=${2:?--floor needs a number}; shift ;;
        --release-key) release_key=${2:?--release-key needs a file}; shift ;;
        --release-pub) release_pub=${2:?--release-pub needs a file}; shift ;;
        --debs) debs=${2:?--debs needs a folder}; shift ;;
        --out) out=${2:?--out needs a folder}; shift ;;
        --cache) cache=${2:?--cache needs a folder}; shift ;;
        --overlay) [ -d "${2:-}" ] || { echo "build-image.sh: --overlay needs a folder, '${2:-}' is none" >&2; exit 2; }
                   overlays+=("$(cd "$2" && pwd)"); shift ;;
        --allow-drift) allow_drift=true ;;
        --refresh-lock) refresh_lock=true ;;
        --kernel-args) kernel_args=${2?--kernel-args needs arguments}; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "build-image.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done
# They go into a boot entry's options line and the update's manifest: words, no quoting.
[[ "$kernel_args" =~ ^[A-Za-z0-9_.,:=/\ -]*$ ]] || { echo "build-image.sh: --kernel-args may hold letters, digits, spaces and _ . , : = / -, not '$kernel_args'" >&2; exit 2; }
[[ "$version" =~ ^[1-9][0-9]{0,8}$ ]] || { echo "build-image.sh: --version must be a positive number, not '$version'" >&2; exit 2; }
[[ "$floor" =~ ^[1-9][0-9]{0,8}$ ]] && [ "$floor" -le "$version" ] || { echo "build-image.sh: --floor must be a positive number up to --version ($version), not '$floor'" >&2; exit 2; }
if [ -z "$release_key" ] || [ -z "$release_pub" ]; then
    echo "build-image.sh: --release-key and --release-pub are needed: appliances install only updates signed" >&2
    echo "  with the release key (make a pair once: minisign -G -p release.pub -s release.key)" >&2
    exit 2
fi
for f in "$release_key" "$release_pub"; do
    [ -r "$f" ] || { echo "build-image.sh: cannot read $f" >&2; exit 2; }
done
release_key=$(cd "$(dirname "$release_key")" && pwd)/$(basename "$release_key")
release_pub=$(cd "$(dirname "$release_pub")" && pwd)/$(basename "$release_pub")
if [ "$(id -u)" != 0 ]; then
    echo "build-image.sh: needs root (debootstrap and chroot); run it with sudo" >&2
    exit 1
fi
for tool in debootstrap sfdisk mkfs.ext4 mkfs.vfat mcopy mmd qemu-img zstd sha256sum minisign; do
    command -v "$tool" >/dev/null || { echo "build-image.sh: $tool is missing (scripts/setup.sh installs it)" >&2; exit 1; }
done

MIRROR=${KOMNET_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
# What the appliance runs; everything else in packages.lock is what these depend on.
# systemd-boot: the boot loader and systemd-bless-boot (boot counting); systemd-resolved and
# -timesyncd: DNS and time from the WAN (certificates need a correct clock; resolved needs
# dbus); jq: the console and health check read `komnet status --json`; zstd: updates are
# compressed; netbase: /etc/protocols for nft; minisign: updates are signed; mtools: USB sticks
# are read without mounting them; dnsmasq-base: DHCP and router advertisements on the LAN
# (komnet-dhcp.service).
PACKAGES=linux-image-amd64,systemd,dbus,netbase,systemd-sysv,systemd-boot,systemd-boot-efi,systemd-resolved,systemd-timesyncd,udev,kmod,nftables,iproute2,e2fsprogs,initramfs-tools,zstd,jq,minisign,mtools,dnsmasq-base
# Kernel modules an appliance never loads (sound, graphics, radios, cameras, ...): out, to keep
# the root small and the initramfs quick to unpack.
PRUNE_MODULES="sound drivers/gpu drivers/media drivers/net/wireless drivers/infiniband drivers/staging drivers/bluetooth drivers/isdn drivers/iio drivers/input/touchscreen drivers/misc/mei net/bluetooth net/wireless net/mac80211"
CMDLINE="ro rootwait console=tty1 console=ttyS0,115200n8 net.ifnames=0 quiet loglevel=3 systemd.show_status=auto"
[ -z "$kernel_args" ] || CMDLINE="$CMDLINE $kernel_args"

ESP_MIB=256
ROOT_MIB=768
DATA_MIB=256

work="$out/work"
rootfs="$work/rootfs"
mkdir -p "$out" "$cache/debs"
start=$(date +%s)
step() { echo "== [$(( $(date +%s) - start ))s] $*"; }

mounted=()
cleanup() {
    local m
    for m in "${mounted[@]}"; do umount -l "$m" 2>/dev/null || true; done
}
trap cleanup EXIT
chroot_mounts() {
    mount -t proc proc "$rootfs/proc"; mounted+=("$rootfs/proc")
    mount --bind /dev "$rootfs/dev"; mounted+=("$rootfs/dev")
}
chroot_unmount() {
    cleanup
    mounted=()
}

# ---- 1. The Debian base, checked against packages.lock, kept in the cache ---------------
lock="$here/packages.lock"
# The base is rebuilt when what goes into it changes (bump BASE_RECIPE when its steps do).
BASE_RECIPE=1
base_key() { printf '%s\n' "$BASE_RECIPE" "$SUITE" "$PACKAGES" "$PRUNE_MODULES" | cat - "$lock" | sha256sum | cut -c1-16; }
key=$(base_key)
base="$cache/base-$key.tar"
if $refresh_lock || [ ! -f "$base" ]; then
    step "debootstrap $SUITE ($MIRROR) into $rootfs"
    rm -rf "$work"
    mkdir -p "$work"
    debootstrap --variant=minbase --cache-dir="$cache/debs" --include="$PACKAGES" \
        "$SUITE" "$rootfs" "$MIRROR" >"$work/debootstrap.log" 2>&1 || {
        tail -20 "$work/debootstrap.log" >&2
        echo "build-image.sh: debootstrap failed (log: $work/debootstrap.log)" >&2
        exit 1
    }
    chroot "$rootfs" dpkg-query -W -f='${Package} ${Version}\n' | LC_ALL=C sort >"$work/installed.lock"
    if $refresh_lock; then
        cp "$work/installed.lock" "$lock"
        step "packages.lock refreshed ($(wc -l <"$lock") packages); commit it"
        key=$(base_key)
        base="$cache/base-$key.tar"
    elif ! diff -u "$lock" "$work/installed.lock" >"$work/drift.diff"; then
        echo "build-image.sh: the mirror's packages differ from packages.lock:" >&2
        grep '^[-+][^-+]' "$work/drift.diff" >&2 || true
        if ! $allow_drift; then
            echo "build-image.sh: a Debian point release or security fix moved them. Check the" >&2
            echo "  changes, then run with --refresh-lock and commit packages.lock (or --allow-drift)." >&2
            exit 1
        fi
        echo "build-image.sh: going on (--allow-drift); this image is not the locked one" >&2
    fi

    step "slimming the base (apt caches, documentation, unused kernel modules)"
    rm -rf "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    rm -rf "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/*
    find "$rootfs/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name 'locale.alias' -exec rm -rf {} +
    kver=$(basename "$(ls -d "$rootfs"/usr/lib/modules/*)")
    for m in $PRUNE_MODULES; do rm -rf "$rootfs/usr/lib/modules/$kver/kernel/$m"; done
    chroot "$rootfs" depmod "$kver"
    chroot_mounts
    chroot "$rootfs" update-initramfs -u -k "$kver" >"$work/initramfs.log" 2>&1 || {
        tail -20 "$work/initramfs.log" >&2; echo "build-image.sh: update-initramfs failed" >&2; exit 1; }
    chroot_unmount
    tar -C "$rootfs" -cf "$base.tmp" .
    mv "$base.tmp" "$base"
    # Older bases are of no use once the lock or this script changed.
    find "$cache" -maxdepth 1 -name 'base-*.tar' ! -name "base-$key.tar" -delete
else
    step "Debian base from the cache ($base)"
    rm -rf "$work"
    mkdir -p "$rootfs"
    tar -C "$rootfs" -xf "$base"
fi

# ---- 2. komnet and the appliance's configuration ---------------------------------------
if [ -z "$debs" ]; then
    step "building the komnet packages (packaging/build-debs.sh)"
    "$repo/packaging/build-debs.sh" >"$work/build-debs.log" 2>&1 || {
        tail -20 "$work/build-debs.log" >&2; echo "build-image.sh: build-debs.sh failed" >&2; exit 1; }
    debs="$target_dir/debian"
fi
shopt -s nullglob
pkgs=("$debs"/komnet-gateway_*.deb "$debs"/komnet_*.deb)
shopt -u nullglob
if [ ${#pkgs[@]} -ne 2 ]; then
    echo "build-image.sh: expected one komnet-gateway_*.deb and one komnet_*.deb in $debs, found: ${pkgs[*]:-none}" >&2
    exit 1
fi
step "installing ${pkgs[*]##*/}"
mkdir -p "$rootfs/tmp/debs"
cp "${pkgs[@]}" "$rootfs/tmp/debs/"
chroot_mounts
# The packages' dependencies (nftables, iproute2, systemd, passwd) are in the base already;
# dpkg refuses when one is not, rather than fetching anything unlocked.
names=("${pkgs[@]##*/}")
chroot "$rootfs" env DEBIAN_FRONTEND=noninteractive dpkg -i "${names[@]/#//tmp/debs/}" \
    >"$work/dpkg.log" 2>&1 || { tail -20 "$work/dpkg.log" >&2; echo "build-image.sh: dpkg -i failed" >&2; exit 1; }
rm -rf "$rootfs/tmp/debs"

step "appliance configuration (packaging/image/overlay)"
cp -a "$here/overlay/." "$rootfs/"
for o in "${overlays[@]}"; do
    step "extra files from $o"
    cp -a "$o/." "$rootfs/"
done
cp "$repo/docs/appliance.md" "$rootfs/usr/share/doc/komnet-gateway/appliance.md" 2>/dev/null || true
printf 'NAME="komnet appliance"\nVERSION=%s\nFLOOR=%s\nDEBIAN=%s\n' "$version" "$floor" "$(cat "$rootfs/etc/debian_version")" >"$rootfs/etc/komnet-release"
# The key every update must be signed with, and this image's own version floor.
install -D -m 0644 "$release_pub" "$rootfs/usr/share/komnet/release.pub"
echo "$floor" >"$rootfs/usr/lib/komnet/update-floor"
# /var/lib/komnet-dhcp: where komnet-dhcp.service sees its leases (bound from the data
# partition by its drop-in; the root is read-only).
mkdir -p "$rootfs/efi" "$rootfs/var/lib/komnet" "$rootfs/var/lib/komnet-dhcp"
# The root is read-only: systemd gives each boot a machine ID in memory.
: >"$rootfs/etc/machine-id"
ln -sf /etc/machine-id "$rootfs/var/lib/dbus/machine-id"
ln -sf ../run/systemd/resolve/stub-resolv.conf "$rootfs/etc/resolv.conf"
# No passwords: root stays locked, there is no SSH server; the console shows state only.
chroot "$rootfs" passwd -l root >/dev/null
systemctl --root="$rootfs" enable systemd-networkd.service systemd-resolved.service \
    systemd-timesyncd.service nftables.service komnet-gateway.service komnet-console.service \
    komnet-health.service komnet-dhcp.path >/dev/null 2>&1
systemctl --root="$rootfs" mask apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer \
    e2scrub_reap.service fstrim.timer systemd-boot-update.service getty@.service \
    serial-getty@.service >/dev/null 2>&1
chroot_unmount

kver=$(basename "$(ls -d "$rootfs"/usr/lib/modules/*)")
[ -f "$rootfs/boot/vmlinuz-$kver" ] && [ -f "$rootfs/boot/initrd.img-$kver" ] || {
    echo "build-image.sh: kernel $kver or its initramfs is missing in the root" >&2; exit 1; }

# ---- 3. File systems ---------------------------------------------------------------------
step "root file system (ext4, ${ROOT_MIB} MiB)"
root_img="$out/root-$version.img"
rm -f "$root_img"
# Fixed UUID and hash seed: the same input gives the same metadata.
h=$(printf 'komnet-root-%s' "$version" | sha256sum)
uuid="${h:0:8}-${h:8:4}-4${h:13:3}-8${h:17:3}-${h:20:12}"
mkfs.ext4 -q -L komnet-root -U "$uuid" -E "hash_seed=$uuid,root_owner=0:0" -m 0 -d "$rootfs" \
    "$root_img" "${ROOT_MIB}M"
root_size=$(stat -c %s "$root_img")

step "ESP (FAT32, ${ESP_MIB} MiB, systemd-boot)"
esp_img="$work/esp.img"
rm -f "$esp_img"
mkfs.vfat --invariant -F 32 -n KOMNET-ESP -i 6b6f6d6e -C "$esp_img" $(( ESP_MIB * 1024 ))
efi_bin="$rootfs/usr/lib/systemd/boot/efi/systemd-bootx64.efi"
mmd -i "$esp_img" ::/EFI ::/EFI/BOOT ::/EFI/systemd ::/loader ::/loader/entries ::/komnet-a
mcopy -i "$esp_img" "$efi_bin" ::/EFI/BOOT/BOOTX64.EFI
mcopy -i "$esp_img" "$efi_bin" ::/EFI/systemd/systemd-bootx64.efi
mcopy -i "$esp_img" "$rootfs/boot/vmlinuz-$kver" ::/komnet-a/vmlinuz
mcopy -i "$esp_img" "$rootfs/boot/initrd.img-$kver" ::/komnet-a/initrd.img
# No menu (a key held at power-on shows it); the newest good version boots: entries sort by
# sort-key, then version, newest first, and systemd-boot puts entries with no tries left last.
printf 'timeout 0\neditor no\nauto-entries no\nauto-firmware no\nconsole-mode keep\n' >"$work/loader.conf"
mcopy -i "$esp_img" "$work/loader.conf" ::/loader/loader.conf
cat >"$work/komnet-a.conf" <<ENTRY
title      komnet $version (slot a)
sort-key   komnet
version    $version
linux      /komnet-a/vmlinuz
initrd     /komnet-a/initrd.img
options    root=PARTLABEL=komnet-a $CMDLINE komnet.slot=a
ENTRY
mcopy -i "$esp_img" "$work/komnet-a.conf" ::/loader/entries/komnet-a.conf

step "data partition (ext4, ${DATA_MIB} MiB, empty)"
data_img="$work/data.img"
rm -f "$data_img"
komnet_ids=$(chroot "$rootfs" id -u komnet):$(chroot "$rootfs" id -g komnet)
mkfs.ext4 -q -L komnet-data -m 0 -E "root_owner=$komnet_ids" "$data_img" "${DATA_MIB}M"

# ---- 4. The disk -------------------------------------------------------------------------
step "disk image (GPT)"
raw="$out/komnet-appliance-$version.raw"
total_mib=$(( 1 + ESP_MIB + ROOT_MIB + ROOT_MIB + DATA_MIB + 1 ))
rm -f "$raw"
truncate -s "${total_mib}M" "$raw"
# Fixed GUIDs: the layout is the same on every appliance; partitions are found by name.
sfdisk -q "$raw" <<LAYOUT
label: gpt
label-id: 6B6F6D6E-6574-4000-8000-000000000000
unit: sectors
first-lba: 2048

start=2048, size=$(( ESP_MIB * 2048 )), type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, uuid=6B6F6D6E-6574-4000-8000-000000000001, name=komnet-esp
size=$(( ROOT_MIB * 2048 )), type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, uuid=6B6F6D6E-6574-4000-8000-00000000000A, name=komnet-a
size=$(( ROOT_MIB * 2048 )), type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, uuid=6B6F6D6E-6574-4000-8000-00000000000B, name=komnet-b
size=$(( DATA_MIB * 2048 )), type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, uuid=6B6F6D6E-6574-4000-8000-00000000000D, name=komnet-data
LAYOUT
place() { dd if="$1" of="$raw" bs=1M seek="$2" conv=notrunc,sparse status=none; }
place "$esp_img" 1
place "$root_img" $(( 1 + ESP_MIB ))
# Slot b stays empty until the first update writes it.
place "$data_img" $(( 1 + ESP_MIB + 2 * ROOT_MIB ))
qemu-img convert -f raw -O qcow2 "$raw" "$out/komnet-appliance-$version.qcow2"

# ---- 5. The update -------------------------------------------------------------------------
step "update komnet-update-$version (root.img.zst, kernel, initramfs, manifest)"
upd="$out/komnet-update-$version"
rm -rf "$upd"
mkdir -p "$upd"
zstd -q -T0 -3 "$root_img" -o "$upd/root.img.zst"
cp "$rootfs/boot/vmlinuz-$kver" "$upd/vmlinuz"
cp "$rootfs/boot/initrd.img-$kver" "$upd/initrd.img"
sum() { sha256sum "$1" | cut -d' ' -f1; }
cat >"$upd/komnet-update.txt" <<MANIFEST
VERSION=$version
FLOOR=$floor
CMDLINE=$CMDLINE
ROOT_SIZE=$root_size
ROOT_SHA256=$(sum "$root_img")
ROOT_ZST_SHA256=$(sum "$upd/root.img.zst")
KERNEL_SHA256=$(sum "$upd/vmlinuz")
INITRD_SHA256=$(sum "$upd/initrd.img")
MANIFEST
step "signing the update with the release key"
minisign -S -s "$release_key" -m "$upd/komnet-update.txt" -x "$upd/komnet-update.txt.minisig" \
    -t "komnet update VERSION=$version FLOOR=$floor" </dev/null >/dev/null \
    || { echo "build-image.sh: signing komnet-update.txt with $release_key failed" >&2; exit 1; }
minisign -V -q -p "$release_pub" -m "$upd/komnet-update.txt" -x "$upd/komnet-update.txt.minisig" \
    || { echo "build-image.sh: $release_key and $release_pub are not one key pair" >&2; exit 1; }
stick="$out/komnet-update-$version.stick"
rm -f "$stick"
stick_kib=$(( $(du -k --apparent-size -c "$upd"/* | tail -n 1 | cut -f1) + 16 * 1024 ))
mkfs.vfat --invariant -F 32 -n KOMNET-UPD -C "$stick" "$stick_kib"
mcopy -i "$stick" "$upd"/* ::/

rm -rf "$work"
step "done: $raw ($(du -h --apparent-size "$raw" | cut -f1), $(du -h "$raw" | cut -f1) used), qcow2, update $upd"
