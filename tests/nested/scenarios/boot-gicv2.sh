#!/bin/sh
# timeout: 150
# On a host whose KVM has no vGICv3 (L1 booted with gic-version=2), Bulkhead falls back to a
# vGICv2: the guest boots with 2 vCPUs on a GICv2 (and `--cpus pauth=off`: no pointer
# authentication) and powers off cleanly. More vCPUs than a GICv2 can address is a clear error.
. "${HARNESS_DIR:-/harness}/lib.sh"

vm_start vm --kernel "$GUEST_KERNEL" --initramfs "$GUEST_INITRAMFS" --cmdline "$GUEST_CMDLINE" \
	--cpus boot=2,pauth=off -v
vm_wait_for vm '^GUEST-READY' "$BOOT_TIMEOUT"
say "guest ready $(elapsed vm) s after start"
vm_show_markers vm
check_guest vm 1 2 400000 524288
grep -q 'falling back to GICv2' "$SCN_DIR/vm/err" || fail "bulkhead did not log the GICv2 fallback"
# --cpus pauth=off: the guest's CPU has no pointer authentication (L1's has).
grep -q 'pointer authentication off (--cpus pauth=off)' "$SCN_DIR/vm/err" ||
	fail "bulkhead did not log pointer authentication off for --cpus pauth=off"
case " $(vm_marker vm CPU-FEATURES) " in
*" paca "* | *" pacg "*) fail "the guest has pointer authentication under --cpus pauth=off: $(vm_marker vm CPU-FEATURES)" ;;
esac
sleep 1
vm_send vm 'poweroff -f'
vm_wait_exit vm 30
say "bulkhead exited with status $VM_STATUS $(elapsed vm) s after start"
vm_no_panic vm
[ "$VM_STATUS" = 0 ] || fail "bulkhead exited with status $VM_STATUS after guest poweroff, expected 0"

vm_start big --kernel "$GUEST_KERNEL" --initramfs "$GUEST_INITRAMFS" --cpus boot=9
vm_wait_exit big 60
err=$(grep -m 1 'VM failed' "$SCN_DIR/big/err" || true)
say "9 vCPUs on a GICv2: status $VM_STATUS, stderr: $err"
vm_no_panic big
[ "$VM_STATUS" = 1 ] || fail "9 vCPUs on a GICv2 gave status $VM_STATUS, expected 1"
case $err in *"at most 8"*) ;; *) fail "the error does not explain the GICv2 limit: '$err'" ;; esac
exit 0
