#!/usr/bin/env bash
# flood.sh — the handshake flood of issue 14, against komnet-gateway and wireguard-go
# 0.0.20231211 in the same run.
#
# Someone with one compromised peer's configuration floods the hub with valid handshake
# initiations (real ones, made with that peer's key: the hub does the Diffie-Hellman work for
# every one it admits) from one address, or spread over 1,000 sources (addresses and ports) of
# one /24. Meanwhile
#   - a peer that was connected before keeps pinging through its session (loss is reported),
#   - two seconds into the flood, a legitimate peer from another address starts a NEW handshake
#     (Debian's stock wireguard-go, pinging every 50 ms); time to its first reply is measured,
#     a run succeeds when that is at most 1 s.
# Reported per daemon and scenario: runs, successes, time to first reply (each run), the
# daemon's CPU during the flood, datagrams the hub sent back to the attacker, the flood rate the
# generator reached, the datagrams per second the hub's kernel delivered to the daemon's socket
# and those it dropped because the socket's queue was full, the established peer's ping loss,
# and the daemon's busiest thread with its CPU (is one thread, the receive thread, the limit?).
#
# Usage: sudo benches/flood.sh [target/release/komnet-gateway]
#   RUNS=3 SECONDS_FLOOD=8 RATE=0 (0: as fast as the generator goes) THREADS=1 GSO=1
#   SCENARIOS="1 1000" (sources) DAEMONS="komnet wggo2023"
#   BASE=<another komnet-gateway binary>: runs it too, as daemon "baseline" (e.g. a build before
#   a change, measured in the same run)
# Needs: target/release/komnet-flood (cargo build --release -p komnet-flood), wg, ping, and
# wireguard-go 0.0.20231211, which scripts/wireguard-go-2023.sh fetches on first use.
# Namespaces, veths and processes are removed on exit, also on failure.
cd "$(dirname "$0")/.." || exit 1
. benches/lib.sh
BIN=$(readlink -f "${1:-target/release/komnet-gateway}")
FLOOD=$(readlink -f "${KOMNET_FLOOD:-target/release/komnet-flood}")
[ -x "$BIN" ] || bdie "no $BIN: cargo build --release -p komnet-gateway"
[ -x "$FLOOD" ] || bdie "no $FLOOD: cargo build --release -p komnet-flood"
RUNS=${RUNS:-3}; SECONDS_FLOOD=${SECONDS_FLOOD:-8}; RATE=${RATE:-0}
THREADS=${THREADS:-1}; GSO=${GSO:-1}
SCENARIOS=${SCENARIOS:-"1 1000"}
BASE=${BASE:-}
if [ -n "$BASE" ]; then
    BASE=$(readlink -f "$BASE"); [ -x "$BASE" ] || bdie "BASE=$BASE is not executable"
    DAEMONS=${DAEMONS:-"komnet baseline wggo2023"}
else
    DAEMONS=${DAEMONS:-"komnet wggo2023"}
fi
LEGIT=$(command -v wireguard-go) || bdie "Debian's wireguard-go (the legitimate peer) missing: scripts/setup.sh bench"
bench_require
REF=$(wggo_2023)

ID=$BENCH_ID
NS_HUB=kfh-$ID; NS_NEW=kfn-$ID; NS_OLD=kfo-$ID; NS_ATK=kfa-$ID
flood_cleanup() {
    netns_cleanup
    rm -f /run/wireguard/kf[hno]"$ID".sock
}
trap flood_cleanup EXIT

# Underlay: the hub has one veth per other namespace; the attacker's /24 (10.99.0.0/24) is
# local to its namespace and routed to it from the hub.
setup() {
    flood_cleanup
    netns_add "$NS_HUB" "$NS_NEW" "$NS_OLD" "$NS_ATK" || bdie "ip netns add"
    local i=1 peer
    for peer in "$NS_NEW" "$NS_OLD" "$NS_ATK"; do
        netns_veth "$NS_HUB" "h$i" "10.240.$i.1/24" "$peer" eth0 "10.240.$i.2/24" || bdie "veth"
        ip -n "$peer" route add default via "10.240.$i.1"
        i=$((i + 1))
    done
    ip -n "$NS_ATK" route add local 10.99.0.0/24 dev lo
    ip -n "$NS_HUB" route add 10.99.0.0/24 via 10.240.3.2
}

