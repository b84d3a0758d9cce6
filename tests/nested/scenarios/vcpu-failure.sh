#!/bin/sh
# timeout: 120
# A vCPU failure ends the VMM with a non-zero status and an error naming what happened: the
# guest reads unassigned MMIO with a load pair, which KVM cannot decode (KVM_RUN fails).
. "${HARNESS_DIR:-/harness}/lib.sh"

vm_start vm --kernel "$GUEST_KERNEL" --initramfs "$GUEST_INITRAMFS" --cmdline "$GUEST_CMDLINE" \
	--cpus boot=2
vm_wait_for vm '^GUEST-READY' "$BOOT_TIMEOUT"
say "guest ready $(elapsed vm) s after start"
sleep 1
vm_send vm 'mmio-nisv 0x0a000000'
vm_wait_for vm 'mmio-nisv: load pair' 30
vm_wait_exit vm 30
say "bulkhead exited with status $VM_STATUS $(elapsed vm) s after start"
vm_no_panic vm
err=$(grep -m 1 'VM failed' "$SCN_DIR/vm/err" || true)
say "stderr: $err"
[ "$VM_STATUS" = 1 ] || fail "bulkhead exited with status $VM_STATUS after an undecodable MMIO access, expected 1"
case $err in
*"KVM_RUN failed"*"cannot decode"*) ;;
*) fail "the error does not name the failed KVM_RUN and its cause: '$err'" ;;
esac
grep -q 'mmio-nisv: survived' "$SCN_DIR/vm/out" && fail "the guest went on after the undecodable access"
exit 0
