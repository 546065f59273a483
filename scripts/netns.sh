# netns.sh — network namespaces for komnet's shell scripts (sourced, not run): benches/lib.sh
# and the benches on it, scripts/demo-interop.sh. It owns making namespaces (lo up) and veth
# pairs, starting userspace WireGuard daemons in them, and the teardown: every tracked PID and
# every process still inside a namespace made here gets SIGTERM, SIGKILL about 2 s later, then
# the namespaces are deleted (deleting alone would leave the processes and their TUN devices
# running). The Rust tests' counterpart is tests/src/netns.rs; keep the two alike.
#
#   . scripts/netns.sh; trap netns_cleanup EXIT
#   netns_add ns-a ns-b && netns_veth ns-a veth0 10.0.0.1/30 ns-b veth0 10.0.0.2/30 || exit 1
#   ip netns exec ns-b some-server & netns_track_pid $!
#
# A failing step returns non-zero with a "netns.sh: ..." line on stderr (callers add
# `|| die ...`); netns_del and netns_cleanup never fail. Works under `set -euo pipefail`.
if [ -n "${NETNS_SH_LOADED:-}" ]; then return 0; fi
NETNS_SH_LOADED=1
NETNS_NAMES=()     # namespaces made by netns_add, deleted by netns_cleanup
NETNS_PIDS=()      # processes to end in netns_cleanup
NETNS_LAST_PID=    # the daemon netns_wg_start started last

_netns_err() { printf 'netns.sh: %s\n' "$*" >&2; }

# netns_add NAME...: creates each namespace with its loopback up and remembers it for cleanup.
netns_add() {
    local ns
    for ns in "$@"; do
        ip netns add "$ns" || { _netns_err "cannot create network namespace $ns"; return 1; }
        NETNS_NAMES+=("$ns")
        ip -n "$ns" link set lo up || { _netns_err "cannot bring lo up in network namespace $ns"; return 1; }
    done
}

# netns_veth NS_A IF_A ADDR_A NS_B IF_B ADDR_B: a veth pair IF_A (in NS_A) <-> IF_B (in NS_B),
# each end with its address (ADDR/LEN; "" for none) and up.
netns_veth() {
    local ns_a=$1 if_a=$2 addr_a=$3 ns_b=$4 if_b=$5 addr_b=$6
    if ip link add "$if_a" netns "$ns_a" type veth peer name "$if_b" netns "$ns_b" \
        && { [ -z "$addr_a" ] || ip -n "$ns_a" addr add "$addr_a" dev "$if_a"; } \
        && { [ -z "$addr_b" ] || ip -n "$ns_b" addr add "$addr_b" dev "$if_b"; } \
        && ip -n "$ns_a" link set "$if_a" up && ip -n "$ns_b" link set "$if_b" up; then
        return 0
    fi
    _netns_err "cannot set up veth $ns_a/$if_a $addr_a <-> $ns_b/$if_b $addr_b"
    return 1
}

# netns_track_pid PID...: ends these processes in netns_cleanup (those inside a namespace made
# here are ended anyway; this is for the others, and says what the script started).
netns_track_pid() { NETNS_PIDS+=("$@"); }

# netns_wg_start NS IFNAME BIN [LOGFILE [LOG_LEVEL]]: a userspace WireGuard daemon with
# wireguard-go's CLI (komnet-gateway, wireguard-go) in the foreground in NS, output to LOGFILE
# (default /dev/null), LOG_LEVEL (default error). Tracks it, sets NETNS_LAST_PID, and waits up
# to 5 s for its UAPI socket /run/wireguard/IFNAME.sock; returns 1 if none appears.
netns_wg_start() {
    local ns=$1 ifn=$2 bin=$3 log=${4:-/dev/null} level=${5:-error}
    ip netns exec "$ns" env WG_PROCESS_FOREGROUND=1 LOG_LEVEL="$level" "$bin" -f "$ifn" >"$log" 2>&1 &
    NETNS_LAST_PID=$!
    NETNS_PIDS+=("$NETNS_LAST_PID")
    for _ in $(seq 100); do
        if [ -S "/run/wireguard/$ifn.sock" ]; then return 0; fi
        if ! _netns_alive "$NETNS_LAST_PID"; then break; fi
        sleep 0.05
    done
    _netns_err "$bin did not create /run/wireguard/$ifn.sock in $ns"
    return 1
}

# _netns_alive PID: the process exists and is not a zombie.
_netns_alive() { local s; s=$(cat "/proc/$1/stat" 2>/dev/null) || return 1; s=${s##*) }; [ "${s%% *}" != Z ]; }

# _netns_live all|some NS...: the live processes inside the namespaces, and with "all" the live
# tracked ones too.
_netns_live() {
    local mode=$1 p ns
    shift
    if [ "$mode" = all ]; then
        for p in ${NETNS_PIDS[@]+"${NETNS_PIDS[@]}"}; do
            if _netns_alive "$p"; then echo "$p"; fi
        done
    fi
    for ns in "$@"; do ip netns pids "$ns" 2>/dev/null || true; done
}

# _netns_stop all|some NS...: SIGTERM to what _netns_live lists, 20 x 0.1 s for it to end, then
# SIGKILL (and as long again); reaps and forgets the tracked PIDs that have ended.
_netns_stop() {
    local sig pids p keep=()
    for sig in TERM KILL; do
        pids=$(_netns_live "$@")
        if [ -z "$pids" ]; then break; fi
        # shellcheck disable=SC2086 # one PID per word
        kill -s "$sig" $pids 2>/dev/null || true
        for _ in $(seq 20); do
            sleep 0.1
            if [ -z "$(_netns_live "$@")" ]; then break; fi
        done
    done
    for p in ${NETNS_PIDS[@]+"${NETNS_PIDS[@]}"}; do
        if _netns_alive "$p"; then keep+=("$p"); else wait "$p" 2>/dev/null || true; fi
    done
    NETNS_PIDS=(${keep[@]+"${keep[@]}"})
}

# netns_del NAME...: ends every process inside these namespaces, deletes them and forgets them.
# Names that do not exist are no error.
netns_del() {
    local ns n keep
    _netns_stop some "$@"
    for ns in "$@"; do
        ip netns del "$ns" 2>/dev/null || true
        keep=()
        for n in ${NETNS_NAMES[@]+"${NETNS_NAMES[@]}"}; do
            if [ "$n" != "$ns" ]; then keep+=("$n"); fi
        done
        NETNS_NAMES=(${keep[@]+"${keep[@]}"})
    done
    return 0
}

# netns_cleanup: ends every tracked process and every process inside a namespace made here,
# then deletes those namespaces. Never fails; safe in an EXIT trap and to call again later
# (e.g. before setting up the next round).
netns_cleanup() {
    local ns
    _netns_stop all ${NETNS_NAMES[@]+"${NETNS_NAMES[@]}"}
    for ns in ${NETNS_NAMES[@]+"${NETNS_NAMES[@]}"}; do ip netns del "$ns" 2>/dev/null || true; done
    NETNS_NAMES=()
    NETNS_PIDS=()
    return 0
}