# start_wg NS IFNAME BIN: a userspace WireGuard daemon in NS, waiting for its UAPI socket;
# NETNS_LAST_PID is its PID.
start_wg() { netns_wg_start "$@" || bdie "$3 did not create its UAPI socket in $1"; }

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
# thread_ticks PID: "TID NAME TICKS" for each thread of PID (utime + stime).
thread_ticks() {
    local t comm rest
    for t in /proc/"$1"/task/*; do
        comm=$(tr ' ' _ <"$t/comm" 2>/dev/null) || continue
        rest=$(sed 's/.*) //' "$t/stat" 2>/dev/null) || continue
        echo "${t##*/} $comm $(awk '{print $12 + $13}' <<<"$rest")"
    done
}
# busiest_thread BEFORE AFTER SECONDS: "NAME:CPU%" of the thread that used most CPU between the
# two thread_ticks listings (the receive thread, under a flood): whether one thread is the limit.
busiest_thread() {
    local hz; hz=$(getconf CLK_TCK)
    awk -v hz="$hz" -v s="$3" 'NR == FNR { t0[$1] = $3; next }
        { d = $3 - t0[$1]; if (d > best) { best = d; name = $2 } }
        END { printf "%s:%.0f", (name == "" ? "-" : name), 100 * best / hz / s }' <(echo "$1") <(echo "$2")
}
# udp_counter NS FIELD: a field of the Udp line of /proc/net/snmp in NS (InDatagrams: datagrams
# the kernel delivered to sockets; RcvbufErrors: dropped because a socket's queue was full).
udp_counter() {
    ip netns exec "$1" awk -v f="$2" '/^Udp:/ { if (!n) { for (i = 1; i <= NF; i++) col[$i] = i; n = 1 } else print $col[f] }' /proc/net/snmp
}
rx_packets() { ip -n "$1" -s -j link show "$2" | sed -n 's/.*"rx":{[^}]*"packets":\([0-9]*\).*/\1/p'; }

# run_once DAEMON_BIN SOURCES: one flood run; sets RESULT to "first_ms cpu% to_attacker rate
# loss%". (Not in a subshell: the processes it starts must stay tracked for cleanup.)
run_once() {
    local bin=$1 sources=$2
    setup
    local kh kn ko ka
    kh=$(wg genkey); kn=$(wg genkey); ko=$(wg genkey); ka=$(wg genkey)
    local ph pn po pa
    ph=$(wg pubkey <<<"$kh"); pn=$(wg pubkey <<<"$kn"); po=$(wg pubkey <<<"$ko"); pa=$(wg pubkey <<<"$ka")
    start_wg "$NS_HUB" "kfh$ID" "$bin"; local hub_pid=$NETNS_LAST_PID
    # The hub knows all three peers; the attacker's key is a configured peer (compromised).
    ip netns exec "$NS_HUB" wg set "kfh$ID" private-key <(echo "$kh") listen-port 51820 \
        peer "$pn" allowed-ips 10.241.0.2/32 \
        peer "$po" allowed-ips 10.241.0.3/32 \
        peer "$pa" allowed-ips 10.241.0.4/32 || bdie "wg set hub"
    ip -n "$NS_HUB" addr add 10.241.0.1/24 dev "kfh$ID"; ip -n "$NS_HUB" link set "kfh$ID" mtu 1420 up
    local ns ifn key addr
    for ns in new old; do
        if [ $ns = new ]; then ifn=kfn$ID; key=$kn; addr=10.241.0.2; n=1; nsn=$NS_NEW
        else ifn=kfo$ID; key=$ko; addr=10.241.0.3; n=2; nsn=$NS_OLD; fi
        start_wg "$nsn" "$ifn" "$LEGIT"
        ip netns exec "$nsn" wg set "$ifn" private-key <(echo "$key") \
            peer "$ph" endpoint "10.240.$n.1:51820" allowed-ips 10.241.0.1/32 persistent-keepalive 0 || bdie "wg set $ns"
        ip -n "$nsn" addr add "$addr/24" dev "$ifn"; ip -n "$nsn" link set "$ifn" mtu 1420 up
    done
    # The established session, before the flood.
    ip netns exec "$NS_OLD" ping -c 2 -i 0.2 -W 2 10.241.0.1 >/dev/null || bdie "no session for the established peer"

    local ticks0 rx0 hz
    hz=$(getconf CLK_TCK)
    rx0=$(rx_packets "$NS_ATK" eth0)
    ticks0=$(cpu_ticks "$hub_pid")
    local threads0; threads0=$(thread_ticks "$hub_pid")
    local in0 qdrop0
    in0=$(udp_counter "$NS_HUB" InDatagrams); qdrop0=$(udp_counter "$NS_HUB" RcvbufErrors)
    local out; out=$(mktemp)
    local src_args=(--source 10.99.0.1 --port 40000)
    [ "$sources" -gt 1 ] && src_args+=(--sources "$sources")
    ip netns exec "$NS_ATK" "$FLOOD" --target 10.240.3.1:51820 --hub-key "$ph" \
        --peer-key "$(echo "$ka" | tr -d '\n')" --duration "$SECONDS_FLOOD" --rate "$RATE" \
        --threads "$THREADS" --gso "$GSO" --precompute 4096 "${src_args[@]}" >"$out" 2>&1 &
    local flood_pid=$!; netns_track_pid "$flood_pid"
    # The established peer pings every 100 ms through the whole flood.
    local old_out; old_out=$(mktemp)
    ip netns exec "$NS_OLD" ping -n -q -i 0.1 -w "$SECONDS_FLOOD" -W 1 10.241.0.1 >"$old_out" 2>&1 &
    local old_pid=$!; netns_track_pid "$old_pid"
    sleep 2
    # The new peer: its first packet starts its first handshake.
    local t0 t1 first
    t0=$(date +%s%N)
    if ip netns exec "$NS_NEW" ping -n -c 1 -i 0.05 -w 5 10.241.0.1 >/dev/null 2>&1; then
        t1=$(date +%s%N); first=$(( (t1 - t0) / 1000000 ))
    else
        first=-1
    fi
    wait "$flood_pid" 2>/dev/null; wait "$old_pid" 2>/dev/null
    local ticks1 rx1
    ticks1=$(cpu_ticks "$hub_pid")
    local busiest; busiest=$(busiest_thread "$threads0" "$(thread_ticks "$hub_pid")" "$SECONDS_FLOOD")
    rx1=$(rx_packets "$NS_ATK" eth0)
    local in1 qdrop1
    in1=$(udp_counter "$NS_HUB" InDatagrams); qdrop1=$(udp_counter "$NS_HUB" RcvbufErrors)
    local cpu rate loss
    cpu=$(awk -v t=$((ticks1 - ticks0)) -v hz="$hz" -v s="$SECONDS_FLOOD" 'BEGIN{printf "%.0f", 100 * t / hz / s}')
    rate=$(sed -n 's/.*"rate":\([0-9]*\).*/\1/p' "$out")
    [ -n "$rate" ] || bdie "the flood generator failed: $(cat "$out")"
    loss=$(sed -n 's/.* \([0-9.]*\)% packet loss.*/\1/p' "$old_out")
    rm -f "$out" "$old_out"
    local delivered
    delivered=$(awk -v d=$((in1 - in0)) -v s="$SECONDS_FLOOD" 'BEGIN{printf "%.0f", d / s}')
    RESULT="$first $cpu $((rx1 - rx0)) $rate ${loss:-?} $delivered $((qdrop1 - qdrop0)) $busiest"
}

