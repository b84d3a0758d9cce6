#!/bin/sh
# timeout: 200
# --device-uid UID:GID (a root VMM): the device process runs as that host uid and gid (as seen
# from outside its user namespace), unprivileged, and still serves the guest's disk.
# The child takes the mapped ids itself (setresgid/setresuid(0) inside its namespace, after
# the parent wrote the maps): before that fix it kept host uid 0 ("Uid 0 0 0 0" in L1).
# shellcheck disable=SC2016 # the commands typed into the guest expand there
. "${HARNESS_DIR:-/harness}/lib.sh"
[ "$(id -u)" = 0 ] || fail "L1 runs the scenarios as root; --device-uid needs a root VMM"
dd if=/dev/zero of="$SCN_DIR/u.img" bs=1M count=16 2>/dev/null
vm_start vm --kernel "$GUEST_KERNEL" --initramfs "$GUEST_INITRAMFS" --cmdline "$GUEST_CMDLINE" \
	--disk "path=$SCN_DIR/u.img" --device-uid 4321:4322
vm_wait_for vm '^GUEST-READY' "$BOOT_TIMEOUT"
say "guest ready $(elapsed vm) s after start"
vmm=$(vm_pid vm)
dev=$(devices_of "$vmm" bulkhead-block | tail -n 1)
[ -n "$dev" ] || fail "no device process under VMM $vmm"
st() { awk -v k="$1:" '$1 == k { print $2, $3, $4, $5 }' "/proc/$dev/status"; }
say "device process $dev: Uid $(st Uid), Gid $(st Gid), CapEff $(st CapEff); VMM Uid $(awk '$1 == "Uid:" { print $2 }' "/proc/$vmm/status")"
[ "$(st Uid)" = "4321 4321 4321 4321" ] || fail "the device process does not run as host uid 4321"
[ "$(st Gid)" = "4322 4322 4322 4322" ] || fail "the device process does not run as host gid 4322"
# The disk still works: write and read back through the device process.
vm_send_until vm 'echo hello | dd of=/dev/vda conv=fsync 2>/dev/null; echo 3 >/proc/sys/vm/drop_caches; echo uid-$(head -c 5 /dev/vda)' '^uid-hello' 60
say "the guest wrote and read its disk through the device process running as 4321"
vm_send vm "poweroff -f"
vm_wait_exit vm 60
[ "$VM_STATUS" = 0 ] || fail "bulkhead exited with status $VM_STATUS, expected 0"
exit 0
