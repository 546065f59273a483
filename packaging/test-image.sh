#!/usr/bin/env bash
# test-image.sh — boots the komnet appliance image in qemu (UEFI, OVMF) and checks it does what
# docs/appliance.md promises, against a real enrollment service and hub:
#
#   1. power-on with a bootstrap stick (FAT, label KOMNET): the appliance copies the file,
#      enrols, loads the policy, brings up the tunnel and routes its LAN. The LAN port carries an
#      802.1Q trunk from the town hall's switch (packaging/test-vlan-switch.py): staff on VLAN
#      10, guests on VLAN 100, as the test's copy of the district policy says. The staff PC gets
#      its address by DHCP from the appliance on VLAN 10 and reaches the DMS in the data centre
#      through the tunnel; a PC on the guest VLAN gets a guest address and does not, nor with a
#      staff address it sets itself. The time from power-on to the first packet through (DHCP
#      included) is printed (goal: 60 s under TCG).
#   2. an update stick (label KOMNET-UPD) with a deliberately broken version 2 (its gateway.toml
#      is refused) is plugged in: the appliance writes slot b, restarts into it on probation,
#      the health check fails on each try, systemd-boot falls back to slot a by itself, the
#      console says so, traffic flows again, and the broken version is not installed again
#      although the stick is still in. The staff PC's DHCP lease is on the data partition.
#      Version 2 raises the version floor to 2: a stick with the (validly signed) version 1 is
#      refused afterwards.
#   3. a fresh appliance without a stick says what it waits for; update sticks an attacker
#      could bring (a valid image signed with another key, one without a signature) are refused
#      and nothing is written (slot b and the boot entries are as they were); a stick with a
#      token that is spent (the one of step 1) is refused plainly, and the data partition holds
#      no key, no enrollment, no policy key afterwards.
#   4. `systemctl restart nftables` on a running appliance (a test copy of the image with a
#      test-only unit the host triggers with a stick; packaging/test-image-nftables.sh): the
#      town-hall PC's continuous stream towards the WAN side never arrives, and does once the
#      firewall is opened on purpose.
#
#   sudo packaging/test-image.sh         (scripts/test.sh runs it)
#
# Everything runs in network namespaces it makes (kti-dc: enrollment service, hub, DMS, qemu
# with user-mode networking for the appliance's WAN port; kti-sw: the town hall's switch, whose
# trunk is the appliance's LAN port (a tap device); kti-lan: the staff PC on VLAN 10; kti-guest:
# a PC on the guest VLAN 100) and removes again, also when it fails.
# KVM is used when it works, TCG otherwise (KOMNET_QEMU_ACCEL=tcg|kvm forces one).
# KOMNET_TEST_PAUSE_ON_FAILURE=SECS keeps everything up that long after a failure, to look.
set -euo pipefail

cd "$(dirname "$0")/.."
repo=$(pwd)
target_dir=${CARGO_TARGET_DIR:-$repo/target}
bin="$target_dir/release"
work="$target_dir/image-test"

fail() { echo "test-image.sh: FAILED: $*" >&2; exit 1; }
if [ "$(id -u)" != 0 ]; then
    echo "test-image.sh: needs root (network namespaces, tap devices, debootstrap): run it with sudo" >&2
    exit 1
fi
OVMF_CODE=/usr/share/OVMF/OVMF_CODE_4M.fd
OVMF_VARS=/usr/share/OVMF/OVMF_VARS_4M.fd
for f in "$OVMF_CODE" "$OVMF_VARS"; do
    [ -f "$f" ] || fail "$f is missing: this machine cannot boot UEFI images in qemu (package ovmf; scripts/setup.sh installs it)"
done
command -v udhcpc >/dev/null || fail "udhcpc is missing: the town-hall PCs ask the appliance for their addresses with it (package udhcpc; scripts/setup.sh test installs it)"
command -v qemu-system-x86_64 >/dev/null || fail "qemu-system-x86_64 is missing: this machine cannot run the image test (package qemu-system-x86; scripts/setup.sh installs it)"
[ -c /dev/net/tun ] || fail "/dev/net/tun is missing: the LAN side of the appliance needs a tap device"
for b in komnet komnet-enroll komnet-gateway netprobe; do
    [ -x "$bin/$b" ] || fail "$bin/$b is missing: build first (cargo build --release --locked -p komnet-gateway -p komnet-enroll -p komnet-cli -p komnet-netns-tests --bins)"
