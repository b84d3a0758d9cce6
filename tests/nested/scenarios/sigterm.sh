#!/bin/sh
# timeout: 150
# SIGTERM to a running VMM is a clean shutdown: it exits with status 0 within a few seconds.
. "${HARNESS_DIR:-/harness}/lib.sh"

vm_start vm --kernel "$GUEST_KERNEL" --initramfs "$GUEST_INITRAMFS" --cmdline "$GUEST_CMDLINE" \
	--cpus boot=2
vm_wait_for vm '^GUEST-READY' "$BOOT_TIMEOUT"
say "guest ready $(elapsed vm) s after start"
vm_show_markers vm

t0=$(now)
say "kill -TERM $(vm_pid vm)"
kill -TERM "$(vm_pid vm)"
vm_wait_exit vm 10
say "bulkhead exited with status $VM_STATUS $(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }') s after SIGTERM"
vm_no_panic vm
[ "$VM_STATUS" = 0 ] || fail "bulkhead exited with status $VM_STATUS after SIGTERM, expected 0"
