#!/bin/sh
# timeout: 900
# 200 add/remove cycles of a disk through the API (issue 9's leak check; suite `stress`, not in
# the test command: each removal waits out the guest's 5 s attention-button window, and the
# API serves 4 requests at once, so 200 cycles take about 6 minutes). In rounds of 8: 8 disks
# are plugged into 8 slots, the guest sees all 8 block devices, then all 8 are removed at once
# (orderly: the guest's pciehp powers each slot off). Before and after: the VMM's descriptors,
# threads and own memory (RssAnon: VmRSS also counts the guest RAM it maps), the devices
# (slots in use), GSIs and MSI routes vm.info lists, and the bulkhead-block processes. All but
# the memory must be back where they were; RssAnon, measured after a first warm-up round, may
# not grow by more than 2 MiB.
# shellcheck disable=SC2016 # the commands typed into the guest expand there
. "${HARNESS_DIR:-/harness}/lib.sh"

ROUNDS=${HOTPLUG_ROUNDS:-25}
PER_ROUND=8
img=$SCN_DIR/img
mkdir -p "$img"
i=0
while [ $i -lt $PER_ROUND ]; do
	dd if=/dev/zero of="$img/d$i" bs=1M count=1 2>/dev/null
	i=$((i + 1))
done
api=$SCN_DIR/api.sock
ctl() { bulkhead-ctl --api-socket "$api" "$@"; }

vm_start vm --kernel "$GUEST_KERNEL" --initramfs "$GUEST_INITRAMFS" --cmdline "$GUEST_CMDLINE" \
	--cpus boot=2 --memory size=1G --pci-slots $PER_ROUND --api-socket "$api"
vm_wait_for vm '^GUEST-READY' "$BOOT_TIMEOUT"
say "guest ready $(elapsed vm) s after start"
vmm=$(vm_pid vm)
sleep 1
blocks() { pids_named bulkhead-block | wc -l; }
# The VMM's own memory: RssAnon. VmRSS also counts the guest RAM the VMM has mapped
# (RssShmem), which grows as the guest touches more of its memory (page cache, slabs for each
# new device), whatever the VMM does.
rss() { awk '/^RssAnon:/ { print $2 }' "/proc/$vmm/status"; }
shmem() { awk '/^RssShmem:/ { print $2 }' "/proc/$vmm/status"; }
# vm.info: the devices listed (slots in use), the GSIs and MSI routes the devices hold.
info() {
	j=$(ctl info | tr -d ' \n')
	echo "$(echo "$j" | tr ',' '\n' | grep -c '"bdf"')" \
		"$(echo "$j" | sed -n 's/.*"gsis":\([0-9]*\).*/\1/p')" \
		"$(echo "$j" | sed -n 's/.*"msi_routes":\([0-9]*\).*/\1/p')"
}
snapshot() {
	echo "$(ls "/proc/$vmm/fd" | wc -l) $(ls "/proc/$vmm/task" | wc -l) $(info) $(blocks)"
}

# round N: plug PER_ROUND disks, wait for the guest to see them, remove them all at once.
round() {
	r=$1
	k=0
	while [ $k -lt $PER_ROUND ]; do
		out=$(ctl add-disk "path=$img/d$k,id=c$r-$k" 2>&1) || fail "round $r: add-disk $k: $out"
		k=$((k + 1))
	done
	vm_send vm "while [ \$(ls /sys/block | grep -c vd) -lt $PER_ROUND ]; do usleep 20000; done; echo SEEN-$r" >/dev/null
	vm_wait_for vm "^SEEN-$r\$" 30
	k=0
	pids=
	while [ $k -lt $PER_ROUND ]; do
		(ctl remove-device "c$r-$k" >"$SCN_DIR/rm-$k" 2>&1; echo $? >>"$SCN_DIR/rm-$k") &
		pids="$pids $!"
		k=$((k + 1))
	done
	# (Not a bare `wait`: the VMM's runner is a child of this shell too.)
	for p in $pids; do wait "$p"; done
	k=0
	while [ $k -lt $PER_ROUND ]; do
		grep -q '"removal": *"orderly"' "$SCN_DIR/rm-$k" || fail "round $r: removal $k: $(tr '\n' ' ' <"$SCN_DIR/rm-$k")"
		k=$((k + 1))
	done
	vm_send vm "while [ \$(ls /sys/block | grep -c vd) -gt 0 ]; do usleep 20000; done; echo GONE-$r" >/dev/null
	vm_wait_for vm "^GONE-$r\$" 30
}

# A removal's threads (its unplug timer, the one that ends its process and answers) end as
# the answer goes out: the snapshots give them a second to be gone.
TIMER_WAIT=1
before=$(snapshot)
say "before: descriptors threads devices GSIs routes processes = $before"
# shellcheck disable=SC2086 # split into its fields
set -- $before
[ $# = 6 ] || fail "a count is missing from the snapshot: $before"
t0=$(now)
round 1
sleep $TIMER_WAIT
rss1=$(rss)
say "after the warm-up round: RssAnon $rss1 kB (RssShmem, guest RAM: $(shmem) kB), $(snapshot)"
r=2
while [ $r -le "$ROUNDS" ]; do
	round $r
	r=$((r + 1))
done
t1=$(now)
sleep $TIMER_WAIT
after=$(snapshot)
rss2=$(rss)
cycles=$((ROUNDS * PER_ROUND))
say "$cycles add/remove cycles in $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.0f", b - a }') s"
say "after: descriptors threads devices GSIs routes processes = $after; RssAnon $rss1 -> $rss2 kB (RssShmem, guest RAM: $(shmem) kB)"
[ "$after" = "$before" ] || fail "after $cycles cycles the VMM's descriptors/threads/devices/GSIs/routes/processes went $before -> $after"
[ $((rss2 - rss1)) -le 2048 ] || fail "the VMM's RssAnon grew by $((rss2 - rss1)) kB over $cycles cycles"

vm_send vm 'poweroff -f'
vm_wait_exit vm 60
vm_no_panic vm
[ "$VM_STATUS" = 0 ] || fail "bulkhead exited with status $VM_STATUS"
