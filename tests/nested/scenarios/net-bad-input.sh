#!/bin/sh
# timeout: 120
# Bad --net input exits with status 2 and a clear message, starting no device process and
# leaving no tap behind: a bad MAC, an odd num_queues, ip without mask, a descriptor that is
# not a tap, a tap name that is another kind of interface, an existing single-queue tap asked
# for two queue pairs, more devices than PCIe slots.
. "${HARNESS_DIR:-/harness}/lib.sh"

failed=
# expect2 CASE ERE ARGS...: bulkhead ARGS must exit 2, with a stderr line matching ERE, no panic.
expect2() {
	_case=$1
	_want=$2
	shift 2
	timeout -s KILL 20 "$BULKHEAD" --kernel "$GUEST_KERNEL" --initramfs "$GUEST_INITRAMFS" "$@" \
		</dev/null >"$SCN_DIR/$_case.out" 2>"$SCN_DIR/$_case.err" 5</dev/null
	_st=$?
	_msg=$(tr -d '\r' <"$SCN_DIR/$_case.err" | grep -E "$_want" | head -n 1)
	[ -n "$_msg" ] || _msg=$(tr -d '\r' <"$SCN_DIR/$_case.err" | grep -v '^[[:space:]]*$' | head -n 1)
	say "case $_case: status $_st, stderr: ${_msg:-<empty>}"
	_why=
	[ "$_st" = 2 ] || _why="status $_st, expected 2"
	grep -qE "$_want" "$SCN_DIR/$_case.err" || _why="${_why:+$_why; }no '$_want' on stderr"
	grep -q panicked "$SCN_DIR/$_case.err" "$SCN_DIR/$_case.out" && _why="${_why:+$_why; }panicked"
	grep -q 'started .*bulkhead-net' "$SCN_DIR/$_case.err" && _why="${_why:+$_why; }started a device process"
	if [ -n "$_why" ]; then
		head -n 15 "$SCN_DIR/$_case.err" | quote "!"
		failed="$failed $_case($_why)"
	fi
}

[ -c /dev/net/tun ] || fail "no /dev/net/tun in L1 (tun.ko not loaded?)"
expect2 bad-mac 'mac=.*unicast' --net tap=bhx,mac=01:00:5e:00:00:01
expect2 short-mac 'mac=' --net tap=bhx,mac=52:54:00:12:34
expect2 odd-queues 'num_queues=3 is odd' --net tap=bhx,num_queues=3
expect2 ip-no-mask 'go together' --net tap=bhx,ip=10.1.1.1
expect2 fd-not-tap 'fd=5: not an attached tap queue' --net fd=5
expect2 fd-not-open 'not an open descriptor' --net fd=77
expect2 not-a-tap 'not a tun/tap device' -v --net tap=lo
tunctl -t bhsq >/dev/null || fail "tunctl -t bhsq failed"
expect2 single-queue-tap 'single-queue tap' -v --net tap=bhsq,num_queues=4
tunctl -d bhsq >/dev/null
expect2 over-slots 'PCIe slots' --pci-slots 1 --net tap=bhx --net tap=bhy
expect2 rate-half 'token bucket' --net tap=bhx,tx_bw_size=1000
[ ! -e /sys/class/net/bhx ] || failed="$failed tap-left-behind(bhx)"
if ps -o comm 2>/dev/null | grep -q bulkhead-net; then
	failed="$failed leftover-device-process"
fi
[ -z "$failed" ] || fail "wrong handling of:$failed"
exit 0
