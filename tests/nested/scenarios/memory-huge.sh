#!/bin/sh
# timeout: 420
# Huge pages for guest RAM (docs/memory.md), in this untuned L1 (Debian's shmem_enabled=never):
# - the default (thp=on) gets transparent huge pages from a private tmpfs: the VMM logs which
#   mechanism and why, L1's /proc/PID/smaps_rollup shows guest RAM mapped with PMDs and
#   /proc/meminfo ShmemHugePages grows while the guest runs;
# - thp=collapse (MADV_COLLAPSE) also gets huge pages; thp=madvise is refused with the reason;
#   thp=off gets none; in every mode the VMM's own anonymous memory holds no huge page (its
#   threads' stacks are under 2 MiB, docs/memory.md);
# - hugepages=on: a clear error while the pool is short, then hugetlbfs pages once reserved;
# - bad --memory values exit 2 with a message.
# For each VM it prints the guest's uptime at init and the time from `poweroff -f` to exit.
# shellcheck disable=SC2016 # the commands typed into the guest expand there
. "${HARNESS_DIR:-/harness}/lib.sh"

THP=/sys/kernel/mm/transparent_hugepage
say "L1 $(uname -r): THP enabled '$(cat $THP/enabled)', shmem_enabled '$(cat $THP/shmem_enabled)'"
say "L1 hugetlb sizes: $(ls /sys/kernel/mm/hugepages | tr '\n' ' ')"

kb() { awk -v k="$2:" '$1 == k { print $2 }' "$1"; }

# boot_and_measure ID MEMORY-OPTION: boot a 512M guest, print the mechanism line, PMD-mapped
# RAM and the guest's uptime at init, power it off and time the exit. Sets PMD_KB, SHMEM_HUGE_KB.
boot_and_measure() {
	_id=$1
	shmem0=$(kb /proc/meminfo ShmemHugePages)
	vm_start "$_id" -v --memory "$2" --kernel "$GUEST_KERNEL" --initramfs "$GUEST_INITRAMFS" \
		--cmdline "$GUEST_CMDLINE"
	vm_wait_for "$_id" '^GUEST-READY' "$BOOT_TIMEOUT"
	line=$(grep -m 1 'guest RAM:' "$SCN_DIR/$_id/err" | sed 's/.*guest RAM:/guest RAM:/')
	[ -n "$line" ] || fail "$_id: no 'guest RAM:' line in bulkhead's log"
	pid=$(vm_pid "$_id")
	r=/proc/$pid/smaps_rollup
	PMD_KB=$(($(kb "$r" ShmemPmdMapped) + $(kb "$r" FilePmdMapped)))
	SHMEM_HUGE_KB=$(($(kb /proc/meminfo ShmemHugePages) - shmem0))
	say "$_id (--memory $2): $line"
	say "$_id: guest uptime at init $(vm_marker "$_id" UPTIME) s, ready $(elapsed "$_id") s after start"
	say "$_id: L1 smaps_rollup of bulkhead: $(grep -E '^(Rss|Shmem|ShmemPmdMapped|FilePmdMapped|AnonHugePages|Private_Hugetlb|Shared_Hugetlb):' "$r" | tr -s ' ' | tr '\n' ' ')"
	say "$_id: L1 ShmemHugePages grew by $SHMEM_HUGE_KB kB, HugePages_Free $(kb /proc/meminfo HugePages_Free)"
	anon_huge=$(kb "$r" AnonHugePages)
	[ "$anon_huge" = 0 ] || fail "$_id: the VMM's own anonymous memory holds $anon_huge kB of huge pages (a thread stack of 2 MiB or more?)"
	vm_send_until "$_id" 'echo alive-$((6*7))' '^alive-42' 30
	t0=$(now)
	vm_send "$_id" 'poweroff -f'
	vm_wait_exit "$_id" 30
	say "$_id: poweroff -f to exit $(awk -v a="$t0" -v b="$(cat "$SCN_DIR/$_id/t_exit")" 'BEGIN { printf "%.2f", b - a }') s, status $VM_STATUS"
	[ "$VM_STATUS" = 0 ] || fail "$_id exited with status $VM_STATUS"
	vm_no_panic "$_id"
}

# The default: a private tmpfs with huge=within_size.
boot_and_measure thp size=512M
grep -q 'guest RAM: 512 MiB, transparent huge pages from a private tmpfs' "$SCN_DIR/thp/err" ||
	fail "the default did not get huge pages from the private tmpfs"
