#!/bin/sh
# timeout: 90
# Bad input is refused with exit status 2 and a message on stderr, never a panic.
. "${HARNESS_DIR:-/harness}/lib.sh"

failed=
# expect2 CASE ARGS...: run bulkhead ARGS (20 s limit); it must exit 2, say something on
# stderr and not panic.
expect2() {
	_case=$1
	shift
	timeout -s KILL 20 "$BULKHEAD" "$@" </dev/null >"$SCN_DIR/$_case.out" 2>"$SCN_DIR/$_case.err"
	_st=$?
	_msg=$(tr -d '\r' <"$SCN_DIR/$_case.err" | grep -v '^[[:space:]]*$' | head -n 1)
	say "case $_case: status $_st, stderr: ${_msg:-<empty>}"
	_why=
	[ "$_st" = 2 ] || _why="status $_st, expected 2"
	[ -s "$SCN_DIR/$_case.err" ] || _why="${_why:+$_why; }nothing on stderr"
	grep -q panicked "$SCN_DIR/$_case.err" "$SCN_DIR/$_case.out" && _why="${_why:+$_why; }panicked"
	if [ -n "$_why" ]; then
		head -n 15 "$SCN_DIR/$_case.err" | quote "!"
		failed="$failed $_case($_why)"
	fi
}

K=$GUEST_KERNEL
I=$GUEST_INITRAMFS
expect2 missing-kernel --kernel /nonexistent/Image --initramfs "$I"
NOT_IMAGE=/bin/busybox # an aarch64 ELF
[ -f "$NOT_IMAGE" ] || NOT_IMAGE=/bin/sh
expect2 kernel-not-image --kernel "$NOT_IMAGE" --initramfs "$I"
dd if=/dev/zero of="$SCN_DIR/big-initramfs" bs=1M count=80 2>/dev/null
expect2 initramfs-over-ram --kernel "$K" --initramfs "$SCN_DIR/big-initramfs" --memory size=64M
rm -f "$SCN_DIR/big-initramfs"
expect2 zero-cpus --kernel "$K" --initramfs "$I" --cpus boot=0
expect2 pauth-maybe --kernel "$K" --initramfs "$I" --cpus boot=1,pauth=maybe
expect2 memory-banana --kernel "$K" --initramfs "$I" --memory size=banana
expect2 memory-1M --kernel "$K" --initramfs "$I" --memory size=1M
expect2 unknown-option --kernel "$K" --no-such-option
expect2 missing-initramfs --kernel "$K" --initramfs /nonexistent/initrd
dd if=/dev/zero of="$SCN_DIR/disk.img" bs=1M count=1 2>/dev/null
expect2 disk-missing-image --kernel "$K" --initramfs "$I" --disk path=/nonexistent/disk.img
expect2 disk-bad-option --kernel "$K" --initramfs "$I" --disk "path=$SCN_DIR/disk.img,colour=blue"
expect2 disk-bad-queues --kernel "$K" --initramfs "$I" --disk "path=$SCN_DIR/disk.img,num_queues=0"
expect2 disks-over-slots --kernel "$K" --initramfs "$I" --pci-slots 1 \
	--disk "path=$SCN_DIR/disk.img" --disk "path=$SCN_DIR/disk.img,readonly=on"
# Nothing was started half-way: no device process outlived a refused configuration.
if ps -o comm 2>/dev/null | grep -q bulkhead-block; then
	failed="$failed leftover-device-process"
fi

[ -z "$failed" ] || fail "wrong handling of:$failed"
