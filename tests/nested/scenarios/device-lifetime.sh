#!/bin/sh
# timeout: 200
# A device process that dies does not take the VM with it: the VMM logs which device died and
# how, and the guest's console still answers. A device process never outlives the VMM, even
# when the VMM is killed outright.
# shellcheck disable=SC2016 # the commands typed into the guest expand there
. "${HARNESS_DIR:-/harness}/lib.sh"
dd if=/dev/zero of="$SCN_DIR/a.img" bs=1M count=16 2>/dev/null
dd if=/dev/zero of="$SCN_DIR/b.img" bs=1M count=16 2>/dev/null

children() { devices_of "$1" bulkhead-block; } # children VMM: its bulkhead-block processes

vm_start vm --kernel "$GUEST_KERNEL" --initramfs "$GUEST_INITRAMFS" --cmdline "$GUEST_CMDLINE" \
	--disk "path=$SCN_DIR/a.img" --disk "path=$SCN_DIR/b.img"
vm_wait_for vm '^GUEST-READY' "$BOOT_TIMEOUT"
say "guest ready $(elapsed vm) s after start"
vmm=$(vm_pid vm)
kids=$(children "$vmm")
say "device processes of VMM $vmm: $(echo $kids)"
[ "$(echo "$kids" | wc -w)" = 2 ] || fail "expected 2 device processes, found: $kids"

victim=$(echo "$kids" | head -n 1)
say "kill -KILL device process $victim"
kill -KILL "$victim"
sleep 2
vm_exited vm && fail "the VMM exited when a device process died"
grep -E "device process $victim was killed by signal 9" "$SCN_DIR/vm/err" | quote "!"
grep -qE "disk[0-9]: device process $victim was killed by signal 9" "$SCN_DIR/vm/err" ||
	fail "the VMM did not log which device died and how"
sleep 1
vm_send_until vm 'echo alive-$((20+22))' '^alive-42' 60
say "the guest still answers on its console"

survivor=$(echo "$kids" | tail -n 1)
say "kill -KILL the VMM ($vmm)"
kill -KILL "$vmm"
vm_wait_exit vm 30
sleep 2
if [ -d "/proc/$survivor" ] && grep -q bulkhead-block "/proc/$survivor/comm" 2>/dev/null; then
	fail "device process $survivor outlived the VMM"
fi
say "device process $survivor is gone with the VMM"

# A start that fails after a device process was started: every device's process is started
# before the first handshake (Devices::start), so the first disk's bulkhead-block runs when the
# second disk's backend turns out not to be there. The VMM fails with a message naming it, and
# the started process does not outlive the VMM (the spawner kills it on the VMM's hang-up).
timeout -s KILL 60 "$BULKHEAD" -v --kernel "$GUEST_KERNEL" --initramfs "$GUEST_INITRAMFS" \
	--cmdline "$GUEST_CMDLINE" --disk "path=$SCN_DIR/a.img" --disk "socket=$SCN_DIR/absent.sock" \
	</dev/null >"$SCN_DIR/half.out" 2>"$SCN_DIR/half.err"
st=$?
msg=$(grep -m 1 'absent.sock' "$SCN_DIR/half.err")
say "a VM whose second disk's backend is absent: status $st, stderr: ${msg:-<nothing about it>}"
[ "$st" = 1 ] || fail "status $st, expected 1 (the VM failed to start)"
[ -n "$msg" ] || fail "the VMM did not say which backend was missing"
grep -q "started .*bulkhead-block" "$SCN_DIR/half.err" ||
	fail "the first disk's process was not started before the failure: this case tests nothing"
grep -q panicked "$SCN_DIR/half.err" && fail "the VMM panicked"
n=0
while ps -o comm | grep -q '^bulkhead-block' && [ "$n" -lt 50 ]; do
	sleep 0.1
	n=$((n + 1))
done
if ps -o comm | grep -q '^bulkhead-block'; then
	fail "a bulkhead-block process outlived the failed start"
fi
say "no device process outlived the failed start"
exit 0
