#!/bin/sh
# timeout: 240
# The REST API (docs/api.md) through bulkhead-ctl: the socket is mode 0600; a second VMM on the
# same socket is refused (status 2); vmm.ping answers with the VMM's pid; vm.info lists the disk
# with its id, kind, PCI address, process and state; vm.counters has the disk's reads and
# restarts; vm.pause stops the guest (no answer, state Paused) and vm.resume lets it go on; bad
# requests (unknown endpoint, wrong method, bad JSON, missing or bad fields, an oversized body,
# vm.create and vm.boot of a booted VM) each get a 4xx JSON error and the guest keeps running;
# vm.power-button raises the PL061's interrupt in the guest (GPIO line 3 through sysfs, both
# edges: its count in /proc/interrupts goes up; the cloud kernel has no gpio-keys driver);
# vm.reboot boots the guest again; vm.shutdown ends the VMM with status 0.
# shellcheck disable=SC2016 # the commands typed into the guest expand there
. "${HARNESS_DIR:-/harness}/lib.sh"

CTL=${CTL:-/bin/bulkhead-ctl}
sock=$SCN_DIR/api.sock
ctl() { "$CTL" --api-socket "$sock" "$@"; }

# expect_status CODE ARGS...: bulkhead-ctl ARGS fails with HTTP status CODE.
expect_status() {
	_want=$1
	shift
	if ctl "$@" >"$SCN_DIR/ctl.out" 2>"$SCN_DIR/ctl.err"; then
		fail "bulkhead-ctl $* succeeded, expected $_want"
	fi
	_msg=$(cat "$SCN_DIR/ctl.err")
	case $_msg in *": $_want: "*) ;; *) fail "bulkhead-ctl $*: expected status $_want, got: $_msg" ;; esac
	say "  $1 ${2:-} ${3:-} -> $_want: ${_msg#*: "$_want": }"
}

dd if=/dev/zero of="$SCN_DIR/d0" bs=1M count=8 2>/dev/null
vm_start vm --kernel "$GUEST_KERNEL" --initramfs "$GUEST_INITRAMFS" --cmdline "$GUEST_CMDLINE" \
	--cpus boot=2 -v --api-socket "$sock" --disk "path=$SCN_DIR/d0,id=data"
vm_wait_for vm '^GUEST-READY' "$BOOT_TIMEOUT"
say "guest ready $(elapsed vm) s after start"

mode=$(stat -c '%a %U' "$sock")
say "socket $sock: mode and owner $mode"
case $mode in "600 "*) ;; *) fail "API socket mode is '$mode', expected 600" ;; esac

# A second VMM on the same socket: refused as bad input before any guest starts.
vm_start vm2 --kernel "$GUEST_KERNEL" --initramfs "$GUEST_INITRAMFS" --api-socket "path=$sock"
vm_wait_exit vm2 20
say "a second VMM on the same socket exited with status $VM_STATUS: $(tail -n 1 "$SCN_DIR/vm2/err")"
[ "$VM_STATUS" = 2 ] || fail "a second VMM on the socket exited with $VM_STATUS, expected 2"
grep -q 'another process is listening' "$SCN_DIR/vm2/err" || fail "no 'another process is listening' from the second VMM"

t0=$(now)
ping=$(ctl ping) || fail "vmm.ping failed"
say "vmm.ping in $(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.3f", b - a }') s: $(echo "$ping" | tr -d ' \n')"
echo "$ping" | grep -q "\"pid\": $(vm_pid vm)" || fail "vmm.ping does not report the VMM's pid $(vm_pid vm)"

