#!/bin/sh
# timeout: 600
# No seccomp rule goes unused: two VMs, each with a writable disk, a read-only disk, a
# network interface and a balloon, run the disk and net data paths (write, flush, read, discard, a refused
# write, ping, a device reset by unbinding the driver, a guest reboot, a killed device process,
# poweroff) with the test-only rule usage trace on (BULKHEAD_SECCOMP_TRACE: the traced filters
# answer an allowed call with SECCOMP_RET_LOG, an audit record in the kernel log, instead of a
# silent allow; everything else keeps its kill or errno). Filters that stack on one thread are traced in
# different runs, so that every record comes from one filter: run 1 the VMM's thread filters
# (the API thread's among them) and the device processes' filters, run 2 the VMM main
# thread's filter (with a disk hot-plugged and unplugged through the API) and the spawner's.
# The two runs go at the same time (each VMM has its own trace families, from its own
# environment). bulkhead-seccomp-usage records the kernel log (and any sign of a lost record),
# each call with the VMM its process belongs to, and then prints every rule of every filter
# with the run that used it; it fails on a rule no run used
# unless its exception table gives the reason (docs/jail-seccomp.md, "Rule usage trace").
# shellcheck disable=SC2016 # the commands typed into the guest expand there
. "${HARNESS_DIR:-/harness}/lib.sh"

USAGE_BIN=/bin/bulkhead-seccomp-usage
[ -x "$USAGE_BIN" ] || fail "no $USAGE_BIN in L1"
[ -c /dev/net/tun ] || fail "no /dev/net/tun in L1 (tun.ko not loaded?)"
logged=$(cat /proc/sys/kernel/seccomp/actions_logged)
say "seccomp actions logged: $logged"
case " $logged " in *" log "*) ;; *) fail "the kernel does not log seccomp's log action" ;; esac
# kauditd prints each record through printk_ratelimit() when no audit daemon listens: lift
# the limit for the trace (the recorder also fails on kauditd's "callbacks suppressed").
old_ratelimit=$(cat /proc/sys/kernel/printk_ratelimit)
echo 0 >/proc/sys/kernel/printk_ratelimit
trap 'echo "$old_ratelimit" >/proc/sys/kernel/printk_ratelimit' EXIT
say "printk_ratelimit $old_ratelimit -> 0 for the trace"

img=$SCN_DIR/img
mkdir -p "$img"

