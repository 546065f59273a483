# test-image-nftables.sh — step 4 of packaging/test-image.sh (sourced by it, not run alone):
# `systemctl restart nftables` on a running appliance must not open it (issue 14, part 5).
#
# The product image has no way to run a command from outside (no login, no SSH, no agent), and
# must not get one. So this step builds its own copy of image version 1 with one test-only
# addition: a udev rule and a unit that, when a stick labelled KOMNET-TRST appears, restart
# nftables.service five times and stop and start it once, saying each step on the console. The
# host plugs that stick through qemu's monitor, exactly as it plugs update sticks, and meanwhile
# the town-hall PC sends a continuous stream (one datagram every 5 ms) towards the WAN side:
# 10.0.2.2, qemu's user-mode network, which hands what the appliance forwards out of its WAN port
# to a listener in the data-centre namespace. Through the tunnel the same address is the hub's
# namespace, where the policy allows nothing to it. Not one datagram may arrive, at any moment.
# A control at the end opens the firewall on purpose (a stick labelled KOMNET-TOPN: the gateway
# stopped, the ruleset flushed, the fence's rules removed) and the same stream must then arrive:
# the probe sees an open appliance, so its silence before means closed.
#
# Uses what test-image.sh defines: $work $out $bin $target_dir $DC $LAN, keys, note, fail,
# start_vm, stop_vm, plug, console, mark, wait_console, wait_traffic, make_stick, admin.

note "4. systemctl restart nftables on a running appliance (a test copy of image 1)"
nft_overlay="$work/nftables-test-overlay"
mkdir -p "$nft_overlay/etc/udev/rules.d" "$nft_overlay/etc/systemd/system" "$nft_overlay/usr/lib/komnet"
cat >"$nft_overlay/etc/udev/rules.d/91-komnet-test-nftables.rules" <<'EOF'
# TEST ONLY (packaging/test-image-nftables.sh adds this to its own copy of the image).
ACTION=="add", SUBSYSTEM=="block", ENV{ID_FS_TYPE}=="vfat", ENV{ID_FS_LABEL}=="KOMNET-TRST", TAG+="systemd", ENV{SYSTEMD_WANTS}+="komnet-test-nftables@restart.service"
ACTION=="add", SUBSYSTEM=="block", ENV{ID_FS_TYPE}=="vfat", ENV{ID_FS_LABEL}=="KOMNET-TOPN", TAG+="systemd", ENV{SYSTEMD_WANTS}+="komnet-test-nftables@open.service"
EOF
cat >"$nft_overlay/etc/systemd/system/komnet-test-nftables@.service" <<'EOF'
# TEST ONLY (packaging/test-image-nftables.sh adds this to its own copy of the image).
[Unit]
Description=TEST ONLY: nftables %i on a running appliance
[Service]
Type=oneshot
ExecStart=/usr/lib/komnet/test-nftables %i
EOF
cat >"$nft_overlay/usr/lib/komnet/test-nftables" <<'EOF'
#!/bin/bash
# TEST ONLY (packaging/test-image-nftables.sh adds this to its own copy of the image).
set -u
. /usr/lib/komnet/appliance.sh
table() { nft list table inet komnet >/dev/null 2>&1 && echo present || echo missing; }
reinstalled() { komnet status --json 2>/dev/null | jq -r '.counters.nft_reinstalled // 0'; }
case "$1" in
restart)
    say "test: nftables restart begins: komnet table $(table), reinstalled $(reinstalled)"
    for i in 1 2 3 4 5; do
        systemctl restart nftables.service
        say "test: nftables restarted ($i of 5): komnet table $(table)"
        sleep 2
    done
    systemctl stop nftables.service
    say "test: nftables stopped: komnet table $(table)"
    sleep 2
    systemctl start nftables.service
    say "test: nftables started: komnet table $(table)"
    sleep 2
    say "test: nftables restart done: komnet table $(table), reinstalled $(reinstalled)"
    ;;
open)
    systemctl stop komnet-gateway.service
    nft flush ruleset
    for fam in -4 -6; do
        for p in $(ip "$fam" rule show | sed -n 's/^\(20[0-9][0-9][0-9]\):.*/\1/p'); do
            ip "$fam" rule del priority "$p"
        done
    done
    say "test: firewall opened on purpose (gateway stopped, ruleset flushed, fence removed)"
    ;;
