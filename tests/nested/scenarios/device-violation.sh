#!/bin/sh
# timeout: 200
# A device process killed by its seccomp filter is logged by the VMM with the syscall's name,
# which the spawner takes from the kernel's own audit record of the kill (type=1326 in the
# kernel log, matched by pid), not from the device, which is assumed compromised. The device
# here is the jail probe run as bulkhead-block (a copy of bulkhead and one of the probe under
# that name, side by side, so the VMM's device manager spawns it as the block device): the
# real block device behind one more filter that kills it at its first file read or disk I/O
# after start-up (the check of the guest memory table when the guest's virtio_blk driver
# activates it; that probe then never ends, so the guest does not reach its prompt: the guest going on after a device's death is device-lifetime's).
# The VMM stays up and SIGTERM still ends it.
. "${HARNESS_DIR:-/harness}/lib.sh"

[ -x /bin/bulkhead-jail-probe ] || fail "no /bin/bulkhead-jail-probe in L1"
mkdir -p "$SCN_DIR/bin"
cp "$BULKHEAD" "$SCN_DIR/bin/bulkhead"
cp /bin/bulkhead-jail-probe "$SCN_DIR/bin/bulkhead-block"
BULKHEAD=$SCN_DIR/bin/bulkhead
dd if=/dev/zero of="$SCN_DIR/v.img" bs=1M count=16 2>/dev/null
say "kernel: audit records in the log so far: $(dmesg | grep -c 'type=1326')"

vm_start vm --kernel "$GUEST_KERNEL" --initramfs "$GUEST_INITRAMFS" --cmdline "$GUEST_CMDLINE" \
	--disk "path=$SCN_DIR/v.img,id=bad"
end=$(($(now_s) + BOOT_TIMEOUT))
until grep -q 'killed by signal 31 (seccomp)' "$SCN_DIR/vm/err"; do
	vm_exited vm && fail "bulkhead exited before its device was killed"
	[ "$(now_s)" -lt "$end" ] || fail "the VMM logged no seccomp kill of the device within $BOOT_TIMEOUT s"
	sleep 0.5
done
say "the device was killed $(elapsed vm) s after start"
grep -E '^bad: |killed by signal' "$SCN_DIR/vm/err" | quote "!"
dmesg | grep 'type=1326' | tail -n 3 | quote "k"
line=$(grep 'killed by signal 31 (seccomp)' "$SCN_DIR/vm/err")
echo "$line" | grep -qE 'bad: device process [0-9]+ was killed by signal 31 \(seccomp\): syscall (io_uring_enter|preadv|pwritev|pread64) \([0-9]+\)' ||
	fail "the VMM did not name the syscall the device was killed for"
pid=$(echo "$line" | sed -n 's/.*device process \([0-9]*\) was killed.*/\1/p')
dmesg | grep 'type=1326' | grep -q " pid=$pid " || fail "no audit record of pid $pid in the kernel log"
say "the VMM named the syscall from the kernel's audit record of pid $pid"
# A seccomp kill is what a compromised device does: not restarted by default (docs/restart.md).
sleep 1
grep -E 'bad: DEVICE PROCESS NOT RESTARTED' "$SCN_DIR/vm/err" | quote "!"
grep -q 'bad: DEVICE PROCESS NOT RESTARTED: its seccomp filter killed it' "$SCN_DIR/vm/err" ||
	fail "the VMM did not refuse to restart a device its seccomp filter killed"
[ "$(grep -c 'started in place of the one that died' "$SCN_DIR/vm/err")" = 0 ] ||
	fail "a device killed by its seccomp filter was restarted"
vm_exited vm && fail "the VMM exited when its device was killed"
kill -TERM "$(vm_pid vm)"
vm_wait_exit vm 30
say "SIGTERM ended the VMM (status $VM_STATUS)"
exit 0
