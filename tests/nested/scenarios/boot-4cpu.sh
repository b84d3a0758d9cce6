#!/bin/sh
# timeout: 150
# Four vCPUs (on L1's two), 1G: all CPUs come up, the memory is there; poweroff gives status 0.
# shellcheck disable=SC2016 # the commands typed into the guest expand there
. "${HARNESS_DIR:-/harness}/lib.sh"

vm_start vm --kernel "$GUEST_KERNEL" --initramfs "$GUEST_INITRAMFS" --cmdline "$GUEST_CMDLINE" \
	--cpus boot=4 --memory size=1G
vm_wait_for vm '^GUEST-READY' "$BOOT_TIMEOUT"
say "guest ready $(elapsed vm) s after start"
vm_show_markers vm
check_guest vm 1 4 900000 1048576

sleep 1
vm_send_until vm 'echo cpus-$(nproc)' '^cpus-4' 30
vm_send vm 'poweroff -f'
vm_wait_exit vm 30
say "bulkhead exited with status $VM_STATUS $(elapsed vm) s after start"
vm_no_panic vm
[ "$VM_STATUS" = 0 ] || fail "bulkhead exited with status $VM_STATUS after guest poweroff, expected 0"
