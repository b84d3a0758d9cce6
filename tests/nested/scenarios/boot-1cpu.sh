#!/bin/sh
# timeout: 210
# One vCPU, 512M (the defaults: no --cpus/--memory): the guest reaches /init and sees what a
# virt-like arm64 machine should show; the VMM's stdin reaches the guest shell; `reboot -f`
# boots the guest again in the same process; `poweroff -f` ends the VMM with status 0.
# shellcheck disable=SC2016 # the commands typed into the guest expand there
. "${HARNESS_DIR:-/harness}/lib.sh"

vm_start vm --kernel "$GUEST_KERNEL" --initramfs "$GUEST_INITRAMFS" --cmdline "$GUEST_CMDLINE"
vm_wait_for vm '^GUEST-READY' "$BOOT_TIMEOUT"
say "guest ready $(elapsed vm) s after start"
vm_show_markers vm
check_guest vm 1 1 400000 524288

sleep 1
vm_send_until vm 'echo marker-$((6*7))' '^marker-42' 30
say "the guest shell answered: $(tr -d '\r' <"$SCN_DIR/vm/out" | grep -m 1 '^marker-42')"

id1=$(vm_marker vm INIT 1)
vm_send vm 'reboot -f'
vm_wait_for vm '^GUEST-READY' "$BOOT_TIMEOUT" 2
id2=$(vm_marker vm INIT 2)
say "second boot ready $(elapsed vm) s after start: $id2 (first: $id1)"
if [ -z "$id2" ] || [ "$id1" = "$id2" ]; then
	fail "second boot has the same boot id as the first ($id1)"
fi
check_guest vm 2 1 400000 524288
vm_send_until vm 'echo again-$((6*7))' '^again-42' 30

vm_send vm 'poweroff -f'
vm_wait_exit vm 30
say "bulkhead exited with status $VM_STATUS $(elapsed vm) s after start"
vm_no_panic vm
[ "$VM_STATUS" = 0 ] || fail "bulkhead exited with status $VM_STATUS after guest poweroff, expected 0"
