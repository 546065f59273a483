#!/usr/bin/env bash
# test-update.sh — the appliance's update checks (packaging/image/overlay/usr/sbin/komnet-update
# verify) on this machine, without qemu: a small update made and signed here, then the ways an
# attacker or an accident could present one. Each must be refused with a message that says
# why, and the ESP (where boot entries and the version floor live) must be left as it was.
# The writing step and the reboot are tested by booting the image (packaging/test-image.sh).
# Needs minisign and mtools (scripts/setup.sh test installs them); no root.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
for tool in minisign mcopy mdir mkfs.vfat zstd; do
    command -v "$tool" >/dev/null || { echo "test-update.sh: $tool is missing (scripts/setup.sh test installs it)" >&2; exit 1; }
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail() { echo "test-update.sh: FAILED: $*" >&2; exit 1; }

export KOMNET_LIB="$repo/packaging/image/overlay/usr/lib/komnet"
export KOMNET_ESP="$work/esp" KOMNET_RELEASE="$work/komnet-release" KOMNET_UPDATE_STAGE="$work/stage"
export KOMNET_RELEASE_KEY="$work/release.pub" KOMNET_IMAGE_FLOOR="$work/image-floor"
export KOMNET_CMDLINE="root=PARTLABEL=komnet-a komnet.slot=a" KOMNET_CONSOLES=""
update="$repo/packaging/image/overlay/usr/sbin/komnet-update"
mkdir -p "$KOMNET_ESP/loader/entries"
echo "entry of slot a" >"$KOMNET_ESP/loader/entries/komnet-a.conf"
printf 'VERSION=2\nFLOOR=1\n' >"$KOMNET_RELEASE"
echo 1 >"$KOMNET_IMAGE_FLOOR"

minisign -G -W -p "$work/release.pub" -s "$work/release.key" >/dev/null
minisign -G -W -p "$work/attacker.pub" -s "$work/attacker.key" >/dev/null

# make_update DIR VERSION FLOOR KEY: a complete update, signed with KEY.
make_update() {
    local dir=$1 version=$2 floor=$3 key=$4
    mkdir -p "$dir"
    head -c 200000 /dev/urandom >"$work/root.img"
    zstd -q -f "$work/root.img" -o "$dir/root.img.zst"
    head -c 5000 /dev/urandom >"$dir/vmlinuz"
    head -c 7000 /dev/urandom >"$dir/initrd.img"
    sum() { sha256sum "$1" | cut -d' ' -f1; }
    cat >"$dir/komnet-update.txt" <<MANIFEST
VERSION=$version
FLOOR=$floor
CMDLINE=ro quiet
ROOT_SIZE=200000
ROOT_SHA256=$(sum "$work/root.img")
ROOT_ZST_SHA256=$(sum "$dir/root.img.zst")
KERNEL_SHA256=$(sum "$dir/vmlinuz")
INITRD_SHA256=$(sum "$dir/initrd.img")
MANIFEST
    sign "$dir" "$key"
}
sign() { minisign -S -s "$2" -m "$1/komnet-update.txt" -x "$1/komnet-update.txt.minisig" </dev/null >/dev/null; }
esp_state() { (cd "$KOMNET_ESP" && find . -type f -exec sha256sum {} + | sort); }

passed=0
# expect NAME SOURCE EXIT REGEX
expect() {
    local name=$1 source=$2 want_rc=$3 re=$4 out rc=0 before
    before=$(esp_state)
    out=$("$update" verify "$source" 2>&1) || rc=$?
    [ "$rc" = "$want_rc" ] || fail "$name: exit $rc, expected $want_rc; said: $out"
    grep -qE -- "$re" <<<"$out" || fail "$name: expected a message matching '$re'; said: $out"
    [ "$(esp_state)" = "$before" ] || fail "$name: the ESP changed"
    printf '  ok  %-44s %s\n' "$name" "$(tail -n 1 <<<"$out" | cut -c1-110)"
    passed=$(( passed + 1 ))
}

make_update "$work/good" 3 2 "$work/release.key"
expect "signed update (folder)" "$work/good" 0 'update: version 3 \(floor 2\) from .* is signed and complete'

stick="$work/good.stick"
mkfs.vfat -n KOMNET-UPD -C "$stick" 4096 >/dev/null
mcopy -i "$stick" "$work/good"/* ::/
expect "signed update (FAT stick, read by mtools)" "$stick" 0 'is signed and complete'

cp -a "$work/good" "$work/unsigned"; rm "$work/unsigned/komnet-update.txt.minisig"
expect "no signature" "$work/unsigned" 1 'update refused: .*no signature.*unsigned updates are not installed; nothing was written'

cp -a "$work/good" "$work/foreign"; sign "$work/foreign" "$work/attacker.key"
expect "signed with another key" "$work/foreign" 1 "update refused: the signature of .* is not the release key's"

cp -a "$work/good" "$work/edited"; sed -i 's/^VERSION=3$/VERSION=9/' "$work/edited/komnet-update.txt"
expect "manifest changed after signing" "$work/edited" 1 "update refused: the signature of .* is not the release key's"

cp -a "$work/good" "$work/garbage"; echo "not a signature" >"$work/garbage/komnet-update.txt.minisig"
expect "a broken signature file" "$work/garbage" 1 "update refused: the signature of .* is not the release key's"

cp -a "$work/good" "$work/swapped"; head -c 1000 /dev/urandom | zstd -q -f -o "$work/swapped/root.img.zst"
expect "root image swapped" "$work/swapped" 1 'update refused: root.img.zst does not match its signed SHA-256 sum'

cp -a "$work/good" "$work/kernel"; echo x >>"$work/kernel/vmlinuz"
expect "kernel changed" "$work/kernel" 1 'update refused: vmlinuz does not match its signed SHA-256 sum'

cp -a "$work/good" "$work/noinitrd"; rm "$work/noinitrd/initrd.img"
expect "initramfs missing" "$work/noinitrd" 1 'update refused: .* has no initrd.img'

make_update "$work/old" 1 1 "$work/release.key"
expect "older than the running version" "$work/old" 1 'update refused: version 1 is older than the running 2'

make_update "$work/same" 2 1 "$work/release.key"
expect "the running version" "$work/same" 0 'version 2 is what runs already'

mkdir -p "$KOMNET_ESP/komnet"; echo 4 >"$KOMNET_ESP/komnet/update-floor"
expect "below the floor an update raised" "$work/good" 1 "update refused: version 3 is below this appliance's version floor 4"
rm "$KOMNET_ESP/komnet/update-floor"
echo 5 >"$KOMNET_IMAGE_FLOOR"
expect "below the image's own floor" "$work/good" 1 "update refused: version 3 is below this appliance's version floor 5"
echo 1 >"$KOMNET_IMAGE_FLOOR"

make_update "$work/badfloor" 3 7 "$work/release.key"
expect "signed, but FLOOR above VERSION" "$work/badfloor" 1 "update refused: komnet-update.txt: FLOOR '7' is not a number up to VERSION"

mkdir -p "$work/empty"
expect "not an update at all" "$work/empty" 1 'update refused: .* has no komnet-update.txt in its top folder'

rm "$KOMNET_RELEASE_KEY"
expect "an image without a release key" "$work/good" 1 'update refused: this image has no release key'

echo "test-update.sh: all $passed update checks passed"
