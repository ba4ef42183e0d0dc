#!/usr/bin/env bash
# Install test: installs the .deb in a Debian 12 root booted with real
# systemd (systemd-nspawn) and checks what the package promises.
#
#   packaging/test-install.sh OLD.deb NEW.deb
#
# NEW.deb must be a newer version of the same package (build-deb.sh
# --deb-version), for the upgrade test. Run as root on Debian 12; installs
# systemd-container and debootstrap itself. With KEEP_ARTIFACTS=DIR, the
# container's journal is kept there on failure, when it is also printed.
# ROOT_CACHE=FILE.tar reuses (or saves) the debootstrapped root.
#
# Checks, in one boot: the unit is enabled and active, ready with a STATUS
# line; start-up lines in the journal with structured fields; an HTTPS
# notification is stored (200); restart and upgrade keep the config edit
# and the stored data; stop is clean within the deadline; a wrong config,
# a missing value, an unreadable certificate: exit 78, one clear journal
# line and no restart; the port taken and a full disk: one clear line, a
# restart every RestartSec, and recovery once fixed; purge removes the
# user, the state and the config.
set -euo pipefail

old_deb=$(realpath "${1:?usage: test-install.sh OLD.deb NEW.deb}")
new_deb=$(realpath "${2:?usage: test-install.sh OLD.deb NEW.deb}")
if [ "$(id -u)" -ne 0 ]; then
    echo "test-install.sh: run as root (it boots a container)" >&2
    exit 1
fi

started_at=$(date +%s)
unit=smaregi-relay
work=$(mktemp -d /var/tmp/smaregi-relay-install.XXXXXX)
root="$work/root"
nspawn_pid=""
init_pid=""
tmpfs_mounted=""
passed=""

log() { printf '[%3ds] %s\n' "$(($(date +%s) - started_at))" "$*"; }
fail() {
    printf 'FAIL: %s\n' "$*" >&2
    exit 1
}

cleanup() {
    local status=$?
    if [ -z "$passed" ] && [ -d "$root/var/log/journal" ]; then
        echo "=== container journal (smaregi-relay and systemd) ===" >&2
        journalctl -D "$root/var/log/journal" --no-pager -o short-precise \
            -u "$unit" -u init.scope 2>/dev/null | tail -n 200 >&2 || true
        if [ -n "${KEEP_ARTIFACTS:-}" ]; then
            mkdir -p "$KEEP_ARTIFACTS"
            cp -r "$root/var/log/journal" "$KEEP_ARTIFACTS/" || true
        fi
    fi
    if [ -n "$init_pid" ] && [ -d "/proc/$init_pid" ]; then
        timeout 20 nsenter -t "$init_pid" -a systemctl poweroff >/dev/null 2>&1 || true
    fi
    if [ -n "$nspawn_pid" ]; then
        local waited=0
        while kill -0 "$nspawn_pid" 2>/dev/null && [ $waited -lt 20 ]; do
            sleep 1
            waited=$((waited + 1))
        done
        if kill -0 "$nspawn_pid" 2>/dev/null; then kill -TERM "$nspawn_pid" 2>/dev/null || true; sleep 3; fi
        if kill -0 "$nspawn_pid" 2>/dev/null; then kill -KILL "$nspawn_pid" 2>/dev/null || true; fi
        wait "$nspawn_pid" 2>/dev/null || true
    fi
    if [ -n "$tmpfs_mounted" ]; then umount /run/systemd/nspawn 2>/dev/null || true; fi
    rm -rf "$work"
    exit $status
}
trap cleanup EXIT
# A command failing outside a check still says where.
set -E
trap 'echo "FAIL: line $LINENO: $BASH_COMMAND" >&2' ERR

# Polls CMD until it succeeds or SECONDS pass (there is no event to await).
wait_for() {
    local what=$1 seconds=$2
    shift 2
    local deadline=$(($(date +%s) + seconds))
    until "$@" >/dev/null 2>&1; do
        if [ "$(date +%s)" -ge "$deadline" ]; then fail "timed out after ${seconds}s waiting for: $what"; fi
        sleep 0.2
    done
}

