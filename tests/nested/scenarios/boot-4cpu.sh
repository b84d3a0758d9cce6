#!/bin/sh
# timeout: 150
# Four vCPUs (on L1's two), 1G: all CPUs come up, the memory is there; poweroff gives status 0.
# The most root ports (--pci-slots 31): the guest gives the last one bus 31 (the ECAM window
# covers buses 0-31).
# shellcheck disable=SC2016 # the commands typed into the guest expand there
. "${HARNESS_DIR:-/harness}/lib.sh"

vm_start vm --kernel "$GUEST_KERNEL" --initramfs "$GUEST_INITRAMFS" --cmdline "$GUEST_CMDLINE" \
	--cpus boot=4 --memory size=1G --pci-slots 31
vm_wait_for vm '^GUEST-READY' "$BOOT_TIMEOUT"
say "guest ready $(elapsed vm) s after start"
vm_show_markers vm
check_guest vm 1 4 900000 1048576

sleep 1
vm_send_until vm 'echo cpus-$(nproc)' '^cpus-4' 30
vm_send vm 'echo BUS-$(cat /sys/bus/pci/devices/0000:00:1f.0/secondary_bus_number)'
vm_wait_for vm '^BUS-' 20
bus=$(tr -d '\r' <"$SCN_DIR/vm/out" | grep '^BUS-' | tail -n 1)
say "root port 00:1f.0 (slot 31): secondary bus ${bus#BUS-}"
[ "$bus" = BUS-31 ] || fail "the 31st root port has no bus 31 ($bus): the ECAM window is too small"
vm_send vm 'poweroff -f'
vm_wait_exit vm 30
say "bulkhead exited with status $VM_STATUS $(elapsed vm) s after start"
vm_no_panic vm
[ "$VM_STATUS" = 0 ] || fail "bulkhead exited with status $VM_STATUS after guest poweroff, expected 0"