# traced_run N FAMILIES: one VM under the trace of FAMILIES (run in the background: exits
# non-zero when it fails).
traced_run() {
	n=$1
	fam=$2
	id=t$n
	dd if=/dev/zero of="$img/d$n" bs=1M count=32 2>/dev/null
	head -c $((4 << 20)) /dev/urandom >"$img/r$n"
	export BULKHEAD_SECCOMP_TRACE=$fam
	vm_start "$id" --kernel "$GUEST_KERNEL" --initramfs "$GUEST_INITRAMFS" --cmdline "$GUEST_CMDLINE" \
		--cpus boot=2 --memory size=512M -v \
		--disk "path=$img/d$n,id=d0" --disk "path=$img/r$n,readonly=on,id=r0" \
		--net "tap=bt$n,ip=192.168.25$n.1,mask=255.255.255.0,id=n0" \
		--balloon size=0,free_page_reporting=on,stats_polling_interval_s=1 \
		--api-socket "$SCN_DIR/api-$n.sock"
	unset BULKHEAD_SECCOMP_TRACE
	vm_wait_for "$id" '^GUEST-READY' "$BOOT_TIMEOUT"
	say "run $n ($fam): guest ready $(elapsed "$id") s after start"
	grep 'SECCOMP_TRACE' "$SCN_DIR/$id/err" | head -n 3 | quote "!"
	dw=$(tr -d '\r' <"$SCN_DIR/$id/out" | sed -n 's/^GUEST-DISK \(vd.\) 65536 ro=0 .*/\1/p')
	dr=$(tr -d '\r' <"$SCN_DIR/$id/out" | sed -n 's/^GUEST-DISK \(vd.\) 8192 ro=1 .*/\1/p')
	ifname=$(vm_marker "$id" NET | cut -d ' ' -f 1)
	[ -n "$dw" ] && [ -n "$dr" ] && [ -n "$ifname" ] ||
		fail "run $n: disks or interface not seen (rw=$dw ro=$dr net=$ifname)"
	vm_send_until "$id" "ip addr add 192.168.25$n.2/24 dev $ifname && ip link set $ifname up && echo NETUP-\$?" '^NETUP-' 30
	trun() { # trun COMMAND ERE TIMEOUT
		vm_send "$id" "$1" >&2
		vm_wait_for "$id" "$2" "$3"
		tr -d '\r' <"$SCN_DIR/$id/out" | grep -E "$2" | tail -n 1 | sed 's/^[A-Z0-9]*-//'
	}
	rc=$(trun "head -c 8388608 /dev/urandom >/tmp/w; dd if=/tmp/w of=/dev/$dw bs=64k conv=fsync 2>/dev/null; echo 3 >/proc/sys/vm/drop_caches; head -c 8388608 /dev/$dw | cmp - /tmp/w >/dev/null; echo IO$n-\$?" "^IO$n-[0-9]+\$" 120)
	[ "$rc" = 0 ] || fail "run $n: write, flush and read back of 8 MiB failed ($rc)"
	rc=$(trun "blkdiscard -o 0 -l 1048576 /dev/$dw; echo DI$n-\$?" "^DI$n-[0-9]+\$" 30)
	[ "$rc" = 0 ] || fail "run $n: discard failed ($rc)"
	rc=$(trun "dd if=/dev/zero of=/dev/$dr bs=4096 count=1 conv=fsync 2>/dev/null; head -c 4194304 /dev/$dr >/dev/null; echo RO$n-\$?" "^RO$n-[0-9]+\$" 30)
	rc=$(trun "ping -c 3 -i 0.2 -W 2 192.168.25$n.1 >/dev/null; echo PI$n-\$?" "^PI$n-[0-9]+\$" 30)
	[ "$rc" = 0 ] || fail "run $n: the guest could not ping L1 over the tap ($rc)"
	# The API thread: a few requests on one connection each (accept, read, answer, close).
	for c in ping info; do
		/bin/bulkhead-ctl --api-socket "$SCN_DIR/api-$n.sock" "$c" >/dev/null ||
			fail "run $n: bulkhead-ctl $c failed"
	done
	# The balloon (free page reporting released what the guest freed since boot): the API's
	# balloon requests go through the main thread to the device's control channel, and an
	# inflate punches holes.
	/bin/bulkhead-ctl --api-socket "$SCN_DIR/api-$n.sock" resize --balloon 64M ||
		fail "run $n: bulkhead-ctl resize --balloon failed"
	sleep 3
	/bin/bulkhead-ctl --api-socket "$SCN_DIR/api-$n.sock" balloon-statistics | grep -E '"(target|actual)_mib"' | quote "@"
	/bin/bulkhead-ctl --api-socket "$SCN_DIR/api-$n.sock" resize --balloon 0 ||
		fail "run $n: bulkhead-ctl resize --balloon 0 failed"
	if [ "$n" = 2 ]; then
		# The main thread's hot-plug path under its filter: a disk plugged and unplugged.
		dd if=/dev/zero of="$img/h$n" bs=1M count=8 2>/dev/null
		/bin/bulkhead-ctl --api-socket "$SCN_DIR/api-$n.sock" add-disk "path=$img/h$n,id=h0" >"$SCN_DIR/plug-$n" 2>&1 ||
			fail "run $n: hot-plugging a disk failed: $(cat "$SCN_DIR/plug-$n")"
		sleep 3
		/bin/bulkhead-ctl --api-socket "$SCN_DIR/api-$n.sock" remove-device h0 >"$SCN_DIR/unplug-$n" 2>&1 ||
			fail "run $n: unplugging the disk failed: $(cat "$SCN_DIR/unplug-$n")"
		say "run $n: disk plugged and unplugged: $(tr -d ' \n' <"$SCN_DIR/unplug-$n")"
	fi
	bdf=$(tr -d '\r' <"$SCN_DIR/$id/out" | sed -n "s/^GUEST-DISK $dw .* pci=//p" | head -n 1)
	trun "echo $bdf >/sys/bus/pci/drivers/virtio-pci/unbind; echo $bdf >/sys/bus/pci/drivers/virtio-pci/bind; sleep 1; echo UB$n-\$(ls /sys/bus/pci/devices/$bdf/virtio*/block)" "^UB$n-vd" 60 >/dev/null
	vm_send "$id" 'reboot -f'
	vm_wait_for "$id" '^GUEST-READY' "$BOOT_TIMEOUT" 2
	sleep 1
	vm_send_until "$id" "head -c 1048576 /dev/$dw | wc -c | sed s/^/RB$n-/" "^RB$n-" 60
	# A device process that dies: the VMM's watcher fails the device, the spawner reaps it.
	vmm=$(vm_pid "$id")
	for p in $(devices_of "$vmm" bulkhead-net); do kill -KILL "$p"; done
	sleep 2
	grep -E '^n0: |n0.*(ended|killed|failed)' "$SCN_DIR/$id/err" | tail -n 2 | quote "!"
	vm_send "$id" 'poweroff -f'
	vm_wait_exit "$id" 60
	vm_no_panic "$id"
	[ "$VM_STATUS" = 0 ] || fail "run $n: bulkhead exited with status $VM_STATUS"
	say "run $n: VM done in $(elapsed "$id") s"
}

rm -f "$SCN_DIR/stop"
"$USAGE_BIN" record "$SCN_DIR/usage" "$SCN_DIR/stop" &
rec=$!
sleep 0.5
traced_run 1 vmm-threads,devices &
run1=$!
traced_run 2 vmm-main,spawner &
run2=$!
st1=0 st2=0
wait "$run1" || st1=$?
wait "$run2" || st2=$?
sleep 1
: >"$SCN_DIR/stop"
wait "$rec" || fail "the recorder failed"
[ "$st1" = 0 ] && [ "$st2" = 0 ] || fail "run 1 exited $st1, run 2 $st2: $(cat "$SCN_DIR/reason" 2>/dev/null)"
[ -s "$SCN_DIR/usage" ] || fail "no usage file"
pid1=$(vm_pid t1)
pid2=$(vm_pid t2)

"$USAGE_BIN" check vmm-threads,devices "$pid1" "$SCN_DIR/usage" \
	vmm-main,spawner "$pid2" "$SCN_DIR/usage" >"$SCN_DIR/check" 2>&1
st=$?
cat "$SCN_DIR/check"
[ "$st" = 0 ] || fail "seccomp rule usage check failed (status $st): $(grep -cE 'UNUSED|LOST|UNATTRIBUTED|STALE|nothing' "$SCN_DIR/check") problems"
say "every rule of every filter was used in a traced run or has a listed reason"
