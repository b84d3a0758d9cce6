#!/bin/sh
# timeout: 900
# Runs bulkhead-bench (tests/bench) against the test guest and prints its figures: Bulkhead
# and, when run.sh packed them into /peers, Firecracker and Cloud Hypervisor, interleaved,
# each also with one disk and one NIC (tap bhbench0, which L1's tun.ko allows).
. "${HARNESS_DIR:-/harness}/lib.sh"

BENCH=${BENCH:-/bin/bulkhead-bench}
[ -x "$BENCH" ] || fail "$BENCH was not built"
# Cloud Hypervisor reads guest input only from a terminal: the bench gives it a pty.
if ! grep -q ' /dev/pts ' /proc/mounts; then
	mkdir -p /dev/pts && mount -t devpts -o mode=620,ptmxmode=666 devpts /dev/pts ||
		say "cannot mount devpts: Cloud Hypervisor will get no console input"
fi
# KVM's per-VM exit counters (the benchmark reads them at each guest's init).
if ! grep -q ' /sys/kernel/debug ' /proc/mounts; then
	mount -t debugfs none /sys/kernel/debug ||
		say "cannot mount debugfs: the benchmark prints no KVM exit counts"
fi
# Transparent huge pages can make a few KiB of a program's heap 2 MiB of RSS (khugepaged
# collapses any 2 MiB-aligned range with one page in use at max_ptes_none 511): say how L1 is set.
t=/sys/kernel/mm/transparent_hugepage
say "L1 THP: enabled $(cat $t/enabled 2>/dev/null), khugepaged max_ptes_none $(cat $t/khugepaged/max_ptes_none 2>/dev/null), scan every $(cat $t/khugepaged/scan_sleep_millisecs 2>/dev/null) ms, $(uname -r)"
# The +disk+NIC rows (non-guest RSS with one disk and one NIC): a 64 MiB disk image.
dd if=/dev/zero of="$SCN_DIR/disk.img" bs=1M count=64 2>/dev/null || fail "cannot make the disk image"
set -- --bulkhead "$BULKHEAD" --kernel "$GUEST_KERNEL" --initramfs "$GUEST_INITRAMFS" --runs 5 \
	--bulkhead-variant "--pci-slots 1" --bulkhead-variant "--cpus boot=1,pauth=off" \
	--devices "$SCN_DIR/disk.img"
for p in firecracker cloud-hypervisor; do
	if [ -x "/peers/$p" ]; then
		set -- "$@" "--$p" "/peers/$p"
	else
		say "no /peers/$p in L1: the benchmark runs without it"
	fi
done
say "bulkhead-bench $*"
# Shown as it runs; the status comes back through a file (busybox sh has no pipefail).
{ "$BENCH" "$@" 2>&1 </dev/null; echo $? >"$SCN_DIR/bench.status"; } | tee "$SCN_DIR/bench.out" | quote "|"
st=$(cat "$SCN_DIR/bench.status")
[ "$st" = 0 ] || fail "bulkhead-bench exited with status $st"

say "bulkhead-spawn-bench: device process spawn to first vhost-user reply, jailed and not"
/bin/bulkhead-spawn-bench --bulkhead-block /bin/bulkhead-block --runs 10 \
	>"$SCN_DIR/spawn.out" 2>&1 </dev/null
st=$?
quote "|" <"$SCN_DIR/spawn.out"
[ "$st" = 0 ] || fail "bulkhead-spawn-bench exited with status $st"
