#!/usr/bin/env bash
# county.sh — a hub for a whole county (issue 17, part 3): komnet-gateway as a hub with
# thousands of certified home-office peers, next to wireguard-go 0.0.20231211 in the same run.
#
# Everything is real: the enrollment service (komnet-enroll, SQLite) issues every peer's
# home-office identity through its admin API (`komnet-loadgen issue`, the call behind
# `komnet homeoffice issue --public-key`), publishes it in its registry, and the hub
# (`komnet-gateway run`, role hub) admits it from there under a signed policy of ten communes.
# The peers are played by komnet-loadgen (boringtun) in a namespace of their own, each from
# its own UDP port, with real handshakes and traffic. wireguard-go gets the same keys and
# addresses by `wg setconf` (it has no registry).
#
#   gen ns (komnet-loadgen)  ──veth──  hub ns (hub, komnet-enroll)  ──veth──  srv ns (sink 10.0.1.10)
#      10.234.0.2:20000+i               10.234.0.1:51820                       udp/9000, counted, dropped
#
# Measured (STEPS, default all of "rss restart throughput"):
#   rss        for each N in PEERS_LIST: hub RSS with N peers admitted (idle), then after all N
#              handshook at once (time for that too), and the hub's idle CPU over IDLE_SECS (30 s:
#              two reports to the enrollment service fall into it) after it;
#   restart    the hub holding the largest N is restarted (SIGTERM, start) and RESTART_PEERS
#              peers start handshaking at the moment it starts, retrying like WireGuard every
#              5 s: time until all have a session (komnet: registry snapshot over TLS included;
#              wireguard-go: `wg setconf` of the same N peers);
#   throughput ACTIVE peers send UDP (SIZE bytes) through the hub to the sink for DUR seconds:
#              what arrived at the sink, Gbit/s of inner packets.
#
# Usage: sudo benches/county.sh
#   PEERS_LIST="1000 10000" RESTART_PEERS=1000 ACTIVE=100 DUR=10 SIZE=1400 STEPS=... THREADS=2
#   DAEMONS="komnet wggo2023" ADDRESSES=10000 (peers spread over that many source addresses;
#   1: all behind one, as behind a NAT) TRAFFIC_THREADS=1 (generator threads while sending:
#   the hub needs a core of the two) KOMNET_GATEWAY=<another build of komnet-gateway>
# Needs release builds of komnet-gateway, komnet-enroll, komnet (komnet-cli) and komnet-loadgen
#   (cargo build --release --locked -p komnet-gateway -p komnet-enroll -p komnet-cli -p komnet-loadgen),
# ip, wg, nft, python3, and wireguard-go 0.0.20231211 (scripts/wireguard-go-2023.sh fetches it).
# Namespaces, processes and files are removed on exit, also on failure.
cd "$(dirname "$0")/.." || exit 1
. benches/lib.sh
T=${CARGO_TARGET_DIR:-target}/release
GW=$(readlink -f "${KOMNET_GATEWAY:-$T/komnet-gateway}"); ENROLL=$(readlink -f "$T/komnet-enroll")
CLI=$(readlink -f "$T/komnet"); LOADGEN=$(readlink -f "$T/komnet-loadgen")
for b in "$GW" "$ENROLL" "$CLI" "$LOADGEN"; do
    [ -x "$b" ] || bdie "no $b: cargo build --release --locked -p komnet-gateway -p komnet-enroll -p komnet-cli -p komnet-loadgen"
done
PEERS_LIST=${PEERS_LIST:-"1000 10000"}; RESTART_PEERS=${RESTART_PEERS:-1000}
ACTIVE=${ACTIVE:-100}; DUR=${DUR:-10}; SIZE=${SIZE:-1400}; THREADS=${THREADS:-2}
STEPS=${STEPS:-"rss restart throughput"}; DAEMONS=${DAEMONS:-"komnet wggo2023"}
# Source addresses the peers spread over (1: all behind one address, as behind one NAT).
ADDRESSES=${ADDRESSES:-10000}; TRAFFIC_THREADS=${TRAFFIC_THREADS:-1}; HS_TIMEOUT=${HS_TIMEOUT:-90}
MAXN=0; for n in $PEERS_LIST; do [ "$n" -gt "$MAXN" ] && MAXN=$n; done
[ "$RESTART_PEERS" -le "$MAXN" ] && [ "$ACTIVE" -le "$MAXN" ] || bdie "RESTART_PEERS and ACTIVE must not exceed the largest of PEERS_LIST"
bench_require
for c in nft python3; do command -v "$c" >/dev/null || bdie "$c missing"; done
REF=$(wggo_2023)

