#!/bin/busybox sh
# PID 1 of the BLE test VM's initramfs (busybox only). It loads the modules the kernel needs
# to reach the host, mounts the host's / read-only over virtio-9p under a tmpfs overlay (so
# the guest runs this checkout's .venv and the host's bluez/dbus binaries), mounts the
# writable "results" share, and switch_roots into the guest init named on the kernel
# command line (pigeon.init=PATH). Any failure powers the VM off: the host then finds no
# status file and reports the console log.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

die() {
    echo "pigeon-vm initramfs: $*"
    echo o > /proc/sysrq-trigger
    sleep 10
}

# One module per line, dependencies first (written by tests/vm/vm.py at prepare time).
while read -r mod; do
    insmod "/modules/$mod" || die "insmod $mod failed"
done < /modules.order

guest_init=""
for arg in $(cat /proc/cmdline); do
    case "$arg" in pigeon.init=*) guest_init="${arg#pigeon.init=}" ;; esac
done
[ -n "$guest_init" ] || die "no pigeon.init= on the kernel command line"

mkdir -p /lower /rw /newroot
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /lower \
    || die "cannot mount the host root (9p tag hostroot)"
mount -t tmpfs -o size=1200m,mode=0755 tmpfs /rw
mkdir -p /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work /newroot \
    || die "cannot mount the overlay root"
mkdir -p /newroot/pigeon-results
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 results /newroot/pigeon-results \
    || die "cannot mount the results share (9p tag results)"
[ -f "/newroot$guest_init" ] || die "guest init $guest_init not found on the host root"

for d in dev proc sys; do
    mkdir -p "/newroot/$d"
    mount --move "/$d" "/newroot/$d"
done
exec switch_root /newroot /bin/bash "$guest_init"