blog "flood ${SECONDS_FLOOD}s per run, rate ${RATE} (0: max), threads ${THREADS}, gso ${GSO}, runs ${RUNS}"
printf '%-18s %-8s %-5s %-8s %-22s %-10s %-14s %-16s %-16s %-14s %-20s %s\n' daemon sources runs success "first reply ms" "cpu %" "to attacker" "sent /s" "delivered /s" "queue drops" "established loss %" "busiest thread %"
for sources in $SCENARIOS; do
    for d in $DAEMONS; do
        case $d in
            komnet) bin=$BIN; name=komnet-gateway ;;
            wggo2023) bin=$REF; name=wireguard-go-2023 ;;
            baseline) [ -n "$BASE" ] || bdie "daemon baseline needs BASE=<binary>"; bin=$BASE; name=baseline ;;
            *) bdie "unknown daemon $d" ;;
        esac
        firsts=(); ok=0; cpus=(); replies=(); rates=(); losses=(); delivs=(); qdrops=(); busy=()
        for r in $(seq "$RUNS"); do
            run_once "$bin" "$sources"
            read -r first cpu rx rate loss deliv qdrop busiest <<<"$RESULT"
            firsts+=("$first"); cpus+=("$cpu"); replies+=("$rx"); rates+=("$rate"); losses+=("$loss")
            delivs+=("$deliv"); qdrops+=("$qdrop"); busy+=("$busiest")
            if [ "$first" -ge 0 ] && [ "$first" -le 1000 ]; then ok=$((ok + 1)); fi
        done
        printf '%-18s %-8s %-5s %-8s %-22s %-10s %-14s %-16s %-16s %-14s %-20s %s\n' "$name" "$sources" "$RUNS" "$ok/$RUNS" \
            "$(IFS=,; echo "${firsts[*]}")" "$(IFS=,; echo "${cpus[*]}")" "$(IFS=,; echo "${replies[*]}")" \
            "$(IFS=,; echo "${rates[*]}")" "$(IFS=,; echo "${delivs[*]}")" "$(IFS=,; echo "${qdrops[*]}")" \
            "$(IFS=,; echo "${losses[*]}")" "$(IFS=,; echo "${busy[*]}")"
    done
done