ID=$BENCH_ID
NS_HUB=kch-$ID; NS_GEN=kcg-$ID; NS_SRV=kcs-$ID
IF_K=kck$ID; IF_W=kcw$ID
HUB_ADDR=10.234.0.1; GEN_ADDR=10.234.0.2; SINK=10.0.1.10; SINK_PORT=9000
METRICS=127.0.0.1:9120
WORK=$(mktemp -d /tmp/komnet-county.XXXXXX)
PEERS_FILE=$WORK/peers.txt
HUB_PID=; ENROLL_PID=

county_cleanup() {
    netns_cleanup
    rm -f "/run/wireguard/$IF_K.sock" "/run/wireguard/$IF_W.sock"
    rm -rf "$WORK"
}
trap county_cleanup EXIT

echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) cores; commit $(git rev-parse --short HEAD 2>/dev/null)"

# ---- the network ---------------------------------------------------------------------------
netns_add "$NS_HUB" "$NS_GEN" "$NS_SRV" || bdie "ip netns add"
netns_veth "$NS_HUB" gen0 "$HUB_ADDR/24" "$NS_GEN" eth0 "$GEN_ADDR/24" || bdie "veth gen"
netns_veth "$NS_HUB" srv0 10.235.0.1/30 "$NS_SRV" eth0 10.235.0.2/30 || bdie "veth srv"
ip -n "$NS_SRV" addr add "$SINK/32" dev eth0
ip -n "$NS_SRV" route add default via 10.235.0.1
ip -n "$NS_HUB" route add "$SINK/32" via 10.235.0.2
ip netns exec "$NS_HUB" sysctl -qw net.ipv4.ip_forward=1
# Each home-office device comes from an address of its own (hubs budget handshakes per source
# address): 10.236.0.0/16 is local in the peers' namespace and routed there from the hub.
ip -n "$NS_GEN" route add local 10.236.0.0/16 dev lo
ip -n "$NS_HUB" route add 10.236.0.0/16 via "$GEN_ADDR"
# The sink drops what arrives (no ICMP back into the tunnel); its interface counts it.
ip netns exec "$NS_SRV" nft -f - <<EOF || bdie "nft in the sink"
table inet sink {
    chain in {
        type filter hook input priority 0; policy accept;
        udp dport $SINK_PORT drop
    }
}
EOF
# Plenty of ports for the peers, and socket buffers that do not drop handshake bursts.
ip netns exec "$NS_GEN" sysctl -qw net.ipv4.ip_local_port_range="40000 60999"

sink_packets() { ip -n "$NS_SRV" -s -j link show eth0 | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["stats64"]["rx"]["packets"])'; }
rss_mib() { awk '/^VmRSS:/{printf "%.1f", $2/1024}' "/proc/$1/status"; }
# utime + stime, and the same of the children it has waited for (the `ip` processes a hub runs
# for its routes count as its own work).
cpu_ticks() { awk '{print $14 + $15 + $16 + $17}' "/proc/$1/stat" 2>/dev/null || echo 0; }
# idle_cpu PID SECS: the process's CPU share (% of one core) over SECS seconds, with its children.
idle_cpu() {
    local t0 t1 hz; hz=$(getconf CLK_TCK); t0=$(cpu_ticks "$1"); sleep "$2"; t1=$(cpu_ticks "$1")
    awk -v t=$((t1 - t0)) -v hz="$hz" -v s="$2" 'BEGIN{printf "%.1f", 100 * t / hz / s}'
}
jfield() { python3 -c "import json,sys; d=json.loads(sys.argv[1]); print(d.get(sys.argv[2]))" "$1" "$2"; }