info=$(ctl info) || fail "vm.info failed"
echo "$info" | tr -d ' \n' | sed 's/"devices"/\n"devices"/' | quote "info"
flat=$(echo "$info" | tr -d ' \n')
echo "$flat" | grep -q '"state":"Running"' || fail "vm.info: no state Running"
dev=$(echo "$flat" | sed -n 's/.*"devices":\[\([^]]*\)\].*/\1/p')
case $dev in *'"id":"data"'*) ;; *) fail "vm.info lists no device 'data': $dev" ;; esac
case $dev in *'"kind":"block"'*) ;; *) fail "vm.info: the disk is not of kind block: $dev" ;; esac
case $dev in *'"bdf":"0000:01:00.0"'*) ;; *) fail "vm.info: the disk is not at 0000:01:00.0: $dev" ;; esac
case $dev in *'"state":"running"'*) ;; *) fail "vm.info: the disk's process is not running: $dev" ;; esac
pid=$(echo "$dev" | sed -n 's/.*"pid":\([0-9]*\).*/\1/p')
[ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = bulkhead-block ] ||
	fail "vm.info's pid '$pid' is not a bulkhead-block process"
say "vm.info: disk 'data' at 0000:01:00.0, served by bulkhead-block pid $pid"

# vm.counters: the disk's process reports its counters (the guest read its partition table).
counters=$(ctl counters | tr -d ' \n') || fail "vm.counters failed"
say "vm.counters: $counters"
reads=$(echo "$counters" | sed -n 's/.*"data":{[^}]*"reads":\([0-9]*\).*/\1/p')
[ -n "$reads" ] && [ "$reads" -gt 0 ] || fail "vm.counters has no reads for disk data: $counters"
echo "$counters" | grep -q '"data":{[^}]*"restarts":0' || fail "vm.counters has no restarts for disk data: $counters"

say "bad requests:"
expect_status 404 raw GET vm.nothing
expect_status 404 raw GET /v1/vm.info
expect_status 400 raw PUT vm.info
expect_status 400 raw GET vm.reboot
expect_status 400 raw PUT vm.add-disk '{"path": '
expect_status 400 raw PUT vm.add-disk '{}'
expect_status 400 raw PUT vm.add-disk "{\"path\": \"$SCN_DIR/d0\", \"iommu\": true}"
expect_status 400 raw PUT vm.add-disk "{\"path\": \"$SCN_DIR/d0\", \"num_queues\": 99}"
expect_status 400 raw PUT vm.add-net '{"tap": "t0", "fds": [3]}'
expect_status 400 raw PUT vm.remove-device '{"name": "data"}'
expect_status 400 raw PUT vm.remove-device '{"id": "no such id!"}'
expect_status 413 raw PUT vm.add-disk "$(head -c 70000 /dev/zero | tr '\0' ' ')"
expect_status 400 raw GET vm.power-button
expect_status 409 raw PUT vm.create "{\"payload\": {\"kernel\": \"$GUEST_KERNEL\"}}"
expect_status 409 boot
ctl add-disk 'colour=red' 2>"$SCN_DIR/ctl.err"
rc=$?
[ "$rc" = 2 ] || fail "bulkhead-ctl add-disk colour=red exited with $rc, expected 2 (usage)"
say "  bulkhead-ctl add-disk colour=red -> exit 2, nothing sent: $(cat "$SCN_DIR/ctl.err")"
# The VMM is fine: same info, the guest's shell answers.
[ "$(ctl info | tr -d ' \n')" = "$flat" ] || fail "vm.info changed after the bad requests"
vm_send_until vm 'echo still-$((6*7))' '^still-42' 30
say "after the bad requests the guest still answers, vm.info unchanged"

# vm.pause: the vCPUs stop (a line typed meanwhile gets no answer), vm.info says Paused, a
# second pause is 409; vm.resume: the guest answers the line.
ctl pause || fail "vm.pause failed"
ctl info | tr -d ' \n' | grep -q '"state":"Paused"' || fail "vm.info does not say Paused"
expect_status 409 pause
vm_send vm 'echo P-$((6*7))'
sleep 3
if tr -d '\r' <"$SCN_DIR/vm/out" | grep -q '^P-42'; then
	fail "the guest answered while paused"
fi
t0=$(now)
ctl resume || fail "vm.resume failed"
vm_wait_for vm '^P-42' 30
say "vm.pause: no answer for 3 s, vm.info Paused; vm.resume: answered $(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }') s later"
ctl info | tr -d ' \n' | grep -q '"state":"Running"' || fail "vm.info does not say Running after vm.resume"
expect_status 409 resume

