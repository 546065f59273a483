# Shared by the appliance's scripts: where things are, and how to tell the console.
# shellcheck shell=bash

# Overridable only so that packaging/test-update.sh can run the update checks on a build host.
KOMNET_DATA=${KOMNET_DATA:-/var/lib/komnet}
KOMNET_ESP=${KOMNET_ESP:-/efi}
KOMNET_RELEASE=${KOMNET_RELEASE:-/etc/komnet-release}
KOMNET_CONSOLES=${KOMNET_CONSOLES-/dev/tty1 /dev/ttyS0}

# The slot (a or b) and image version this system booted.
booted_slot() {
    local arg
    for arg in ${KOMNET_CMDLINE:-$(cat /proc/cmdline)}; do
        case "$arg" in komnet.slot=*) echo "${arg#komnet.slot=}"; return 0 ;; esac
    done
    echo "?"
}
image_version() {
    sed -n 's/^VERSION=//p' "$KOMNET_RELEASE" 2>/dev/null || echo "?"
}

# Why komnet-gateway.service failed, in one line: its last status, else its last log line.
gateway_failure() {
    local text
    text=$(systemctl show -P StatusText komnet-gateway.service 2>/dev/null)
    # What the daemon itself wrote last (its error), not systemd's lines about the unit.
    [ -n "$text" ] || text=$(journalctl _SYSTEMD_UNIT=komnet-gateway.service -b -n 2 -o cat --no-pager 2>/dev/null | tr '\n' ' ')
    echo "${text:-no reason logged} (exit status $(systemctl show -P ExecMainStatus komnet-gateway.service 2>/dev/null))"
}

# One line to the journal, the screen (tty1) and the serial console, so a technician sees it
# on a monitor and a data-centre operator on a serial console server.
say() {
    local line="komnet: $*"
    echo "$line"
    local tty
    for tty in $KOMNET_CONSOLES; do
        if [ -c "$tty" ]; then
            printf '\r\n%s\r\n' "$line" >"$tty" 2>/dev/null || true
        fi
    done
}