# ---- the enrollment service and the county's policy ----------------------------------------
TENANTS=()
for i in $(seq -w 1 10); do TENANTS+=("gemeinde-$i"); done
mkdir -p "$WORK/policy/tenants"
{
    echo '[policy]'; echo 'name = "County benchmark (benches/county.sh)"'; echo 'version = 1'
    echo 'kinds = ["staff", "homeoffice"]'; echo 'tunnel = ["10.96.0.0/12"]'
    echo '[tenants.kreis]'; echo 'description = "Kreisverwaltung"'; echo 'datacenter = ["10.0.0.0/20"]'
    n=0
    for t in "${TENANTS[@]}"; do
        echo "[tenants.$t]"; echo "description = \"$t\""
        echo "datacenter = [\"10.1.$n.0/24\"]"; echo "homeoffice = [\"10.$((200 + n)).0.0/20\"]"
        n=$((n + 1))
    done
    echo '[services.sink]'; echo 'description = "The benchmark traffic sink"'; echo 'owner = "kreis"'
    echo "addresses = [\"$SINK\"]"; echo "ports = [\"udp/$SINK_PORT\"]"
    printf 'export = [%s]\n' "$(printf '"%s", ' "${TENANTS[@]}" | sed 's/, $//')"
} >"$WORK/policy/operator.toml"
for t in "${TENANTS[@]}"; do
    printf 'tenant = "%s"\n[segments.homeoffice]\nkind = "homeoffice"\n[[rule]]\nname = "homeoffice-sink"\nfrom = ["homeoffice"]\nto = ["sink"]\n' "$t" \
        >"$WORK/policy/tenants/$t.toml"
done
"$CLI" policy check "$WORK/policy" >/dev/null || bdie "the generated county policy does not check"
"$CLI" policy keygen --out "$WORK/policy.key" >/dev/null || bdie "policy keygen"
"$CLI" policy bundle "$WORK/policy" --key "$WORK/policy.key" --out "$WORK/policy.bundle" >/dev/null || bdie "policy bundle"
"$ENROLL" init --data-dir "$WORK/enroll" --server-name 127.0.0.1 --enroll-url https://127.0.0.1:8443 \
    --hub-endpoint "hub1=$HUB_ADDR:51820" --policy-public-key "$WORK/policy.pub" >/dev/null 2>&1 || bdie "komnet-enroll init"
sed -i "s/^listen = .*/listen = \"127.0.0.1:8443\"/" "$WORK/enroll/enroll.toml"
ip netns exec "$NS_HUB" "$ENROLL" serve --data-dir "$WORK/enroll" >"$WORK/enroll.log" 2>&1 &
ENROLL_PID=$!; netns_track_pid "$ENROLL_PID"
SOCK=$WORK/enroll/admin.sock
for _ in $(seq 150); do [ -S "$SOCK" ] && break; sleep 0.1; done
[ -S "$SOCK" ] || bdie "komnet-enroll did not start: $(tail -5 "$WORK/enroll.log")"
"$CLI" policy-publish "$WORK/policy.bundle" --socket "$SOCK" >/dev/null || bdie "policy-publish"
"$CLI" token create --tenant kreis --site hub1 --role hub --out "$WORK/hub.bootstrap.json" --socket "$SOCK" >/dev/null || bdie "token create"
cat >"$WORK/hub.toml" <<EOF
role = "hub"
data_dir = "$WORK/hub"
policy_public_key = "$WORK/policy.pub"
bootstrap = "$WORK/hub.bootstrap.json"
interface = "$IF_K"
listen_port = 51820
metrics_listen = "$METRICS"
EOF

HUB_STARTS=0
start_komnet() {
    HUB_STARTS=$((HUB_STARTS + 1))
    ip netns exec "$NS_HUB" env RUST_LOG=info "$GW" run --config "$WORK/hub.toml" >"$WORK/hub-$HUB_STARTS.log" 2>&1 &
    HUB_PID=$!; netns_track_pid "$HUB_PID"
}
stop_pid() { kill "$1" 2>/dev/null; for _ in $(seq 100); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.05; done; kill -9 "$1" 2>/dev/null; }
hub_status() { ip netns exec "$NS_HUB" "$CLI" status --json --gateway "$METRICS" 2>/dev/null; }
# komnet_counts: "ADMITTED HANDSHAKEN" (peers in the hub's table, those with a handshake).
komnet_counts() {
    hub_status | python3 -c '
import json, sys
try:
    s = json.load(sys.stdin)
except Exception:
    print("0 0"); sys.exit()
p = s.get("peers") or []
print(len(p), sum(1 for x in p if x.get("last_handshake")))'
}
wait_admitted() {
    local n=$1 i
    for i in $(seq 600); do
        read -r a _ <<<"$(komnet_counts)"
        [ "${a:-0}" -ge "$n" ] && return 0
        kill -0 "$HUB_PID" 2>/dev/null || bdie "the hub exited: $(tail -5 "$WORK/hub-$HUB_STARTS.log")"
        sleep 0.5
    done
    bdie "the hub did not admit $n peers within 300 s (has ${a:-0})"
}

