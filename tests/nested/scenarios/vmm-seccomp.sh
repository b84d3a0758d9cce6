#!/bin/sh
# timeout: 330
# Every thread of the VMM runs under a seccomp filter (/proc/<pid>/task/*/status says
# "Seccomp: 2") while a VM with a disk runs, and still after a guest reboot (new vCPU
# threads, disk re-initialised by the main thread); the disk works throughout. With
# --sandbox off no thread is filtered ("Seccomp: 0") and bulkhead warns about it.
# shellcheck disable=SC2016 # the commands typed into the guest expand there
. "${HARNESS_DIR:-/harness}/lib.sh"

dd if=/dev/zero of="$SCN_DIR/d.img" bs=1M count=16 2>/dev/null

# seccomp_of PID: "<thread name>=<Seccomp mode>" for every thread of PID, one a line.
seccomp_of() {
	for t in /proc/"$1"/task/*; do
		echo "$(cat "$t/comm" 2>/dev/null)=$(awk '$1 == "Seccomp:" { print $2 }' "$t/status" 2>/dev/null)"
	done
}

# check_threads PID MODE: every thread of PID has Seccomp MODE; the thread types are there.
check_threads() {
	_all=$(seccomp_of "$1")
	say "threads of $1: $(echo "$_all" | tr '\n' ' ')"
	_bad=$(echo "$_all" | grep -v "=$2\$" || true)
	[ -z "$_bad" ] || fail "threads without Seccomp: $2: $(echo "$_bad" | tr '\n' ' ')"
	for _t in bulkhead vcpu0 vcpu1 signals serial-in devices; do
		echo "$_all" | grep -q "^$_t=" || fail "no thread $_t in the VMM"
	done
}

vm_start vm --kernel "$GUEST_KERNEL" --initramfs "$GUEST_INITRAMFS" --cmdline "$GUEST_CMDLINE" \
	--cpus boot=2 -v --disk "path=$SCN_DIR/d.img,serial=seccomp-d0"
vm_wait_for vm '^GUEST-READY' "$BOOT_TIMEOUT"
say "guest ready $(elapsed vm) s after start"
tr -d '\r' <"$SCN_DIR/vm/out" | grep -E '^GUEST-DISK' | quote "|"
vmm=$(vm_pid vm)
sleep 1
vm_send_until vm 'echo IO-$(head -c 4096 /dev/urandom | tee /tmp/blk | dd of=/dev/vda bs=4096 conv=fsync 2>/dev/null && echo 3 >/proc/sys/vm/drop_caches && head -c 4096 /dev/vda | cmp - /tmp/blk && echo ok)' '^IO-' 60
[ "$(tr -d '\r' <"$SCN_DIR/vm/out" | grep -E '^IO-' | tail -n 1)" = IO-ok ] || fail "disk I/O failed under the filters"
check_threads "$vmm" 2
say "every VMM thread is filtered; disk I/O works"

vm_send vm 'reboot -f'
vm_wait_for vm '^GUEST-READY' "$BOOT_TIMEOUT" 2
say "second boot ready $(elapsed vm) s after start"
[ "$(vm_count vm '^GUEST-DISK vd. 32768 ro=0 serial=seccomp-d0')" -ge 2 ] || fail "the disk is missing after the reboot"
sleep 1
vm_send_until vm 'echo IO2-$(head -c 4096 /dev/vda | md5sum | cut -c1-32)' '^IO2-' 60
got=$(tr -d '\r' <"$SCN_DIR/vm/out" | sed -n 's/^IO2-//p' | tail -n 1)
want=$(head -c 4096 "$SCN_DIR/d.img" | md5sum | cut -c1-32)
say "after the reboot the guest reads $got from the disk; the image holds $want"
[ "$got" = "$want" ] || fail "the disk reads differently after the reboot"
check_threads "$vmm" 2
vm_send vm 'poweroff -f'
vm_wait_exit vm 60
say "bulkhead exited with status $VM_STATUS $(elapsed vm) s after start"
vm_no_panic vm
[ "$VM_STATUS" = 0 ] || fail "bulkhead exited with status $VM_STATUS after guest poweroff, expected 0"

# --sandbox off: nothing is filtered, loudly.
vm_start off --kernel "$GUEST_KERNEL" --initramfs "$GUEST_INITRAMFS" --cmdline "$GUEST_CMDLINE" \
	--cpus boot=2 --sandbox off --disk "path=$SCN_DIR/d.img"
vm_wait_for off '^GUEST-READY' "$BOOT_TIMEOUT"
grep -i 'sandbox off' "$SCN_DIR/off/err" | quote "!"
grep -q 'WARNING: --sandbox off' "$SCN_DIR/off/err" || fail "no warning on stderr for --sandbox off"
check_threads "$(vm_pid off)" 0
kill -TERM "$(vm_pid off)"
vm_wait_exit off 15
[ "$VM_STATUS" = 0 ] || fail "bulkhead --sandbox off exited with status $VM_STATUS after SIGTERM, expected 0"
exit 0