# vm.power-button: the PL061's line 3 (the gpio-keys power key in the device tree) pulses.
# The guest takes the line through sysfs with both edges enabled, which unmasks its interrupt
# in the PL061; the count of that interrupt in /proc/interrupts goes up.
vm_send vm 'for c in /sys/class/gpio/gpiochip*; do grep -q pl061 $c/label && b=$(cat $c/base); done; g=$((b + 3)); echo $g >/sys/class/gpio/export; echo both >/sys/class/gpio/gpio$g/edge; echo GPIO-$(cat /sys/class/gpio/gpio$g/edge)-$(cat /sys/class/gpio/gpio$g/value)'
vm_wait_for vm '^GPIO-' 20
gpio=$(tr -d '\r' <"$SCN_DIR/vm/out" | grep '^GPIO-' | tail -n 1)
[ "$gpio" = GPIO-both-0 ] || fail "the guest could not take the PL061's line 3 with both edges: $gpio"
# irqs TAG: the guest prints TAG-<the gpio interrupt's count, summed over CPUs>.
irqs() {
	vm_send vm "echo $1-\$(awk '/gpiolib/ { n = 0; for (i = 2; i <= NF && \$i ~ /^[0-9]+\$/; i++) n += \$i; print n }' /proc/interrupts)" >&2
	vm_wait_for vm "^$1-[0-9]+" 20
	tr -d '\r' <"$SCN_DIR/vm/out" | grep -E "^$1-[0-9]+" | tail -n 1 | sed "s/^$1-//"
}
before=$(irqs IRQA)
ctl power-button || fail "vm.power-button failed"
# The release comes 100 ms after the press.
sleep 0.2
after=$(irqs IRQB)
vm_send vm "grep gpiolib /proc/interrupts | sed 's/^/IRQLINE /'"
vm_wait_for vm '^IRQLINE' 10
tr -d '\r' <"$SCN_DIR/vm/out" | grep '^IRQLINE' | tail -n 1 | quote "guest"
say "vm.power-button: the guest's PL061 line-3 interrupt count went from $before to $after (press and release)"
[ "$after" -gt "$before" ] || fail "vm.power-button raised no PL061 interrupt in the guest ($before -> $after)"

# boot_id N: the Nth boot's id. A reboot from outside lands at the shell prompt, so the second
# GUEST-INIT line may start after "/ # ".
boot_id() { tr -d '\r' <"$SCN_DIR/vm/out" | grep -o 'GUEST-INIT boot_id=[0-9a-f-]*' | sed -n "${1}p"; }
id1=$(boot_id 1)
t0=$(now)
ctl reboot || fail "vm.reboot failed"
vm_wait_for vm 'GUEST-READY' "$BOOT_TIMEOUT" 2
id2=$(boot_id 2)
say "vm.reboot: guest ready again $(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }') s later: $id2 (first: $id1)"
if [ -z "$id2" ] || [ "$id1" = "$id2" ]; then
	fail "after vm.reboot the guest has the same boot id ($id1)"
fi

t0=$(now)
ctl shutdown || fail "vm.shutdown failed"
vm_wait_exit vm 15
say "vm.shutdown: bulkhead exited with status $VM_STATUS $(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }') s later"
vm_no_panic vm
[ "$VM_STATUS" = 0 ] || fail "bulkhead exited with status $VM_STATUS after vm.shutdown, expected 0"
if ctl ping >/dev/null 2>&1; then
	fail "vmm.ping still answered after the VMM exited"
fi
n=0
# Gone, or a zombie waiting for its reaper.
while [ "$(awk '{ print $3 }' "/proc/$pid/stat" 2>/dev/null || echo Z)" != Z ]; do
	n=$((n + 1))
	[ "$n" -le 50 ] || fail "the disk's process $pid outlived the VMM by 5 s"
	sleep 0.1
done
grep -E 'API: ' "$SCN_DIR/vm/err" | tail -n 4 | quote "!"
exit 0