start_komnet
for _ in $(seq 300); do hub_status | grep -q '"state": *"running"' && break; sleep 0.1; done
hub_status | grep -q '"state": *"running"' || bdie "the hub does not run: $(tail -5 "$WORK/hub-1.log")"
# The hub's WireGuard key, which it made when it enrolled (what its peers' configs name).
HUB_KEY=$(wg pubkey <"$WORK/hub/wg.key") || bdie "no hub key in $WORK/hub/wg.key"

# issue_upto N: the peers file holds N issued identities afterwards.
issue_upto() {
    local have=0 add
    [ -f "$PEERS_FILE" ] && have=$(wc -l <"$PEERS_FILE")
    add=$(($1 - have)); [ "$add" -gt 0 ] || return 0
    local targs=(); for t in "${TENANTS[@]}"; do targs+=(--tenant "$t"); done
    local out
    out=$("$LOADGEN" issue --socket "$SOCK" "${targs[@]}" --count "$add" --prefix "u$have" \
        --concurrency 8 --out "$WORK/new-peers.txt") || bdie "issuing $add identities failed"
    cat "$WORK/new-peers.txt" >>"$PEERS_FILE"
    echo "issued $add home-office identities through the admin API: $out"
}

# gen ARGS: komnet-loadgen handshake/traffic in the peers' namespace against PORT.
gen() {
    local mode=$1 port=$2; shift 2
    ip netns exec "$NS_GEN" "$LOADGEN" "$mode" --peers "$PEERS_FILE" --hub "$HUB_ADDR:$port" \
        --hub-key "$HUB_KEY_NOW" --source 10.236.0.1 --addresses "$ADDRESSES" --threads "$THREADS" "$@"
}

wggo_conf() {
    local n=$1
    echo "[Interface]"; echo "PrivateKey = $WG_PRIV"; echo "ListenPort = 51821"
    head -n "$n" "$PEERS_FILE" | awk '{print "[Peer]\nPublicKey = " $2 "\nAllowedIPs = " $3 "/32"}'
}
WG_PRIV=$(wg genkey); WG_PUB=$(wg pubkey <<<"$WG_PRIV")
start_wggo() {
    netns_wg_start "$NS_HUB" "$IF_W" "$REF" || bdie "wireguard-go did not start"
    HUB_PID=$NETNS_LAST_PID
    ip -n "$NS_HUB" addr add 10.96.255.254/32 dev "$IF_W" 2>/dev/null
    ip -n "$NS_HUB" link set "$IF_W" mtu 1420 up
    local i
    for i in $(seq 0 9); do ip -n "$NS_HUB" route replace "10.$((200 + i)).0.0/20" dev "$IF_W"; done
}
ms_since() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }

RESULTS=()
add() { RESULTS+=("$*"); echo "$*"; }

