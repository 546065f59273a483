#!/usr/bin/env bash
# check-units.sh — rates every systemd unit komnet ships (the Debian packages' units and the
# appliance image's own) with `systemd-analyze security --offline=yes` and fails when one is
# more exposed than its limit: 2.0 for every unit (the packaged daemons reach 1.1-1.7). A unit
# that needs more says why here, with its own limit. Drop-ins the image adds to a packaged unit
# are rated together with it. Needs no root; scripts/test.sh runs it.
set -euo pipefail
cd "$(dirname "$0")/.."

LIMIT=2.0
# unit file:limit (only units that need another limit than $LIMIT; none today)
declare -A OWN_LIMIT=()

command -v systemd-analyze >/dev/null || { echo "check-units.sh: systemd-analyze is missing (package systemd)" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

units=(packaging/systemd/*.service packaging/image/overlay/usr/lib/systemd/system/*.service)
failed=0
printf '%-62s %8s %6s\n' unit exposure limit
# rate NAME FILE LIMIT
rate() {
    local name=$1 rated=$2 limit=$3 out exposure verdict=""
    out=$(systemd-analyze security --offline=yes "$rated" 2>&1) || true
    exposure=$(sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p' <<<"$out")
    if [ -z "$exposure" ]; then
        echo "check-units.sh: systemd-analyze could not rate $name:" >&2
        echo "$out" | tail -5 >&2
        failed=1
        return
    fi
    if awk -v e="$exposure" -v l="$limit" 'BEGIN { exit !(e > l) }'; then
        verdict="  TOO EXPOSED"
        failed=1
    fi
    printf '%-62s %8s %6s%s\n' "$name" "$exposure" "$limit" "$verdict"
    # Settings systemd does not understand (typos, wrong sections) are defects too.
    if grep -qiE 'unknown (key|section|lvalue)|invalid|failed to parse' <<<"$out"; then
        echo "check-units.sh: $name has settings systemd does not understand:" >&2
        grep -iE 'unknown (key|section|lvalue)|invalid|failed to parse' <<<"$out" >&2
        failed=1
    fi
}
for unit in "${units[@]}"; do
    name=$(basename "$unit")
    limit=${OWN_LIMIT[$unit]:-$LIMIT}
    # Templates are rated as an instance.
    rated="$work/${name/@./@x.}"
    cp "$unit" "$rated"
    rate "$name" "$rated" "$limit"
    # The image's drop-ins for a packaged unit, appended in the order systemd reads them.
    dropins="packaging/image/overlay/etc/systemd/system/$name.d"
    if [ -d "$dropins" ]; then
        for d in "$dropins"/*.conf; do printf '\n' >>"$rated"; cat "$d" >>"$rated"; done
        rate "$name + image drop-ins" "$rated" "$limit"
    fi
done
if [ $failed != 0 ]; then
    echo "check-units.sh: FAILED (systemd-analyze security --offline=yes UNIT shows why)" >&2
    exit 1
fi
echo "check-units.sh: every unit within its limit"
