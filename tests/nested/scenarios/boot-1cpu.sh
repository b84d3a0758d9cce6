#!/bin/sh
# timeout: 210
# One vCPU, 512M (the defaults: no --cpus/--memory): the guest reaches /init and sees what a
# virt-like arm64 machine should show; the VMM's stdin reaches the guest shell; `reboot -f`
# boots the guest again in the same process; `poweroff -f` ends the VMM with status 0. The VMM
# says that the console's output and bus 0's configuration reads go without exits (KVM's
# coalesced MMIO and a read-only slot), and the guest's markers (root ports, console) come
# through them.
# shellcheck disable=SC2016 # the commands typed into the guest expand there
. "${HARNESS_DIR:-/harness}/lib.sh"

vm_start vm -v --kernel "$GUEST_KERNEL" --initramfs "$GUEST_INITRAMFS" --cmdline "$GUEST_CMDLINE"
vm_wait_for vm '^GUEST-READY' "$BOOT_TIMEOUT"
say "guest ready $(elapsed vm) s after start"
vm_show_markers vm
check_guest vm 1 1 400000 524288
for what in 'console: KVM queues' "PCI: bus 0's configuration registers are read from memory"; do
	line=$(grep -m 1 "$what" "$SCN_DIR/vm/err") || fail "no '$what' line in bulkhead's log"
	say "bulkhead: ${line#*] }"
done
ports=$(vm_count vm '^GUEST-PCI 0000:00:0[1-8]\.0 1b36:000c 0x060400 pcieport')
[ "$ports" = 8 ] || fail "the guest found $ports root ports with pcieport bound, expected 8"

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
# A new VM after the reset: the read-only slots are given to it again.
ports=$(vm_count vm '^GUEST-PCI 0000:00:0[1-8]\.0 1b36:000c 0x060400 pcieport')
[ "$ports" = 16 ] || fail "after the reboot the guest found $((ports - 8)) root ports with pcieport bound, expected 8"
vm_send_until vm 'echo again-$((6*7))' '^again-42' 30

vm_send vm 'poweroff -f'
vm_wait_exit vm 30
say "bulkhead exited with status $VM_STATUS $(elapsed vm) s after start"
vm_no_panic vm
[ "$VM_STATUS" = 0 ] || fail "bulkhead exited with status $VM_STATUS after guest poweroff, expected 0"
