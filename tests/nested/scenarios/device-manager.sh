#!/bin/sh
# timeout: 240
# The device manager and its spawner: a device process is named bulkhead-block (its comm), is
# a child of the VMM's spawner (bulkhead-spawn), not of the VMM, and was started while the
# VMM's main thread is under its seccomp filter (Seccomp: 2), and so is the spawner (its own); its log lines reach the VMM's
# stderr prefixed with its id; it sits in its own cgroup v2 leaf with memory.max (its budget
# plus guest RAM) and pids.max, and a raised oom_score_adj; its image is locked, so a second
# VM asking for the same writable image exits with status 2 and a clear message, starting
# nothing, while the first runs on; a read-only image is shared by readers.
. "${HARNESS_DIR:-/harness}/lib.sh"

dd if=/dev/zero of="$SCN_DIR/d.img" bs=1M count=16 2>/dev/null
dd if=/dev/zero of="$SCN_DIR/r.img" bs=1M count=16 2>/dev/null
vm_start vm --kernel "$GUEST_KERNEL" --initramfs "$GUEST_INITRAMFS" --cmdline "$GUEST_CMDLINE" \
	--memory size=256M --disk "path=$SCN_DIR/d.img,id=data,pids_max=90" \
	--disk "path=$SCN_DIR/r.img,readonly=on,memory_max=64M"
vm_wait_for vm '^GUEST-READY' "$BOOT_TIMEOUT"
say "guest ready $(elapsed vm) s after start"
vmm=$(vm_pid vm)

ppid_of() { awk '{ print $4 }' "/proc/$1/stat" 2>/dev/null; }
spawner=$(spawner_of "$vmm")
[ -n "$spawner" ] || fail "no bulkhead-spawn child of the VMM $vmm"
devs=
for p in $(children_of "$spawner"); do devs="$devs $p"; done
say "VMM $vmm, spawner $spawner, device processes:$devs"
[ "$(echo $devs | wc -w)" = 2 ] || fail "expected 2 device processes under the spawner, found:$devs"
for d in $devs; do
	comm=$(cat "/proc/$d/comm")
	say "device process $d: comm $comm, parent $(ppid_of "$d"), oom_score_adj $(cat "/proc/$d/oom_score_adj")"
	[ "$comm" = bulkhead-block ] || fail "device process $d is named $comm, not bulkhead-block"
	[ "$(cat "/proc/$d/oom_score_adj")" -gt "$(cat "/proc/$vmm/oom_score_adj")" ] ||
		fail "the device's oom_score_adj is not above the VMM's"
done
main_seccomp=$(awk '$1 == "Seccomp:" { print $2 }' "/proc/$vmm/status")
say "VMM main thread Seccomp: $main_seccomp; spawner Seccomp: $(awk '$1 == "Seccomp:" { print $2 }' "/proc/$spawner/status")"
[ "$main_seccomp" = 2 ] || fail "the VMM's main thread is not under its filter"
[ "$(awk '$1 == "Seccomp:" { print $2 }' "/proc/$spawner/status")" = 2 ] || fail "the spawner is not under its own filter"
for d in $devs; do [ "$(ppid_of "$d")" != "$vmm" ] || fail "device $d is a child of the VMM"; done
say "the devices are children of the spawner, the VMM's main thread is filtered"

# Logs: each device line on the VMM's stderr starts with its id.
grep -E '^(data|disk1): ' "$SCN_DIR/vm/err" | head -n 4 | quote "!"
grep -qE '^data: .*seccomp filter installed' "$SCN_DIR/vm/err" || fail "no 'data: ' prefixed device log line on the VMM's stderr"
grep -qE '^disk1: ' "$SCN_DIR/vm/err" || fail "no 'disk1: ' prefixed device log line"
if grep -vE '^(data|disk1): ' "$SCN_DIR/vm/err" | grep -qE 'seccomp filter installed'; then
	fail "a device log line reached the VMM's stderr without its id"
fi
say "device log lines arrive prefixed with the device id"

# cgroup leaves.
for d in $devs; do
	cg=$(sed -n 's/^0:://p' "/proc/$d/cgroup")
	say "device $d cgroup (as it sees it) $cg"
done
vmm_cg=$(sed -n 's/^0:://p' "/proc/$vmm/cgroup")
say "VMM cgroup $vmm_cg"
group=/sys/fs/cgroup${vmm_cg%/vmm}
[ "${vmm_cg##*/}" = vmm ] || fail "the VMM is not in its own vmm leaf"
for leaf in data disk1; do
	[ -d "$group/$leaf" ] || fail "no cgroup leaf $group/$leaf"
	say "$group/$leaf: memory.max $(cat "$group/$leaf/memory.max"), pids.max $(cat "$group/$leaf/pids.max"), procs $(cat "$group/$leaf/cgroup.procs" | tr '\n' ' ')"
	[ -n "$(cat "$group/$leaf/cgroup.procs")" ] || fail "no process in $group/$leaf"
done
[ "$(cat "$group/data/memory.max")" = $(((256 << 20) + (256 << 20))) ] || fail "data: memory.max is not 256 MiB budget + 256 MiB guest RAM"
[ "$(cat "$group/data/pids.max")" = 90 ] || fail "data: pids.max is not 90 (pids_max=90)"
[ "$(cat "$group/disk1/memory.max")" = $(((64 << 20) + (256 << 20))) ] || fail "disk1: memory.max is not 64 MiB + 256 MiB guest RAM"
[ "$(cat "$group/disk1/pids.max")" = 68 ] || fail "disk1: pids.max is not the default 68"
say "each device is in its own cgroup leaf with memory.max and pids.max"

# Locks: a second VM on the same writable image is refused, starting nothing.
vm_start second --kernel "$GUEST_KERNEL" --initramfs "$GUEST_INITRAMFS" --cmdline "$GUEST_CMDLINE" \
	--disk "path=$SCN_DIR/d.img"
vm_wait_exit second 30
quote "!" <"$SCN_DIR/second/err"
[ "$VM_STATUS" = 2 ] || fail "the second VM exited with status $VM_STATUS, expected 2"
grep -q "in use" "$SCN_DIR/second/err" || fail "the second VM did not say the image is in use"
grep -q 'bulkhead-block' "$SCN_DIR/second/err" && fail "the second VM started a device process"
vm_exited vm && fail "the first VM stopped"
say "a second VM asking for the writable image exits 2 with a clear message"
# A reader of the read-only image shares it (it gets past the lock; it then runs).
vm_start reader --kernel "$GUEST_KERNEL" --initramfs "$GUEST_INITRAMFS" --cmdline "$GUEST_CMDLINE" \
	--disk "path=$SCN_DIR/r.img,readonly=on" --serial off
sleep 5
vm_exited reader && { quote "!" <"$SCN_DIR/reader/err"; fail "a second reader of the read-only image was refused"; }
kill -TERM "$(vm_pid reader)"
vm_wait_exit reader 30
say "a second reader shares the read-only image"

vm_send vm "poweroff -f"
vm_wait_exit vm 60
[ "$VM_STATUS" = 0 ] || fail "bulkhead exited with status $VM_STATUS, expected 0"
sleep 1
for leaf in data disk1; do
	[ -d "$group/$leaf" ] && fail "cgroup leaf $group/$leaf is left behind"
done
say "the device cgroup leaves are removed after the devices exit"
exit 0