esac
EOF
chmod 0755 "$nft_overlay/usr/lib/komnet/test-nftables"
packaging/image/build-image.sh "${keys[@]}" --version 1 --allow-drift --out "$work/images-nftables" \
    --debs "$target_dir/debian" --overlay "$nft_overlay" >"$work/build-nftables.log" 2>&1 \
    || { tail -30 "$work/build-nftables.log" >&2; fail "building the test copy of image 1"; }
for label in KOMNET-TRST KOMNET-TOPN; do
    rm -f "$work/stick-$label.img"
    mkfs.vfat -n "$label" -C "$work/stick-$label.img" 1024 >/dev/null
done

# A replacement appliance for the same town hall: a new token, the test copy, its first boot.
admin token create --tenant nohfelden --site rathaus --role spoke --out "$work/nohfelden-2.bootstrap.json" >/dev/null
make_stick "$work/stick-nohfelden-2.img" "$work/nohfelden-2.bootstrap.json"
qemu-img create -q -f qcow2 -F qcow2 -b "$work/images-nftables/komnet-appliance-1.qcow2" "$work/appliance3.qcow2"
start_vm "$work/appliance3.qcow2" -drive if=virtio,format=raw,readonly=on,file="$work/stick-nohfelden-2.img"
wait_traffic $(( 300 * WAIT_SCALE ))
wait_console 0 60 '^komnet: running: nohfelden/rathaus, policy version 1' >/dev/null

# The listener in the data centre: every datagram that reaches 10.0.2.2:9998 (qemu's user-mode
# network delivers the WAN side's from 127.0.0.1; the hub would from the PC's own address).
ip netns exec "$DC" python3 -u -c '
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 9998))
while True:
    data, peer = s.recvfrom(2048)
    print("%.3f %s %s" % (time.time(), peer[0], data.decode(errors="replace")), flush=True)
' >"$work/wan-listener.log" 2>&1 &
listener=$!
# The town-hall PC's stream: one numbered datagram every 5 ms until stopped.
send_stream() { # LOG
    ip netns exec "$LAN" python3 -u -c '
import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("10.30.1.50", 0))
n = 0
while True:
    n += 1
    try:
        s.sendto(b"probe %d" % n, ("10.0.2.2", 9998))
    except OSError:
        pass
    if n % 200 == 0:
        print(n, flush=True)
    time.sleep(0.005)
' >"$1" 2>&1 &
    STREAM=$!
}
send_stream "$work/lan-stream.log"
sleep 2
m=$(mark)
plug trst "$work/stick-KOMNET-TRST.img"
wait_console "$m" 60 '^komnet: test: nftables restart begins'
wait_console "$m" 120 '^komnet: test: nftables restart done'
sleep 2
kill "$STREAM" 2>/dev/null || true
wait "$STREAM" 2>/dev/null || true
sent=$(tail -n 1 "$work/lan-stream.log")
console | tail -n +"$(( m + 1 ))" | grep '^komnet: test: ' | sed 's/^/    /'
arrived=$(wc -l <"$work/wan-listener.log")
[ "${sent:-0}" -ge 1000 ] || fail "the town-hall PC's stream did not run (${sent:-no} datagrams sent)"
if [ "$arrived" != 0 ]; then
    head -n 5 "$work/wan-listener.log" >&2
    fail "$arrived of about $sent datagrams from the LAN reached the WAN side while nftables.service restarted"
fi
wait_traffic 60
note "nftables.service restarted 5 times and stopped/started once: 0 of about $sent datagrams from the LAN reached the WAN side; the DMS is reachable again"

# The control: the same probe against an appliance whose firewall is open.
m=$(mark)
plug topn "$work/stick-KOMNET-TOPN.img"
wait_console "$m" 60 '^komnet: test: firewall opened on purpose'
send_stream "$work/lan-stream-open.log"
sleep 3
kill "$STREAM" 2>/dev/null || true
wait "$STREAM" 2>/dev/null || true
arrived=$(wc -l <"$work/wan-listener.log")
kill "$listener" 2>/dev/null || true
[ "$arrived" -gt 0 ] || fail "control: with the firewall opened on purpose no datagram reached the WAN side, so the probe above could not have seen a leak"
note "control: with the firewall opened on purpose, $arrived datagrams reached the WAN side (from $(awk '{print $2}' "$work/wan-listener.log" | sort -u | tr '\n' ' '))"
stop_vm