done

DC=kti-dc
LAN=kti-lan
SW=kti-sw
GUEST=kti-guest
TAP=ktilan0
QEMU_PID=""
SWITCH_PID=""
# The namespaces' set-up and teardown (every process the test started in them: qemu, the
# service, the hub, the servers) are scripts/netns.sh's, as for the benches and demos.
# shellcheck source=scripts/netns.sh
. scripts/netns.sh
cleanup() {
    local rc=$?
    if [ $rc != 0 ] && [ -n "${KOMNET_TEST_PAUSE_ON_FAILURE:-}" ]; then
        echo "test-image.sh: failed; pausing ${KOMNET_TEST_PAUSE_ON_FAILURE}s for a look (netns $DC, $LAN)" >&2
        sleep "$KOMNET_TEST_PAUSE_ON_FAILURE"
    fi
    netns_del "$DC" "$LAN" "$SW" "$GUEST"
    ip link del "$TAP" 2>/dev/null || true
    if [ $rc != 0 ] && [ -f "$work/serial.log" ]; then
        echo "---- last lines of the appliance's console ($work/serial.log)" >&2
        tr -d '\r' <"$work/serial.log" | grep -a 'komnet' | tail -25 >&2 || true
    fi
    exit $rc
}
trap cleanup EXIT INT TERM
# A run killed before its cleanup leaves these behind.
netns_del "$DC" "$LAN" "$SW" "$GUEST"

t0=$(date +%s)
elapsed() { echo $(( $(date +%s) - t0 )); }
note() { echo "== [$(elapsed)s] $*"; }

# ---- the images -------------------------------------------------------------------------
rm -rf "$work"
mkdir -p "$work"
out="$work/images"
# The district policy with Nohfelden's town hall on a VLAN trunk: staff on VLAN 10, guests on
# VLAN 100 (examples/policy/st-wendel puts them on ports: the namespace tests and the demo run
# on kernels that may lack 802.1Q), and the staff PC's address reserved for its MAC.
policy_dir="$work/policy"
mkdir -p "$policy_dir/tenants"
cp examples/policy/st-wendel/operator.toml "$policy_dir/"
cp examples/policy/st-wendel/tenants/*.toml "$policy_dir/tenants/"
STAFF_MAC=52:54:00:6b:10:50
sed -i -e 's/^port = "eth1" .*/vlan = 10/' -e 's/^port = "guest0"$/vlan = 100/' "$policy_dir/tenants/nohfelden.toml"
printf '\n[segments.verwaltung.dhcp]\nhosts = [{ mac = "%s", address = "10.30.1.50", name = "pc-verwaltung" }]\n' \
    "$STAFF_MAC" >>"$policy_dir/tenants/nohfelden.toml"
grep -q '^vlan = 10$' "$policy_dir/tenants/nohfelden.toml" && grep -q '^vlan = 100$' "$policy_dir/tenants/nohfelden.toml" \
    || fail "could not put Nohfelden's segments on VLANs in the test's policy"
# The release key for this test's images, and an attacker's key.
minisign -G -W -p "$work/release.pub" -s "$work/release.key" >/dev/null
minisign -G -W -p "$work/attacker.pub" -s "$work/attacker.key" >/dev/null
keys=(--release-key "$work/release.key" --release-pub "$work/release.pub")
# Under TCG on a loaded machine the kernel's IO-APIC timer check can see too few emulated ticks
# and panic ("IO-APIC + timer doesn't work!") before anything else runs.
keys+=(--kernel-args no_timer_check)
note "building image version 1 (packaging/image/build-image.sh)"
packaging/image/build-image.sh "${keys[@]}" --version 1 --allow-drift --out "$out" >"$work/build-1.log" 2>&1 \
    || { tail -30 "$work/build-1.log" >&2; fail "building image version 1"; }