in_ct() { nsenter -t "$init_pid" -a "$@"; }
prop() { in_ct systemctl show -p "$1" --value "$unit"; }
expect_prop() {
    local got
    got=$(prop "$1")
    [ "$got" = "$2" ] || fail "$unit $1 is '$got', expected '$2'"
}
prop_is() { [ "$(prop "$1")" = "$2" ]; }
# The unit's journal since the cursor file $1 (messages only).
journal_since() { in_ct journalctl -u "$unit" --no-pager -o cat --after-cursor "$(cat "$1")"; }
# journald stores a line a moment after it is written: poll for it.
journal_has() { journal_since "$1" | grep -q -E "$2"; }
expect_journal() { wait_for "a journal line matching /$2/" 10 journal_has "$1" "$2"; }
mark() { in_ct journalctl -n 0 --show-cursor --no-pager | sed -n 's/^-- cursor: //p' > "$1"; }
apt_in_ct() {
    in_ct env DEBIAN_FRONTEND=noninteractive apt-get "$@" -y -q \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold
}

log "host packages"
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    systemd-container debootstrap >/dev/null

mirror=$(sed -n 's/^URIs: *\([^ ]*debian\)$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n 1)
if [ -z "$mirror" ]; then
    mirror=$(awk '$1 == "deb" && $3 == "bookworm" { print $2; exit }' /etc/apt/sources.list 2>/dev/null)
fi
mirror=${mirror:-http://deb.debian.org/debian}

# ROOT_CACHE=FILE.tar: reuse a root debootstrapped before (local runs).
if [ -n "${ROOT_CACHE:-}" ] && [ -f "$ROOT_CACHE" ]; then
    log "root from $ROOT_CACHE"
    mkdir -p "$root"
    tar -C "$root" -xf "$ROOT_CACHE"
else
    log "debootstrap bookworm from $mirror"
    debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,curl,ca-certificates \
        bookworm "$root" "$mirror" >"$work/debootstrap.log" 2>&1 || {
        tail -n 30 "$work/debootstrap.log" >&2
        fail "debootstrap failed"
    }
    if [ -n "${ROOT_CACHE:-}" ]; then tar -C "$root" -cf "$ROOT_CACHE" .; fi
fi
cp "$old_deb" "$root/root/old.deb"
cp "$new_deb" "$root/root/new.deb"

log "boot"
if ! mountpoint -q /run/systemd/nspawn; then
    mkdir -p /run/systemd/nspawn
    mount -t tmpfs tmpfs /run/systemd/nspawn
    tmpfs_mounted=1
fi
# A private network: the relay's port cannot clash with the host's.
systemd-nspawn --register=no --keep-unit --private-network -D "$root" -b \
    --console=read-only >"$work/boot.log" 2>&1 &
nspawn_pid=$!
find_init() {
    init_pid=$(ps -o pid=,comm= --ppid "$nspawn_pid" | awk '$2 == "systemd" { print $1; exit }')
    [ -n "$init_pid" ] && [ -S "/proc/$init_pid/root/run/systemd/private" ]
}
wait_for "the container's systemd" 60 find_init
find_init
in_ct systemctl is-system-running --wait >/dev/null || true

log "install $(basename "$old_deb")"
apt_in_ct install /root/old.deb >"$work/install.log" 2>&1 || {
    cat "$work/install.log" >&2
    fail "apt-get install failed"
}
[ "$(in_ct systemctl is-enabled "$unit")" = enabled ] || fail "$unit is not enabled"
wait_for "$unit active" 30 prop_is ActiveState active
expect_prop SubState running
status=$(prop StatusText)
log "StatusText: $status"
[[ "$status" == "listening on 0.0.0.0:8443 · certificate "* ]] || fail "unexpected STATUS: $status"

log "package contents on disk"
in_ct getent passwd smaregi-relay >/dev/null || fail "no user smaregi-relay"
[ "$(in_ct stat -c '%U:%G %a' /etc/smaregi-relay/config.toml)" = "root:smaregi-relay 640" ] ||
    fail "config.toml is $(in_ct stat -c '%U:%G %a' /etc/smaregi-relay/config.toml)"
[ "$(in_ct stat -c '%U:%G %a' /etc/smaregi-relay/intake-secret)" = "root:smaregi-relay 640" ] ||
    fail "intake-secret is $(in_ct stat -c '%U:%G %a' /etc/smaregi-relay/intake-secret)"
[ "$(in_ct stat -c '%U:%G %a' /var/lib/smaregi-relay/drop)" = "smaregi-relay:smaregi-relay 2770" ] ||
    fail "drop folder is $(in_ct stat -c '%U:%G %a' /var/lib/smaregi-relay/drop)"
in_ct smaregi-relay --version | grep -q '^smaregi-relay ' || fail "--version"

# tracing-journald prefixes our fields with F_.
log "journal: start-up lines with structured fields"
in_ct journalctl -u "$unit" -o json --no-pager >"$work/journal.json"
grep '"MESSAGE":"smaregi-relay starting"' "$work/journal.json" | grep -q -E '"F_VERSION":"[0-9]' ||
    fail "no 'smaregi-relay starting' line with a VERSION field"
grep '"MESSAGE":"ready"' "$work/journal.json" | grep -q '"F_ADDRESS":"0.0.0.0:8443"' ||
    fail "no 'ready' line with an ADDRESS field"

secret=$(in_ct cat /etc/smaregi-relay/intake-secret)
# Posts the API送信 notification with rows $1; prints the HTTP status.
notify() {
    in_ct curl -sk -o /dev/null -w '%{http_code}' --max-time 10 \
        --data-urlencode proc_name=stock_send \
        --data-urlencode "params={\"data\":[{\"table_name\":\"Stock\",\"rows\":[{\"storeId\":\"1\",\"productId\":\"$1\",\"amount\":\"3\"}]}]}" \
        --data-urlencode "relay_secret=$secret" \
        https://127.0.0.1:8443/smaregi/notify
}
# The inbox sequence number journald recorded for the last accept line.
# The inbox sequence numbers (F_SEQ) of the unit's journal lines with
# message $1, oldest first.
seq_lines() {
    in_ct journalctl -u "$unit" -o json --no-pager |
        { grep -F "\"MESSAGE\":\"$1\"" || true; } | sed -n 's/.*"F_SEQ":"\([0-9]*\)".*/\1/p'
}
seq_count_above() { [ "$(seq_lines "$1" | wc -l)" -gt "$2" ]; }
# Runs notify $2 and prints the sequence number of the new line with
# message $1 (journald stores it a moment after the answer: poll).
notify_and_seq() {
    local message=$1 product=$2 before code
    before=$(seq_lines "$message" | wc -l)
    code=$(notify "$product")
    [ "$code" = 200 ] || fail "notification $product answered $code"
    wait_for "a new journal line '$message'" 10 seq_count_above "$message" "$before"
    seq_lines "$message" | tail -n 1
}

log "HTTPS notification"
# A stored notification is logged at debug level only; its resend is
# logged at info with the sequence number it was stored under.
code=$(notify 101)
[ "$code" = 200 ] || fail "notification 101 answered $code"
stored_seq=$(notify_and_seq "intake: resent notification answered, not stored again" 101)
[ -n "$stored_seq" ] || fail "no 'resent notification' journal line"
wrong=$(in_ct curl -sk -o /dev/null -w '%{http_code}' --max-time 10 -d proc_name=stock_send \
    -d relay_secret=wrong-secret-wrong-secret https://127.0.0.1:8443/smaregi/notify)
[ "$wrong" = 401 ] || fail "a wrong secret was answered $wrong, not 401"

log "operator commands over the control socket"
socket_mode=$(in_ct stat -c '%a %G' /run/smaregi-relay/control.sock)
[ "$socket_mode" = "660 smaregi-relay" ] || fail "control socket is '$socket_mode', not '660 smaregi-relay'"
status_text=$(in_ct smaregi-relay status) || fail "\`smaregi-relay status\` failed"
# Green, or amber only for this machine's own disk space (the container's
# state directory is on the host's disk).
printf '%s\n' "$status_text" | head -n 1 | grep -qE "正常 \(all well\)|要確認 \(worth a look\)" \
    || fail "\`smaregi-relay status\` is not green or amber: $status_text"
problems=$(in_ct smaregi-relay status --json | grep -oE '"event": *"[a-z_.]+"' | grep -v storage.disk_nearly_full || true)
[ -z "$problems" ] || fail "\`smaregi-relay status\` reports problems: $problems"
in_ct smaregi-relay outbox list --json >/dev/null || fail "\`outbox list\` failed"
# The installed config has no [smaregi] yet: nothing to pause, and the
# command says so with exit 1.
pause_code=0
pause_text=$(in_ct smaregi-relay pause 2>&1) || pause_code=$?
if [ "$pause_code" != 1 ] || ! grep -q 'no upstream "smaregi"' <<<"$pause_text"; then
    fail "pause without [smaregi]: exit $pause_code, '$pause_text'"
fi

# The same notification again is a resend: answered 200, found in the
# inbox under the same sequence number. Proves the stored data survived.
expect_resend() {
    local seq
    seq=$(notify_and_seq "intake: resent notification answered, not stored again" 101)
    [ "$seq" = "$stored_seq" ] || fail "after $1 the stored notification $stored_seq is gone (resend seq '$seq')"
}

log "restart keeps the data"
pid_before=$(prop MainPID)
in_ct systemctl restart "$unit"
expect_prop ActiveState active
[ "$(prop MainPID)" != "$pid_before" ] || fail "restart did not restart"
expect_resend "a restart"
[ "$(prop StatusText)" = "$status" ] || fail "the certificate changed over a restart: $(prop StatusText)"

log "SIGHUP (certificate reload, as the README tells certbot hooks) keeps the process"
pid_before=$(prop MainPID)
in_ct systemctl kill -s HUP --kill-who=main "$unit"
code=$(notify 101)
[ "$code" = 200 ] || fail "after SIGHUP a notification was answered $code"
expect_prop ActiveState active
[ "$(prop MainPID)" = "$pid_before" ] || fail "SIGHUP ended the process"

log "stop is clean within the deadline"
mark "$work/c3"
t0=$(date +%s%N)
in_ct systemctl stop "$unit"
stop_ms=$((($(date +%s%N) - t0) / 1000000))
log "stop took ${stop_ms} ms"
[ "$stop_ms" -lt 30000 ] || fail "stop took ${stop_ms} ms"
expect_prop Result success
expect_prop ExecMainStatus 0
expect_journal "$work/c3" '^stopped cleanly$'
in_ct systemctl start "$unit"

log "upgrade keeps the config edit and the data, and restarts"
config=/etc/smaregi-relay/config.toml
in_ct sed -i 's/^# level = "info"$/level = "info,sled=warn" # edited by the install test/' "$config"
in_ct grep -q 'edited by the install test' "$config" || fail "could not edit the config"
in_ct systemctl restart "$unit"
pid_before=$(prop MainPID)
apt_in_ct install /root/new.deb >"$work/upgrade.log" 2>&1 || {
    cat "$work/upgrade.log" >&2
    fail "the upgrade failed"
}
new_version=$(dpkg-deb -f "$new_deb" Version)
# shellcheck disable=SC2016 # dpkg-query's format, not a shell expansion
[ "$(in_ct dpkg-query -W -f='${Version}' smaregi-relay)" = "$new_version" ] || fail "not upgraded"
in_ct grep -q 'edited by the install test' "$config" || fail "the upgrade overwrote the config edit"
[ "$(in_ct stat -c '%U:%G %a' "$config")" = "root:smaregi-relay 640" ] || fail "the upgrade changed the config's mode"
wait_for "$unit active after the upgrade" 30 prop_is ActiveState active
[ "$(prop MainPID)" != "$pid_before" ] || fail "the upgrade did not restart the service"
expect_resend "the upgrade"
[ "$(prop StatusText)" = "$status" ] || fail "the certificate changed over the upgrade"

# Starts the unit with a broken config; expects it failed with exit 78,
# a line matching $2 and no restart.
expect_config_failure() {
    local what=$1 pattern=$2
    mark "$work/c4"
    in_ct systemctl restart "$unit" 2>/dev/null && fail "$what: the unit started"
    expect_prop ActiveState failed
    expect_prop ExecMainStatus 78
    expect_prop NRestarts 0
    expect_journal "$work/c4" "$pattern"
    log "$what: $(journal_since "$work/c4" | grep -E "$pattern" | head -n 1)"
}
in_ct cp "$config" /root/config.good

log "bad input: an unknown key (exit 78, no restart loop)"
in_ct sed -i 's/^\[logging\]$/[logging]\nlevle = "info"/' "$config"
expect_config_failure "unknown key" "config.toml:[0-9]+:[0-9]+: .*levle"
# No event says "did not restart": wait past RestartSec and look again.
sleep 6
expect_prop NRestarts 0
expect_prop ActiveState failed

log "bad input: a missing value"
in_ct cp /root/config.good "$config"
in_ct sed -i 's/^secret = { file = "intake-secret" }$//' "$config"
expect_config_failure "missing secret" "secret"

log "bad input: an unreadable certificate"
in_ct cp /root/config.good "$config"
in_ct sed -i 's|^\[listener\]$|[listener]\ntls-certificate = "/etc/smaregi-relay/cert.pem"\ntls-private-key = "/etc/smaregi-relay/key.pem"|' "$config"
in_ct sh -c 'echo "not a certificate" > /etc/smaregi-relay/cert.pem; echo x > /etc/smaregi-relay/key.pem; chmod 600 /etc/smaregi-relay/cert.pem'
expect_config_failure "unreadable certificate" "cert\.pem"
in_ct rm -f /etc/smaregi-relay/cert.pem /etc/smaregi-relay/key.pem
in_ct cp /root/config.good "$config"
in_ct systemctl reset-failed "$unit"

log "bad input: the port taken"
in_ct systemctl stop "$unit"
# systemd-socket-activate (in the systemd package) holds a listening socket.
in_ct systemd-run --unit=port-holder --quiet systemd-socket-activate -l 0.0.0.0:8443 sleep infinity
# shellcheck disable=SC2016 # an awk program
port_held() { in_ct awk '$2 ~ /:20FB$/ && $4 == "0A" { found = 1 } END { exit !found }' /proc/net/tcp; }
wait_for "something else listening on 8443" 10 port_held
mark "$work/c5"
in_ct systemctl start --no-block "$unit"
wait_for "$unit failed on the taken port" 30 sh -c "[ \"\$(nsenter -t $init_pid -a systemctl show -p NRestarts --value $unit)\" -ge 1 ]"
expect_journal "$work/c5" "cannot listen on 0\.0\.0\.0:8443: Address already in use"
journal_since "$work/c5" | grep -E "cannot listen on 0\.0\.0\.0:8443" | head -n 1 | sed 's/^/    /'
# ExecMainStatus is the restarted attempt's by now: systemd's own line.
expect_journal "$work/c5" 'Main process exited, code=exited, status=75/TEMPFAIL'
expect_prop RestartUSec 5s
t_hold=$(date +%s)
in_ct systemctl stop port-holder
wait_for "$unit recovering once the port is free" 30 prop_is ActiveState active
restarts=$(prop NRestarts)
log "recovered after $restarts restart(s), $(($(date +%s) - t_hold)) s after the port was freed"

log "bad input: a full disk at start"
in_ct systemctl stop "$unit"
# A full file system over the state directory: the real state stays
# underneath, untouched.
in_ct mount -t tmpfs -o size=256k,mode=0750 tmpfs /var/lib/smaregi-relay
in_ct sh -c 'dd if=/dev/zero of=/var/lib/smaregi-relay/filler bs=4k 2>/dev/null || true'
mark "$work/c6"
in_ct systemctl reset-failed "$unit" 2>/dev/null || true
in_ct systemctl start --no-block "$unit"
wait_for "$unit failing on the full disk" 30 sh -c "nsenter -t $init_pid -a journalctl -u $unit -o cat --no-pager --after-cursor '$(cat "$work/c6")' | grep -q 'Main process exited'"
expect_journal "$work/c6" "cannot open store .*No space left on device"
full_line=$(journal_since "$work/c6" | grep "No space left on device" | head -n 1)
log "full disk: $full_line"
full_status=$(prop ExecMainStatus)
log "full disk: exit status $full_status"
[ "$full_status" = 74 ] || [ "$full_status" = 73 ] || fail "full disk exit status $full_status, expected 74 (I/O) or 73"
in_ct systemctl stop "$unit"
in_ct umount /var/lib/smaregi-relay
in_ct systemctl reset-failed "$unit" 2>/dev/null || true
in_ct systemctl start "$unit"
expect_prop ActiveState active
expect_resend "the failed starts"

log "watchdog: fed while alive, fires when the daemon hangs"
expect_prop WatchdogUSec 30s
expect_journal "$work/c6" '^watchdog: feeding systemd'
# A short watchdog for the test, so that hanging is seen in seconds.
in_ct mkdir -p /run/systemd/system/$unit.service.d
in_ct sh -c "printf '[Service]\nWatchdogSec=2s\nTimeoutAbortSec=2s\n' > /run/systemd/system/$unit.service.d/watchdog-test.conf"
in_ct systemctl daemon-reload
in_ct systemctl restart "$unit"
pid_before=$(prop MainPID)
# Four watchdog intervals without a timeout: the daemon feeds it.
sleep 8
expect_prop ActiveState active
[ "$(prop MainPID)" = "$pid_before" ] || fail "the watchdog killed a live daemon"
mark "$work/c7"
in_ct systemctl kill -s STOP --kill-who=main "$unit"
wait_for "the watchdog to fire on a hung daemon" 20 sh -c "nsenter -t $init_pid -a journalctl -u $unit -o cat --no-pager --after-cursor '$(cat "$work/c7")' | grep -q 'Watchdog timeout'"
wait_for "$unit restarted after the watchdog" 30 sh -c "[ \"\$(nsenter -t $init_pid -a systemctl show -p MainPID --value $unit)\" != $pid_before ] && [ \"\$(nsenter -t $init_pid -a systemctl show -p ActiveState --value $unit)\" = active ]"
log "watchdog: $(journal_since "$work/c7" | grep 'Watchdog timeout' | head -n 1)"
in_ct rm -r /run/systemd/system/$unit.service.d
in_ct systemctl daemon-reload
expect_resend "the watchdog restart"

log "purge removes the user, the state and the config"
apt_in_ct purge smaregi-relay >"$work/purge.log" 2>&1 || {
    cat "$work/purge.log" >&2
    fail "purge failed"
}
in_ct getent passwd smaregi-relay >/dev/null && fail "the user is still there"
in_ct getent group smaregi-relay >/dev/null && fail "the group is still there"
in_ct test -e /var/lib/smaregi-relay && fail "/var/lib/smaregi-relay is still there"
in_ct test -e /etc/smaregi-relay && fail "/etc/smaregi-relay is still there"
in_ct test -e /lib/systemd/system/smaregi-relay.service && fail "the unit file is still there"

passed=1
log "install test passed in $(($(date +%s) - started_at)) s"
