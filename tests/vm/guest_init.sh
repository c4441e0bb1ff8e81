#!/bin/bash
# PID 1 inside the BLE test VM, after switch_root onto the overlay of the host's /.
# It starts the system D-Bus and bluetoothd the way a Linux desktop would, runs one scenario
# with this checkout's venv python, writes its exit status to the results share and powers
# the VM off. job.env (written by the host, tests/vm/vm.py) names the scenario and paths.
# Every wait is bounded; the host also kills the whole VM on its own timeout.
set -u
results=/pigeon-results
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8

poweroff_now() {
    sync
    umount "$results" 2>/dev/null
    echo o > /proc/sysrq-trigger
    sleep 30
}

log() { echo "pigeon-vm: $*" | tee -a "$results/guest.log"; }

# shellcheck source=/dev/null
. "$results/job.env"  # PIGEON_ROOT PYTHON MODULES SCENARIO TIMEOUT, optional BLUEZ_PRIVACY

mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p /dev/pts /dev/shm /run/dbus /run/lock /var/lib/bluetooth
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
hostname pigeon-vm
ip link set lo up 2>/dev/null
log "kernel $(uname -r), $(nproc) cpus, $(awk '/MemTotal/ {print $2 " kB"}' /proc/meminfo)"

# The prepared modules become this kernel's /lib/modules/<version> (a bind mount in the
# overlay), so modprobe and the kernel's own module requests find them.
kver=$(uname -r)
mkdir -p "/lib/modules/$kver"
mount --bind "$PIGEON_MODULES/lib/modules/$kver" "/lib/modules/$kver"
if ! modprobe hci_vhci; then
    log "modprobe hci_vhci failed"; echo 90 > "$results/rc"; poweroff_now
fi
[ -c /dev/vhci ] || { log "/dev/vhci missing"; echo 91 > "$results/rc"; poweroff_now; }

dbus-daemon --system --nofork --nopidfile --nosyslog >"$results/dbus.log" 2>&1 &
for _ in $(seq 100); do [ -S /run/dbus/system_bus_socket ] && break; sleep 0.1; done
[ -S /run/dbus/system_bus_socket ] || { log "no system bus"; echo 92 > "$results/rc"; poweroff_now; }

# LE privacy as docs/ble.md tells users to set it; the file lives only in the guest's
# tmpfs overlay (the host's /etc is read-only underneath).
if [ -n "${PIGEON_BLUEZ_PRIVACY:-}" ]; then
    mkdir -p /etc/bluetooth
    printf '[General]\nPrivacy = %s\n' "$PIGEON_BLUEZ_PRIVACY" > /etc/bluetooth/main.conf
    log "bluetoothd with Privacy = $PIGEON_BLUEZ_PRIVACY"
fi
# PIGEON_VM_BTMON=1: every HCI packet and mgmt command, decoded, into btmon.log.
if [ -n "${PIGEON_VM_BTMON:-}" ] && command -v btmon >/dev/null; then
    stdbuf -oL btmon -T >"$results/btmon.log" 2>&1 &
    btmon_pid=$!
    sleep 1
fi
bluetoothd_bin=/usr/libexec/bluetooth/bluetoothd
[ -x "$bluetoothd_bin" ] || bluetoothd_bin=$(command -v bluetoothd)
"$bluetoothd_bin" -n -d >"$results/bluetoothd.log" 2>&1 &
bluetoothd_pid=$!
log "dbus-daemon and bluetoothd ($bluetoothd_pid) up after $(cut -d' ' -f1 /proc/uptime) s"

cd "$PIGEON_ROOT" || { echo 93 > "$results/rc"; poweroff_now; }
export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
started=$(cut -d' ' -f1 /proc/uptime)
timeout -k 5 "$PIGEON_TIMEOUT" "$PIGEON_PYTHON" -m "$PIGEON_SCENARIO" >"$results/scenario.log" 2>&1
rc=$?
log "scenario $PIGEON_SCENARIO exited $rc after $(awk -v s="$started" '{print $1 - s}' /proc/uptime) s"
kill "$bluetoothd_pid" ${btmon_pid:-} 2>/dev/null
for _ in $(seq 30); do kill -0 "$bluetoothd_pid" 2>/dev/null || break; sleep 0.1; done
echo "$rc" > "$results/rc"
poweroff_now