grep '^== ' "$work/build-1.log" | tail -n 1
# Version 2 is broken on purpose: its gateway.toml has a setting the gateway refuses.
mkdir -p "$work/broken/etc/komnet"
cp packaging/image/overlay/etc/komnet/gateway.toml "$work/broken/etc/komnet/gateway.toml"
echo 'deliberately_broken = "test-image.sh: version 2 must be rolled back"' >>"$work/broken/etc/komnet/gateway.toml"
note "building the broken version 2 (same base, other gateway.toml)"
packaging/image/build-image.sh "${keys[@]}" --version 2 --floor 2 --allow-drift --out "$out" --debs "$target_dir/debian" \
    --overlay "$work/broken" >"$work/build-2.log" 2>&1 \
    || { tail -30 "$work/build-2.log" >&2; fail "building image version 2"; }

# ---- the data centre ----------------------------------------------------------------------
note "data centre: enrollment service, hub, DMS (netns $DC)"
netns_add "$DC" "$LAN" "$SW" "$GUEST" || fail "cannot create the test's network namespaces"
# The switch's access ports: VLAN 10 to the staff PC, VLAN 100 to the guest PC. The trunk is
# the appliance's LAN port (the tap device, from start_vm on).
netns_veth "$SW" sw10 "" "$LAN" eth0 "" && netns_veth "$SW" sw100 "" "$GUEST" eth0 "" \
    || fail "cannot connect the switch's access ports"
ip -n "$LAN" link set eth0 address "$STAFF_MAC"
for p in sw10 sw100; do ip -n "$SW" link set "$p" promisc on; done
# The appliance sees the data centre at 10.0.2.2 (qemu's user-mode network maps it to this
# namespace's loopback); the hub and the service use the same address among themselves.
ip -n "$DC" addr add 10.0.2.2/32 dev lo
ip -n "$DC" addr add 10.0.1.10/32 dev lo
dcx() { ip netns exec "$DC" "$@"; }

"$bin/komnet" policy keygen --out "$work/policy.key" >/dev/null
"$bin/komnet-enroll" init --data-dir "$work/enroll" --server-name 10.0.2.2 \
    --enroll-url https://10.0.2.2:8443 --hub-endpoint hub1=10.0.2.2:51820 \
    --policy-public-key "$work/policy.pub" >/dev/null
sed -i -e 's|^listen = .*|listen = "0.0.0.0:8443"|' -e 's|^allowed_ips = .*|allowed_ips = ["10.0.0.0/8"]|' "$work/enroll/enroll.toml"
grep -q '^allowed_ips = \["10.0.0.0/8"\]' "$work/enroll/enroll.toml" || fail "could not set allowed_ips in enroll.toml"
ip netns exec "$DC" "$bin/komnet-enroll" serve --data-dir "$work/enroll" >"$work/enroll.log" 2>&1 &
for _ in $(seq 100); do [ -S "$work/enroll/admin.sock" ] && break; sleep 0.1; done
[ -S "$work/enroll/admin.sock" ] || { cat "$work/enroll.log" >&2; fail "the enrollment service did not start"; }
admin() { "$bin/komnet" "$@" --socket "$work/enroll/admin.sock"; }
"$bin/komnet" policy bundle "$policy_dir" --key "$work/policy.key" --out "$work/policy-1.bundle" >/dev/null
admin policy-publish "$work/policy-1.bundle" >/dev/null
admin token create --tenant kreis --site hub1 --role hub --out "$work/hub1.bootstrap.json" >/dev/null
admin token create --tenant nohfelden --site rathaus --role spoke --out "$work/nohfelden.bootstrap.json" >/dev/null
cat >"$work/hub1.toml" <<EOF
role = "hub"
data_dir = "$work/hub1"
bootstrap = "$work/hub1.bootstrap.json"
policy_public_key = "$work/policy.pub"
policy_poll = "1s"
interface = "komnet0"
listen_port = 51820
EOF
ip netns exec "$DC" "$bin/komnet-gateway" run --config "$work/hub1.toml" >"$work/hub1.log" 2>&1 &
ip netns exec "$DC" "$bin/netprobe" serve echo:0.0.0.0:443 >"$work/dms.log" 2>&1 &
for _ in $(seq 150); do
    dcx "$bin/komnet" status --json 2>/dev/null | grep -Eq '"state": *"running"' && break
    sleep 0.2
