#!/bin/sh
# timeout: 300
# A vCPU thread that makes a syscall outside its seccomp filter kills the VMM with SIGSYS.
# /bin/bulkhead-seccomp-trigger is bulkhead built with the test-only `seccomp-trigger`
# feature: a guest write to 0x0a001000 makes the vCPU thread call socket(AF_INET, ...), which
# no VMM filter allows. The shell reports a death by SIGSYS as status 159 (128 + 31), and the
# guest prints nothing more. The normal build treats the same write as one to an unassigned
# address: logged, ignored, the guest goes on.
# shellcheck disable=SC2016 # the commands typed into the guest expand there
. "${HARNESS_DIR:-/harness}/lib.sh"

TRIGGER=0x0a001000
[ -x /bin/bulkhead-seccomp-trigger ] || fail "/bin/bulkhead-seccomp-trigger is not in L1 (see run.sh's build step)"

# seccomp_of PID: "<thread name>=<Seccomp mode>" for every thread of PID.
seccomp_of() {
	for t in /proc/"$1"/task/*; do
		echo "$(cat "$t/comm" 2>/dev/null)=$(awk '$1 == "Seccomp:" { print $2 }' "$t/status" 2>/dev/null)"
	done
}

# 1. The trigger build: the write kills the process.
# shellcheck disable=SC2034 # read by vm_start (lib.sh)
BULKHEAD=/bin/bulkhead-seccomp-trigger
vm_start trig --kernel "$GUEST_KERNEL" --initramfs "$GUEST_INITRAMFS" --cmdline "$GUEST_CMDLINE"
vm_wait_for trig '^GUEST-READY' "$BOOT_TIMEOUT"
say "guest ready $(elapsed trig) s after start"
sleep 1
vm_send_until trig 'echo ready-$((6*7))' '^ready-42' 30
threads=$(seccomp_of "$(vm_pid trig)" | tr '\n' ' ')
say "threads of the trigger build: $threads"
case " $threads" in *=0\ * | *=\ *) fail "a thread runs without a seccomp filter: $threads" ;; esac
dmesg -c >/dev/null 2>&1 || true
vm_send trig "devmem $TRIGGER 32 1; echo after-devmem-\$((6*7))"
vm_wait_exit trig 30
say "bulkhead-seccomp-trigger exited with status $VM_STATUS $(elapsed trig) s after start"
dmesg 2>/dev/null | grep -E 'type=1326|seccomp' | tail -n 3 | quote dmesg
tail -n 3 "$SCN_DIR/trig/err" | quote "!"
[ "$VM_STATUS" = 159 ] || fail "bulkhead-seccomp-trigger exited with status $VM_STATUS after the trigger write, expected 159 (SIGSYS)"
sleep 1
if tr -d '\r' <"$SCN_DIR/trig/out" | grep -q '^after-devmem-42'; then
	fail "the guest went on after the vCPU thread broke its filter"
fi
grep -q 'seccomp-trigger: the guest asked' "$SCN_DIR/trig/err" ||
	fail "the trigger build did not log the trigger (did the write reach the vCPU thread?)"
say "the vCPU thread died of SIGSYS at its socket() call; no guest output followed"

# 2. The normal build: the same write is ignored.
# shellcheck disable=SC2034 # read by vm_start (lib.sh)
BULKHEAD=/bin/bulkhead
vm_start vm --kernel "$GUEST_KERNEL" --initramfs "$GUEST_INITRAMFS" --cmdline "$GUEST_CMDLINE"
vm_wait_for vm '^GUEST-READY' "$BOOT_TIMEOUT"
say "guest ready $(elapsed vm) s after start"
sleep 1
vm_send_until vm 'echo ready-$((6*7))' '^ready-42' 30
vm_send vm "devmem $TRIGGER 32 1; echo after-devmem-\$((6*7))"
vm_wait_for vm '^after-devmem-42' 30
sleep 1
vm_exited vm && fail "the normal build exited after a write to an unassigned address"
grep -E 'unassigned address 0xa001000' "$SCN_DIR/vm/err" | head -n 1 | quote "!"
vm_send_until vm 'echo alive-$((20+22))' '^alive-42' 30
say "the normal build ignored the write and the guest still answers"
vm_send vm 'poweroff -f'
vm_wait_exit vm 30
vm_no_panic vm
[ "$VM_STATUS" = 0 ] || fail "bulkhead exited with status $VM_STATUS after guest poweroff, expected 0"
exit 0
