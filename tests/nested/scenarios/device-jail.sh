#!/bin/sh
# timeout: 450
# Every device process of a running VM is jailed: seccomp filter on (mode 2), no_new_privs,
# no capabilities, its own user, mount, pid and net namespaces, an empty root, and no
# descriptors but the ones it was handed (log pipe, socket, control socket, image, inflight
# memfd, /dev/null) and the anonymous
# ones the vhost-user protocol gives it (guest RAM memfd, eventfds) or it makes (epoll,
# io_uring).
. "${HARNESS_DIR:-/harness}/lib.sh"
dd if=/dev/zero of="$SCN_DIR/d.img" bs=1M count=16 2>/dev/null
vm_start vm --kernel "$GUEST_KERNEL" --initramfs "$GUEST_INITRAMFS" --cmdline "$GUEST_CMDLINE" \
	--disk "path=$SCN_DIR/d.img" -v
vm_wait_for vm '^GUEST-READY' "$BOOT_TIMEOUT"
say "guest ready $(elapsed vm) s after start"
vmm=$(vm_pid vm)
dev=$(devices_of "$vmm" bulkhead-block | tail -n 1)
[ -n "$dev" ] || fail "no device process under VMM $vmm"
grep -E 'started .*bulkhead-block' "$SCN_DIR/vm/err" | quote "!"
grep -qE 'started .*bulkhead-block \(pid [0-9]+, jailed\)' "$SCN_DIR/vm/err" || fail "the VMM did not start the device jailed"

st() { awk -v k="$1:" '$1 == k { print $2 }' "/proc/$dev/status"; }
say "device process $dev: Seccomp $(st Seccomp), NoNewPrivs $(st NoNewPrivs), CapEff $(st CapEff), CapPrm $(st CapPrm), CapBnd $(st CapBnd)"
[ "$(st Seccomp)" = 2 ] || fail "seccomp is not in filter mode"
[ "$(st NoNewPrivs)" = 1 ] || fail "no_new_privs is not set"
[ "$(st CapEff)" = 0000000000000000 ] || fail "the device process has effective capabilities"
for ns in user mnt pid net ipc uts cgroup; do
	a=$(readlink "/proc/$vmm/ns/$ns")
	b=$(readlink "/proc/$dev/ns/$ns")
	say "namespace $ns: VMM $a, device $b"
	[ "$a" != "$b" ] || fail "the device process shares the VMM's $ns namespace"
done
# The root must be readable from here for "empty" to mean anything: an unreadable root (a
# listing that fails) is a failure, not zero entries. The mount table seen from inside gives
# the same answer from a second angle: a tmpfs root.
listing=$(ls -A "/proc/$dev/root/" 2>&1) || fail "cannot list the device's root: $listing"
[ -d "/proc/$dev/root/." ] || fail "the device's root is not a directory from here"
entries=$(printf '%s' "$listing" | grep -c . || true)
rootfs=$(awk '$2 == "/" { print $3 }' "/proc/$dev/mounts" | tail -n 1)
say "root directory entries: $entries, root file system: $rootfs"
[ "$entries" = 0 ] || fail "the device's root is not empty: $(printf '%s' "$listing" | tr '\n' ' ')"
[ "$rootfs" = tmpfs ] || fail "the device's root is $rootfs, not its own tmpfs"
bad=
for fd in "/proc/$dev/fd/"*; do
	n=${fd##*/}
	t=$(readlink "$fd")
	say "fd $n -> $t"
	case $n:$t in
	0:/dev/null | 1:/dev/null | 2:pipe:\[*\] | 3:socket:\[*\] | 4:socket:\[*\] | 5:"$SCN_DIR/d.img") ;;
	*:anon_inode:\[eventfd\] | *:anon_inode:\[eventpoll\] | *:anon_inode:\[io_uring\]) ;;
	*:/memfd:bulkhead-guest-ram* | *:"/bulkhead-guest-ram (deleted)") ;; # guest RAM: memfd, or the private tmpfs's file (docs/memory.md)
	6:/memfd:bulkhead-inflight*) ;; # the inflight region the VMM hands in (--inflight-fd, docs/restart.md)
	*) bad="$bad $n($t)" ;;
	esac
done
[ -z "$bad" ] || fail "descriptors the jail did not hand over:$bad"

sleep 1
vm_send vm "poweroff -f"
vm_wait_exit vm 60
[ "$VM_STATUS" = 0 ] || fail "bulkhead exited with status $VM_STATUS, expected 0"
exit 0
