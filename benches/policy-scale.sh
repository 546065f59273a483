#!/usr/bin/env bash
# policy-scale.sh — the admin's tools on a district-scale policy (issue 19, part 4): a generated
# policy of 100 communes, 2,000 segments, 1,010 services and 50,000 rules
# (komnet_policy::synthetic::Shape::LARGE_DISTRICT), and the wall time and peak memory (max RSS)
# of `komnet policy check`, `compile --nft` for one town hall, `diff` of two versions that differ
# in one commune's rules, and `test`. Goals: compile ≤ 1 s, diff ≤ 3 s and ≤ 150 MB.
# Each command runs RUNS times (default 5); printed are the median wall time, the median CPU
# time (user + system: what the machine's other load does not inflate) and the largest RSS.
# No root needed.
#
# Usage: benches/policy-scale.sh [target/release/komnet]
#   (build first: cargo build --release -p komnet-cli
#    and cargo build --release -p komnet-policy --example generate_district)
set -euo pipefail
cd "$(dirname "$0")/.."
KOMNET=$(readlink -f "${1:-${CARGO_TARGET_DIR:-target}/release/komnet}")
GEN=$(readlink -f "${CARGO_TARGET_DIR:-target}/release/examples/generate_district")
RUNS=${RUNS:-5}
[ -x "$KOMNET" ] || { echo "no $KOMNET: cargo build --release -p komnet-cli" >&2; exit 1; }
[ -x "$GEN" ] || { echo "no $GEN: cargo build --release -p komnet-policy --example generate_district" >&2; exit 1; }
[ -x /usr/bin/time ] || { echo "needs GNU time (apt-get install time)" >&2; exit 1; }

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$GEN" "$WORK/old" large
cp -r "$WORK/old" "$WORK/new"
# The new version: one commune's rules move from one shared service to another, and the
# version goes up.
sed -i '/^to = \[/s/"shared-03"/"shared-04"/g' "$WORK/new/tenants/gemeinde-042.toml"
sed -i 's/^version = 1$/version = 2/' "$WORK/new/operator.toml"
echo "policy: $(du -sb "$WORK/old" | cut -f1) bytes in $(find "$WORK/old" -name '*.toml' | wc -l) files"
"$KOMNET" policy check "$WORK/old" | sed 's/^[^:]*: /check: /'
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) cores"

# measure NAME COMMAND...: median wall seconds and max RSS (MB) over RUNS runs.
measure() {
    local name=$1
    shift
    local times=() cpus=() rss=0 out="$WORK/time.txt"
    for _ in $(seq "$RUNS"); do
        /usr/bin/time -f '%e %U %S %M' -o "$out" "$@" >/dev/null 2>"$WORK/stderr" || {
            echo "$name failed:" >&2
            cat "$WORK/stderr" >&2
            exit 1
        }
        read -r secs user sys kib <"$out"
        times+=("$secs")
        cpus+=("$(awk -v u="$user" -v s="$sys" 'BEGIN { printf "%.2f", u + s }')")
        [ "$kib" -gt "$rss" ] && rss=$kib
    done
    local mid=$(((RUNS + 1) / 2)) median cpu
    median=$(printf '%s\n' "${times[@]}" | sort -n | sed -n "${mid}p")
    cpu=$(printf '%s\n' "${cpus[@]}" | sort -n | sed -n "${mid}p")
    printf '%-30s wall %5.2f s   cpu %5.2f s   max RSS %6.1f MB   (wall per run: %s)\n' \
        "$name" "$median" "$cpu" "$(awk -v k="$rss" 'BEGIN { print k / 1024 }')" "${times[*]}"
}

measure "check" "$KOMNET" policy check "$WORK/new"
measure "compile --nft (gemeinde-042)" "$KOMNET" policy compile "$WORK/new" \
    --site gemeinde-042/rathaus --nft --lan eth1 --tunnel komnet0
measure "diff" "$KOMNET" policy diff "$WORK/old" "$WORK/new"
measure "test" "$KOMNET" policy test "$WORK/new"
echo "diff found: $("$KOMNET" policy diff "$WORK/old" "$WORK/new" 2>/dev/null | tail -1)"