for d in $DAEMONS; do
    case $d in
        komnet) name=komnet-gateway; port=51820; HUB_KEY_NOW=$HUB_KEY ;;
        wggo2023) name=wireguard-go-2023; port=51821; HUB_KEY_NOW=$WG_PUB ;;
        *) bdie "unknown daemon $d" ;;
    esac
    if [ "$d" = wggo2023 ]; then
        stop_pid "$HUB_PID"
        issue_upto "$MAXN"
    fi
    if [[ " $STEPS " == *" rss "* ]]; then
        for n in $PEERS_LIST; do
            if [ "$d" = komnet ]; then
                issue_upto "$n"
                t0=$(date +%s%N); wait_admitted "$n"
                blog "komnet: $n admitted (waited $(ms_since "$t0") ms after issuing)"
            else
                [ -n "$HUB_PID" ] && kill -0 "$HUB_PID" 2>/dev/null && stop_pid "$HUB_PID"
                start_wggo
                ip netns exec "$NS_HUB" wg setconf "$IF_W" <(wggo_conf "$n") || bdie "wg setconf $n peers"
            fi
            sleep 3
            r_adm=$(rss_mib "$HUB_PID")
            # Not all done within the timeout is a result too (how many, and why: the JSON).
            out=$(gen handshake "$port" --count "$n" --timeout "$HS_TIMEOUT") || blog "$name: not all $n peers handshook: $out"
            sleep 3
            r_hs=$(rss_mib "$HUB_PID"); cpu=$(idle_cpu "$HUB_PID" "${IDLE_SECS:-30}")
            add "$name peers=$n RSS admitted ${r_adm} MiB, after the handshakes ${r_hs} MiB; $n simultaneous handshakes: $(jfield "$out" handshaken) done, p50 $(jfield "$out" p50_ms) ms, p99 $(jfield "$out" p99_ms) ms, all $(jfield "$out" all_ms) ms ($(jfield "$out" initiations) initiations, $(jfield "$out" cookies) cookie replies, $(jfield "$out" errors) errors); idle CPU afterwards ${cpu} % of a core over ${IDLE_SECS:-30} s"
        done
    fi
    if [[ " $STEPS " == *" restart "* ]]; then
        if [ "$d" = komnet ]; then
            issue_upto "$MAXN"; wait_admitted "$MAXN"
            stop_pid "$HUB_PID"
            t0=$(date +%s%N); start_komnet
            out=$(gen handshake "$port" --count "$RESTART_PEERS" --timeout 120) || bdie "$name: not all peers handshook after the restart: $out"
            total=$(ms_since "$t0")
        else
            stop_pid "$HUB_PID"
            t0=$(date +%s%N); start_wggo
            ip netns exec "$NS_HUB" wg setconf "$IF_W" <(wggo_conf "$MAXN") &
            setconf=$!
            out=$(gen handshake "$port" --count "$RESTART_PEERS" --timeout 120) || bdie "$name: not all peers handshook after the restart: $out"
            total=$(ms_since "$t0"); wait "$setconf"
        fi
        add "$name restart with $MAXN peers configured: all $RESTART_PEERS peers handshaken ${total} ms after the start (p50 $(jfield "$out" p50_ms) ms; $(jfield "$out" initiations) initiations, $(jfield "$out" cookies) cookie replies)"
    fi
    if [[ " $STEPS " == *" throughput "* ]]; then
        if [ "$d" = komnet ]; then issue_upto "$MAXN"; wait_admitted "$MAXN"; elif ! kill -0 "${HUB_PID:-0}" 2>/dev/null || [ ! -S "/run/wireguard/$IF_W.sock" ]; then
            start_wggo; ip netns exec "$NS_HUB" wg setconf "$IF_W" <(wggo_conf "$MAXN")
        fi
        p0=$(sink_packets); c0=$(cpu_ticks "$HUB_PID")
        out=$(THREADS=$TRAFFIC_THREADS gen traffic "$port" --count "$ACTIVE" --to "$SINK:$SINK_PORT" --size "$SIZE" --duration "$DUR") || bdie "$name: traffic run failed: $out"
        p1=$(sink_packets); c1=$(cpu_ticks "$HUB_PID")
        gbit=$(awk -v p=$((p1 - p0)) -v s="$SIZE" -v d="$DUR" 'BEGIN{printf "%.2f", p * s * 8 / d / 1e9}')
        hubcpu=$(awk -v t=$((c1 - c0)) -v hz="$(getconf CLK_TCK)" -v d="$DUR" 'BEGIN{printf "%.0f", 100 * t / hz / d}')
        add "$name throughput, $ACTIVE peers x UDP ${SIZE} B for ${DUR}s: forwarded ${gbit} Gbit/s ($((p1 - p0)) packets arrived of $(jfield "$out" sent_packets) sent, generator offered $(jfield "$out" sent_gbit_s) Gbit/s); hub CPU ${hubcpu} % (incl. handshakes)"
    fi
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "---- summary"
printf '%s\n' "${RESULTS[@]}"