[ "$PMD_KB" -ge 65536 ] || fail "default: only $PMD_KB kB of guest RAM mapped with PMDs"
[ "$SHMEM_HUGE_KB" -ge 65536 ] || fail "default: ShmemHugePages grew by only $SHMEM_HUGE_KB kB"

# MADV_COLLAPSE: everything allocated up front where the kernel collapses shmem on request;
# where it refuses, insisting on it is an error that says so.
"$BULKHEAD" --memory size=64M,thp=collapse --kernel "$GUEST_KERNEL" --serial off \
	</dev/null >"$SCN_DIR/collapse-probe.out" 2>&1 &
probe=$!
sleep 3
if kill -0 "$probe" 2>/dev/null; then
	kill "$probe"
	wait "$probe"
	boot_and_measure collapse size=512M,thp=collapse
	grep -q 'MADV_COLLAPSE' "$SCN_DIR/collapse/err" || fail "thp=collapse: no MADV_COLLAPSE line"
	[ "$PMD_KB" -ge 65536 ] || fail "thp=collapse: only $PMD_KB kB mapped with PMDs"
else
	wait "$probe"
	st=$?
	say "thp=collapse refused here: status $st: $(grep -m 1 'thp=collapse' "$SCN_DIR/collapse-probe.out")"
	[ "$st" = 1 ] || fail "thp=collapse: status $st, expected 1"
	grep -q 'thp=collapse: ' "$SCN_DIR/collapse-probe.out" || fail "thp=collapse: no reason given"
fi

# thp=off: small pages.
boot_and_measure off size=512M,thp=off
grep -q 'guest RAM: 512 MiB, small pages (thp=off)' "$SCN_DIR/off/err" || fail "thp=off: no small-pages line"
[ "$PMD_KB" -eq 0 ] || fail "thp=off: $PMD_KB kB mapped with PMDs"

# MADV_HUGEPAGE is ignored under shmem_enabled=never: insisting on it is an error that says so.
if grep -q '\[never\]' $THP/shmem_enabled; then
	"$BULKHEAD" --memory size=512M,thp=madvise --kernel "$GUEST_KERNEL" --serial off \
		</dev/null >"$SCN_DIR/madvise.out" 2>&1
	st=$?
	say "thp=madvise under shmem_enabled=never: status $st: $(head -n 1 "$SCN_DIR/madvise.out")"
	[ "$st" = 1 ] || fail "thp=madvise: status $st, expected 1"
	grep -q 'shmem_enabled is never' "$SCN_DIR/madvise.out" || fail "thp=madvise: no reason given"
fi

# hugetlbfs: the pool is empty first, then reserved.
sz=2048
echo 0 >/sys/kernel/mm/hugepages/hugepages-${sz}kB/nr_hugepages
"$BULKHEAD" --memory size=512M,hugepages=on,hugepage_size=2M --kernel "$GUEST_KERNEL" --serial off \
	</dev/null >"$SCN_DIR/pool.out" 2>&1
st=$?
say "hugepages=on with an empty pool: status $st: $(head -n 1 "$SCN_DIR/pool.out")"
[ "$st" = 1 ] || fail "hugepages=on with an empty pool: status $st, expected 1"
grep -q 'has 0 free, the VM needs 256' "$SCN_DIR/pool.out" || fail "hugepages=on: the short pool is not named"
echo 256 >/sys/kernel/mm/hugepages/hugepages-${sz}kB/nr_hugepages
say "reserved $(cat /sys/kernel/mm/hugepages/hugepages-${sz}kB/nr_hugepages) pages of 2 MiB"
boot_and_measure hugetlb size=512M,hugepages=on,hugepage_size=2M
grep -q 'hugetlbfs pages of 2048 KiB' "$SCN_DIR/hugetlb/err" || fail "hugepages=on: no hugetlbfs line"
echo 0 >/sys/kernel/mm/hugepages/hugepages-${sz}kB/nr_hugepages

# Bad values: exit 2, one line naming the fault.
for m in size=512M,hugepage_size=2M size=512M,hugepages=on,hugepage_size=3M size=512M,thp=maybe \
	size=512M,hugepages=on,thp=off size=512M,hugepages=yes; do
	"$BULKHEAD" --memory "$m" --kernel "$GUEST_KERNEL" --serial off </dev/null >"$SCN_DIR/bad.out" 2>&1
	st=$?
	say "--memory $m: status $st: $(head -n 1 "$SCN_DIR/bad.out")"
	[ "$st" = 2 ] || fail "--memory $m: status $st, expected 2"
done
