#!/bin/sh
# timeout: 360
# On a GICv2 host (no ITS), PCI devices get their MSIs through the GICv2m frame: a disk given
# at start works (checksummed write and read), and a second one hot-plugged into the running
# guest (root port MSI through the frame too) is seen and used, then unplugged in order.
# shellcheck disable=SC2016 # the commands typed into the guest expand there
. "${HARNESS_DIR:-/harness}/lib.sh"

img=$SCN_DIR/img
mkdir -p "$img"
dd if=/dev/zero of="$img/d0" bs=1M count=16 2>/dev/null
dd if=/dev/zero of="$img/d1" bs=1M count=8 2>/dev/null
api=$SCN_DIR/api.sock
# hp VERB ARGS: one bulkhead-ctl request (add-disk OPTIONS, add-net OPTIONS, remove-device ID);
# prints "OK <its JSON answer on one line>" or "ERR <status> <message>".
hp() { ctl_call -c "$api" "$@"; }

vm_start vm --kernel "$GUEST_KERNEL" --initramfs "$GUEST_INITRAMFS" --cmdline "$GUEST_CMDLINE" \
	--cpus boot=2 --memory size=512M -v --pci-slots 2 --api-socket "$api" --disk "path=$img/d0"
vm_wait_for vm '^GUEST-READY' "$BOOT_TIMEOUT"
say "guest ready $(elapsed vm) s after start"
grep -q 'falling back to GICv2' "$SCN_DIR/vm/err" || fail "this L1 is not a GICv2 host"
sleep 1
run() {
	vm_send vm "$1" >&2
	vm_wait_for vm "$2" "$3"
	tr -d '\r' <"$SCN_DIR/vm/out" | grep -E "$2" | tail -n 1 | sed 's/^[A-Z0-9]*-//'
}
v2m=$(run 'echo V2M-$(dmesg | grep -c "GICv2m: range")' '^V2M-[0-9]+$' 20)
run 'dmesg | grep -iE "v2m|pciehp.*Slot" | sed "s/^/DMESG /"; echo DM-done' '^DM-done' 10 >/dev/null
tr -d '\r' <"$SCN_DIR/vm/out" | grep '^DMESG' | quote "guest"
[ "$v2m" = 1 ] || fail "the guest did not find the GICv2m frame"
want=$(run 'head -c 4194304 /dev/urandom >/tmp/r && echo W-$(sha256sum /tmp/r | cut -c1-64)' '^W-[0-9a-f]{64}$' 60)
got=$(run 'dd if=/tmp/r of=/dev/vda bs=1M conv=fsync 2>/dev/null; echo 3 >/proc/sys/vm/drop_caches; echo R-$(head -c 4194304 /dev/vda | sha256sum | cut -c1-64)' '^R-[0-9a-f]{64}$' 60)
say "vda on GICv2m: written $want, read back $got"
[ "$want" = "$got" ] || fail "read back a different checksum on GICv2"
irqs=$(run 'echo IRQ-$(grep -c v2m /proc/interrupts)' '^IRQ-[0-9]+$' 10)
say "GICv2m interrupts in the guest: $irqs"

vm_send vm 'while [ ! -e /sys/block/vdb ]; do usleep 20000; done; echo HOTDISK-1' >&2
answer=$(hp add-disk "path=$img/d1,id=hot")
say "plug: $answer"
case $answer in OK*\"bdf\"*) ;; *) fail "hot-plug on GICv2 failed: $answer" ;; esac
vm_wait_for vm '^HOTDISK-1' 30
got=$(run 'dd if=/tmp/r of=/dev/vdb bs=1M conv=fsync 2>/dev/null; echo 3 >/proc/sys/vm/drop_caches; echo R2-$(head -c 4194304 /dev/vdb | sha256sum | cut -c1-64)' '^R2-[0-9a-f]{64}$' 60)
[ "$want" = "$got" ] || fail "the hot-plugged disk reads back a different checksum"
answer=$(hp remove-device hot)
say "unplug: $answer"
case $answer in *\"removal\":\"orderly\"*) ;; *) fail "the unplug on GICv2 was not orderly: $answer" ;; esac

vm_send vm 'poweroff -f'
vm_wait_exit vm 30
vm_no_panic vm
[ "$VM_STATUS" = 0 ] || fail "bulkhead exited with status $VM_STATUS"
exit 0
