#!/bin/sh
# timeout: 180
# Never blocked by a device: with its device process stopped (SIGSTOP), SIGTERM still ends the
# VMM within seconds (bounded shutdown, then the spawner SIGKILLs the device), with status 0,
# and no device process is left behind.
. "${HARNESS_DIR:-/harness}/lib.sh"

dd if=/dev/zero of="$SCN_DIR/d.img" bs=1M count=16 2>/dev/null
vm_start vm --kernel "$GUEST_KERNEL" --initramfs "$GUEST_INITRAMFS" --cmdline "$GUEST_CMDLINE" \
	--disk "path=$SCN_DIR/d.img"
vm_wait_for vm '^GUEST-READY' "$BOOT_TIMEOUT"
say "guest ready $(elapsed vm) s after start"
vmm=$(vm_pid vm)
dev=$(devices_of "$vmm" bulkhead-block | tail -n 1)
[ -n "$dev" ] || fail "no device process of VMM $vmm"
say "kill -STOP device process $dev"
kill -STOP "$dev"
sleep 1
say "device state: $(awk '$1 == "State:" { print $2, $3 }' "/proc/$dev/status")"
t0=$(now)
say "kill -TERM $vmm"
kill -TERM "$vmm"
vm_wait_exit vm 20
took=$(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')
say "bulkhead exited with status $VM_STATUS $took s after SIGTERM"
grep -E 'did not exit|spawner' "$SCN_DIR/vm/err" | quote "!"
[ "$VM_STATUS" = 0 ] || fail "bulkhead exited with status $VM_STATUS after SIGTERM, expected 0"
awk -v t="$took" 'BEGIN { exit !(t < 15) }' || fail "SIGTERM took $took s with a stopped device"
sleep 1
if [ -d "/proc/$dev" ] && [ "$(cat "/proc/$dev/comm" 2>/dev/null)" = bulkhead-block ]; then
	fail "the stopped device process $dev outlived the VMM"
fi
say "the stopped device process is gone"
exit 0