done
dcx "$bin/komnet" status --json 2>/dev/null | grep -Eq '"state": *"running"' \
    || { tail -20 "$work/hub1.log" >&2; fail "the hub did not come up"; }

# ---- sticks ----------------------------------------------------------------------------
# A stick with one file, as a technician gets it: FAT, label KOMNET, komnet-bootstrap.json.
make_stick() { # FILE BOOTSTRAP
    rm -f "$1"
    mkfs.vfat -n KOMNET -C "$1" 4096 >/dev/null
    mcopy -i "$1" "$2" ::/komnet-bootstrap.json
}
make_stick "$work/stick-nohfelden.img" "$work/nohfelden.bootstrap.json"
# An update stick (FAT, label KOMNET-UPD) with the files of DIR.
make_update_stick() { # FILE DIR
    rm -f "$1"
    mkfs.vfat -n KOMNET-UPD -C "$1" $(( $(du -k --apparent-size -c "$2"/* | tail -n 1 | cut -f1) + 8192 )) >/dev/null
    mcopy -i "$1" "$2"/* ::/
}
# What an attacker could bring: version 2, intact, but signed with another key; and without
# a signature.
cp -a "$out/komnet-update-2" "$work/update-foreign"
minisign -S -s "$work/attacker.key" -m "$work/update-foreign/komnet-update.txt" \
    -x "$work/update-foreign/komnet-update.txt.minisig" </dev/null >/dev/null
make_update_stick "$work/stick-foreign.img" "$work/update-foreign"
cp -a "$out/komnet-update-2" "$work/update-unsigned"
rm "$work/update-unsigned/komnet-update.txt.minisig"
make_update_stick "$work/stick-unsigned.img" "$work/update-unsigned"

# ---- qemu --------------------------------------------------------------------------------
accel=${KOMNET_QEMU_ACCEL:-}
if [ -z "$accel" ]; then
    accel=tcg
    # /dev/kvm may be there and still not run a guest (nested virtualisation without the CPU
    # features OVMF needs): KVM counts as working when the firmware runs for 5 s under it. A
    # "KVM internal error" stops the guest but not qemu, so it does not end the probe early.
    if [ -w /dev/kvm ]; then
        rc=0
        timeout 5 qemu-system-x86_64 -accel kvm -cpu host -machine pc -m 128 -nodefaults \
            -display none -drive if=pflash,format=raw,readonly=on,file="$OVMF_CODE" \
            >"$work/kvm-probe.log" 2>&1 || rc=$?
        if [ $rc = 124 ] && ! grep -q "KVM internal error" "$work/kvm-probe.log"; then accel=kvm; else echo "test-image.sh: /dev/kvm does not run a guest here ($(head -n 1 "$work/kvm-probe.log")); using TCG"; fi
    fi
fi
if [ "$accel" = kvm ]; then cpu=host; else cpu=max; fi
note "qemu with $accel"

serial="$work/serial.log"
monitor="$work/monitor.sock"
# Starts the appliance (DISK = its qcow2) with the LAN port on the tap device in $LAN, and
# the extra qemu arguments given.
start_vm() { # DISK [ARGS...]
    local disk=$1; shift
    : >"$serial"
    cp "$OVMF_VARS" "$work/vars.fd"
    # Up before qemu opens it: an up tap shows NO-CARRIER until a program holds it.
    ip -n "$DC" tuntap add dev "$TAP" mode tap
    ip -n "$DC" link set "$TAP" up
    ip netns exec "$DC" qemu-system-x86_64 -name komnet-appliance -machine pc -accel "$accel" -cpu "$cpu" \
        -smp 2 -m 1024 -nodefaults -display none -vga none \
        -drive if=pflash,format=raw,readonly=on,file="$OVMF_CODE" \
        -drive if=pflash,format=raw,file="$work/vars.fd" \
        -drive if=virtio,format=qcow2,file="$disk" \
        -netdev user,id=wan -device virtio-net-pci,netdev=wan,mac=52:54:00:6b:00:01 \
        -netdev tap,id=lan,ifname="$TAP",script=no,downscript=no \
        -device virtio-net-pci,netdev=lan,mac=52:54:00:6b:00:02 \
        -chardev file,id=ser,path="$serial" -serial chardev:ser \
        -monitor unix:"$monitor",server,nowait "$@" >"$work/qemu.log" 2>&1 &
    QEMU_PID=$!
    VM_START=$(date +%s.%N)
    # When each console line appeared, seconds after power-on (printed after step 1).
    (
        seen=0
        while kill -0 "$QEMU_PID" 2>/dev/null; do
            n=$(tr -d '\r' <"$serial" | grep -ac 'komnet: ' || true)
            if [ "$n" -gt "$seen" ]; then
                now=$(date +%s.%N)
                tr -d '\r' <"$serial" | grep -ao 'komnet: .*' | tail -n +"$(( seen + 1 ))" | head -n "$(( n - seen ))" \
                    | while read -r l; do printf '%6.1f s  %s\n' "$(python3 -c "print($now - $VM_START)")" "$l"; done
                seen=$n
            fi
            sleep 0.5
        done
    ) >"$work/timeline-$(basename "$disk" .qcow2).log" 2>/dev/null &
    # Once qemu holds the tap device it has carrier; then it moves to the town hall.
    local i held=false
    for i in $(seq 200); do
        if ip -n "$DC" link show "$TAP" | grep -q 'LOWER_UP'; then held=true; break; fi
        kill -0 "$QEMU_PID" 2>/dev/null || { cat "$work/qemu.log" >&2; fail "qemu did not start"; }
        sleep 0.1
    done
    $held || fail "qemu did not take the tap device $TAP within 20 s"
    ip -n "$DC" link set "$TAP" netns "$SW"
    ip -n "$SW" link set "$TAP" up promisc on
    local switch_log
    switch_log="$work/switch-$(basename "$disk" .qcow2).log"
    ip netns exec "$SW" python3 -u packaging/test-vlan-switch.py "$TAP" 10=sw10 100=sw100 >"$switch_log" 2>&1 &
    SWITCH_PID=$!
    for i in $(seq 50); do grep -q '^ready' "$switch_log" && break; sleep 0.1; done
    grep -q '^ready' "$switch_log" || fail "the switch did not start: $(cat "$switch_log")"
}
# Presses the power button (ACPI) and waits for the appliance to shut down, as unplugging it
# the hard way could lose what it wrote last.
stop_vm() {
    [ -n "$QEMU_PID" ] || return 0
    monitor_cmd system_powerdown || true
    for _ in $(seq 240); do kill -0 "$QEMU_PID" 2>/dev/null || break; sleep 0.5; done
    if kill -0 "$QEMU_PID" 2>/dev/null; then
        echo "test-image.sh: the appliance did not power off within 120 s; pulling the plug" >&2
        monitor_cmd quit || true
        sleep 1
    fi
    kill -9 "$QEMU_PID" 2>/dev/null || true
    wait "$QEMU_PID" 2>/dev/null || true
    QEMU_PID=""
    if [ -n "$SWITCH_PID" ]; then
        kill "$SWITCH_PID" 2>/dev/null || true
        wait "$SWITCH_PID" 2>/dev/null || true
        SWITCH_PID=""
    fi
    ip -n "$SW" link del "$TAP" 2>/dev/null || true
}
# qemu runs and its guest was not stopped by a KVM internal error (qemu stays up then).
vm_alive() {
    kill -0 "$QEMU_PID" 2>/dev/null || return 1
    ! grep -q "KVM internal error" "$work/qemu.log" 2>/dev/null
}
monitor_cmd() {
    python3 - "$monitor" "$*" <<'PY'
import socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.settimeout(2)
time.sleep(0.2)
try:
    s.recv(4096)
except OSError:
    pass
s.sendall(sys.argv[2].encode() + b"\n")
time.sleep(0.5)
try:
    out = s.recv(4096).decode(errors="replace")
except OSError:
    out = ""
s.close()
# The monitor echoes the command with terminal escapes; what follows is its answer.
import re
answer = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", out).split(sys.argv[2])[-1]
if re.search(r"(?m)^\s*(Error|Could not|Duplicate)", answer):
    print("qemu monitor: " + answer.strip(), file=sys.stderr)
    sys.exit(1)
PY
}
plug() { # ID FILE
    monitor_cmd "drive_add 0 if=none,id=$1,format=raw,readonly=on,file=$2"
    monitor_cmd "device_add virtio-blk-pci,drive=$1,id=$1"
}
unplug() { monitor_cmd "device_del $1"; }

# The console lines (komnet: ...) seen so far; waits for one matching a pattern, counting
# only lines after MARK (a line count) so that a line of an earlier boot does not count.
console() { tr -d '\r' <"$serial" | grep -ao 'komnet: .*' || true; }
mark() { console | wc -l; }
# Boots under TCG on a loaded machine take several times the quiet figure (43 s to the first
# packet, docs/benchmarks.md §10): the later waits grow with what the first boot took.
WAIT_SCALE=1
wait_console() { # MARK SECONDS REGEX
    local from=$1 re=$3
    local secs=$(( $2 * WAIT_SCALE ))
    local deadline=$(( $(date +%s) + secs ))
    while [ "$(date +%s)" -lt "$deadline" ]; do
        if console | tail -n +"$(( from + 1 ))" | grep -qE -- "$re"; then
            console | tail -n +"$(( from + 1 ))" | grep -E -- "$re" | head -n 1
            return 0
        fi
        vm_alive || fail "qemu exited or its guest stopped while waiting for '$re': $(head -n 2 "$work/qemu.log")"
        sleep 0.5
    done
    fail "no console line matching '$re' within ${secs}s"
}
probe_dms() { # TIMEOUT_MS -> pass|blocked
    ip netns exec "$LAN" "$bin/netprobe" probe --timeout-ms "$1" tcp,10.30.1.50,10.0.1.10,443
}
# A PC asks the appliance for its address (busybox udhcpc, a few tries): the address and a
# default route via the router it is given; what the server said goes to LOG.
cat >"$work/udhcpc-event.sh" <<'SCRIPT'
#!/bin/sh
case "$1" in
bound|renew)
    ip addr flush dev "$interface" scope global
    ip addr add "$ip/$mask" dev "$interface"
    [ -n "$router" ] && ip route replace default via "${router%% *}" dev "$interface"
    echo "lease $ip/$mask router $router dns ${dns:-none} lease ${lease}s" >>"$KOMNET_LEASE_LOG"
    ;;
esac
SCRIPT
chmod 0755 "$work/udhcpc-event.sh"
dhcp_lease() { # NETNS LOG
    ip netns exec "$1" env KOMNET_LEASE_LOG="$2" udhcpc -i eth0 -n -q -f -t 3 -T 2 -A 1 \
        -s "$work/udhcpc-event.sh" >>"$2.udhcpc" 2>&1
}
has_address() { # NETNS
    ip -n "$1" -4 -o addr show dev eth0 scope global | grep -q inet
}
wait_traffic() { # SECONDS
    local deadline=$(( $(date +%s) + $1 ))
    while [ "$(date +%s)" -lt "$deadline" ]; do
        # The staff PC has no address until the appliance's DHCP server answers on VLAN 10.
        has_address "$LAN" || dhcp_lease "$LAN" "$work/staff-lease.log" || true
        [ "$(probe_dms 1000 2>/dev/null)" = pass ] && return 0
        vm_alive || fail "qemu exited or its guest stopped while waiting for traffic: $(head -n 2 "$work/qemu.log")"
        sleep 0.5
    done
    fail "the town hall PC did not reach the DMS through the tunnel within ${1}s"
}

# ---- 1. zero-touch first boot --------------------------------------------------------------
note "1. first boot with the bootstrap stick"
qemu-img create -q -f qcow2 -F qcow2 -b "$out/komnet-appliance-1.qcow2" "$work/appliance.qcow2"
start_vm "$work/appliance.qcow2" -drive if=virtio,format=raw,readonly=on,file="$work/stick-nohfelden.img"
wait_traffic ${KOMNET_FIRST_PACKET_TIMEOUT:-300}
first_packet=$(python3 -c "print(round($(date +%s.%N) - $VM_START, 1))")
note "power-on to first packet through the tunnel: ${first_packet} s ($accel); console timeline:"
WAIT_SCALE=$(python3 -c "import math; print(max(1, math.ceil($first_packet / 50)))")
[ "$WAIT_SCALE" -gt 1 ] && note "this machine boots ${WAIT_SCALE}x slower than a quiet one: later waits are ${WAIT_SCALE}x longer"
cut -c1-150 "$work/timeline-appliance.log"
wait_console 0 30 '^komnet: bootstrap file copied from USB stick KOMNET' >/dev/null
wait_console 0 30 '^komnet: running: nohfelden/rathaus, policy version 1, .*hub hub1.*LAN .*10\.30\.1\.1/24'
dcx "$bin/komnet" status | grep -q nohfelden || fail "the hub does not list the appliance"
# The staff PC's address came by DHCP over VLAN 10: its reservation, the appliance as router.
grep -q '^lease 10.30.1.50/24 router 10.30.1.1 ' "$work/staff-lease.log" \
    || fail "the staff PC's lease: $(cat "$work/staff-lease.log" 2>/dev/null || echo none)"
note "the staff PC got '$(head -n 1 "$work/staff-lease.log")' by DHCP on VLAN 10"
# A PC on the guest VLAN: a guest address, and the DMS out of reach; with a staff address it
# chose itself (the spoofing guest), too.
dhcp_lease "$GUEST" "$work/guest-lease.log" \
    || fail "no DHCP lease on the guest VLAN: $(cat "$work/guest-lease.log.udhcpc" 2>/dev/null)"
guest_addr=$(sed -n 's|^lease \(10\.30\.100\.[0-9]*\)/24 router 10\.30\.100\.1 .*|\1|p' "$work/guest-lease.log" | head -n 1)
[ -n "$guest_addr" ] || fail "the guest PC's lease is not from the guest range: $(cat "$work/guest-lease.log")"
probe_guest() { # SRC
    ip netns exec "$GUEST" "$bin/netprobe" probe --timeout-ms 1500 "tcp,$1,10.0.1.10,443"
}
[ "$(probe_guest "$guest_addr")" = blocked ] || fail "the guest PC ($guest_addr, VLAN 100) reached the DMS"
ip -n "$GUEST" addr add 10.30.1.77/24 dev eth0
[ "$(probe_guest 10.30.1.77)" = blocked ] || fail "a guest PC with the staff address 10.30.1.77 on VLAN 100 reached the DMS"
ip -n "$GUEST" addr del 10.30.1.77/24 dev eth0
[ "$(probe_dms 1500)" = pass ] || fail "the staff PC lost the DMS"
note "VLAN 100: guest lease $guest_addr, DMS blocked, also for the spoofed staff address 10.30.1.77"

# ---- 2. a broken update is rolled back ----------------------------------------------------
note "2. update stick with the broken version 2"
m=$(mark)
plug upd "$out/komnet-update-2.stick"
wait_console "$m" 420 '^komnet: update: version floor raised to 2'
wait_console "$m" 60 '^komnet: update: version 2 is in slot b'
wait_console "$m" 240 '^komnet: version 2 \(slot b\) is on probation'
wait_console "$m" 240 '^komnet: version 2 \(slot b\) failed its health check: komnet-gateway failed'
wait_console "$m" 600 '^komnet: update rolled back: slot b: version 2, failed'
wait_console "$m" 60 '^komnet: update refused: version 2 failed its health check in slot b before'
wait_console "$m" 120 '^komnet: running: nohfelden/rathaus'
wait_traffic 120
console | tail -n +"$(( m + 1 ))" | grep -c '^komnet: komnet appliance, version 2 (slot b)' >"$work/tries"
[ "$(cat "$work/tries")" = 2 ] || fail "version 2 was tried $(cat "$work/tries") times, expected 2"
note "rolled back to version 1 after 2 failed tries; the stick left in is not installed again"
m=$(mark)
plug old "$out/komnet-update-1.stick"
wait_console "$m" 120 "^komnet: update refused: version 1 is below this appliance's version floor 2"
note "the signed version 1 is refused below the floor version 2 raised"
stop_vm
# The DHCP leases are on the data partition: they survive reboots and updates.
qemu-img convert -O raw "$work/appliance.qcow2" "$work/appliance.raw"
read -r data_start data_size < <(sfdisk --json "$work/appliance.raw" | python3 -c '
import json, sys
for p in json.load(sys.stdin)["partitiontable"]["partitions"]:
    if p.get("name") == "komnet-data":
        print(p["start"], p["size"])')
dd if="$work/appliance.raw" of="$work/data1.img" bs=512 skip="$data_start" count="$data_size" status=none
leases=$(debugfs -R 'cat /dhcp/leases' "$work/data1.img" 2>/dev/null || true)
grep -q "$STAFF_MAC 10.30.1.50 pc-verwaltung" <<<"$leases" \
    || fail "the staff PC's lease is not on the data partition (/dhcp/leases: ${leases:-empty})"
note "the staff PC's lease is on the data partition: $(grep "$STAFF_MAC" <<<"$leases")"
rm -f "$work/appliance.raw" "$work/data1.img"

# ---- 3. no stick, then a spent token --------------------------------------------------------
note "3. a new appliance: no stick, then a stick with a spent token"
qemu-img create -q -f qcow2 -F qcow2 -b "$out/komnet-appliance-1.qcow2" "$work/appliance2.qcow2"
start_vm "$work/appliance2.qcow2"
wait_console 0 240 '^komnet: waiting for a bootstrap file at /var/lib/komnet/bootstrap.json'
plug foreign "$work/stick-foreign.img"
wait_console 0 120 "^komnet: update refused: the signature of USB stick .* is not the release key's"
plug unsigned "$work/stick-unsigned.img"
wait_console 0 120 '^komnet: update refused: USB stick .* has no signature'
plug stick "$work/stick-nohfelden.img"
wait_console 0 60 '^komnet: bootstrap file copied from USB stick KOMNET'
wait_console 0 60 '^komnet: enrollment refused: .*waiting for a new bootstrap file'
[ "$(probe_dms 1000 || true)" != pass ] || fail "a refused appliance passed traffic"
stop_vm
# What the refused enrollment left on the data partition.
qemu-img convert -O raw "$work/appliance2.qcow2" "$work/appliance2.raw"
read -r data_start data_size < <(sfdisk --json "$work/appliance2.raw" | python3 -c '
import json, sys
for p in json.load(sys.stdin)["partitiontable"]["partitions"]:
    if p.get("name") == "komnet-data":
        print(p["start"], p["size"])')
dd if="$work/appliance2.raw" of="$work/data2.img" bs=512 skip="$data_start" count="$data_size" status=none
listing=$(debugfs -R 'ls -p /' "$work/data2.img" 2>/dev/null | cut -d/ -f6 | grep -v '^$' | sort | tr '\n' ' ')
echo "data partition after the refusal: $listing"
for f in wg.key enrollment.json policy.pub bootstrap.json; do
    case " $listing " in *" $f "*) fail "the refused enrollment left $f behind" ;; esac
done
case " $listing " in *" bootstrap.json.refused "*) ;; *) fail "the refused bootstrap file was not kept as bootstrap.json.refused" ;; esac
# The attacker's sticks wrote nothing: slot b is as empty as the image left it, and the ESP
# holds slot a's boot entry only.
read -r b_start b_size < <(sfdisk --json "$work/appliance2.raw" | python3 -c '
import json, sys
for p in json.load(sys.stdin)["partitiontable"]["partitions"]:
    if p.get("name") == "komnet-b":
        print(p["start"], p["size"])')
dd if="$work/appliance2.raw" bs=512 skip="$b_start" count="$b_size" status=none | cmp -s - <(head -c $(( b_size * 512 )) /dev/zero) \
    || fail "slot b was written although every update stick was refused"
entries=$(MTOOLS_SKIP_CHECK=1 mdir -b -i "$work/appliance2.raw@@1M" ::/loader/entries | sed 's|.*/||' | sort | tr '\n' ' ')
[ "$entries" = "komnet-a.conf " ] || fail "boot entries after the refused updates: $entries (expected komnet-a.conf only)"
note "the refused update sticks left slot b empty and the boot entries as they were"
rm -f "$work/appliance2.raw" "$work/data2.img"

# ---- 4. nftables.service restarted on a running appliance ---------------------------------
. packaging/test-image-nftables.sh

note "all image tests passed (first packet after ${first_packet} s under $accel)"
