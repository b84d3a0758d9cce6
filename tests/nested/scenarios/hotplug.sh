#!/bin/sh
# timeout: 300
# Native PCIe hot-plug into a running Debian guest booted with a device tree (no ACPI, no
# rescan): its pciehp driver binds every root port; a disk is plugged and the guest sees it
# at once (time from the request to the block device in the guest printed), a checksummed
# write/read goes through it; it is unplugged (attention button, pciehp powers the slot off:
# orderly) and its process is gone, its slot free, the data in the image; plugged again, it
# is removed while the guest writes to it, and what the guest saw written is in the image. A
# NIC is plugged, the guest pings the host side of its tap, and it is unplugged (its process
# and tap gone). A cold-plugged disk is removed too. The VMM's descriptors, threads and device
# processes are back where they were, and no GSI or MSI route is left. The VMM runs under its
# seccomp filters, as by default. Two slots: the disk plugged again and the NIC go, at once,
# into the slot the guest has just powered off (a plug in pciehp's 1 s after its power-off
# must be held until it turns the indicator off).
# shellcheck disable=SC2016 # the commands typed into the guest expand there
. "${HARNESS_DIR:-/harness}/lib.sh"

img=$SCN_DIR/img
mkdir -p "$img"
dd if=/dev/zero of="$img/cold" bs=1M count=16 2>/dev/null
dd if=/dev/zero of="$img/hot" bs=1M count=32 2>/dev/null
api=$SCN_DIR/api.sock
# hp VERB ARGS: one bulkhead-ctl request (add-disk OPTIONS, add-net OPTIONS, remove-device ID);
# prints "OK <its JSON answer on one line>" or "ERR <status> <message>".
hp() { ctl_call -c "$api" "$@"; }

vm_start vm --kernel "$GUEST_KERNEL" --initramfs "$GUEST_INITRAMFS" --cmdline "$GUEST_CMDLINE" \
	--cpus boot=2 --memory size=1G -v --pci-slots 2 --api-socket "$api" \
	--disk "path=$img/cold,id=cold"
vm_wait_for vm '^GUEST-READY' "$BOOT_TIMEOUT"
say "guest ready $(elapsed vm) s after start"
vmm=$(vm_pid vm)
sleep 1
run() { # run COMMAND ERE TIMEOUT: type COMMAND, wait for a line matching ERE, print its value.
	vm_send vm "$1" >&2
	vm_wait_for vm "$2" "$3"
	tr -d '\r' <"$SCN_DIR/vm/out" | grep -E "$2" | tail -n 1 | sed 's/^[A-Z0-9]*-//'
}
slots=$(run 'echo PH-$(dmesg | grep -c "pciehp.*Slot #")' '^PH-[0-9]+$' 30)
say "pciehp bound $slots slots"
[ "$slots" = 2 ] || fail "pciehp bound $slots of the 2 root ports"
fds0=$(ls "/proc/$vmm/fd" | wc -l)
thr0=$(ls "/proc/$vmm/task" | wc -l)
blocks() { pids_named "$1" | wc -l; }
procs0=$(blocks bulkhead-block)
say "before: VMM $fds0 descriptors, $thr0 threads; $procs0 bulkhead-block process(es)"

# Plug a disk: the guest waits for its block device; time from the request to it.
vm_send vm 'while [ ! -e /sys/block/vdb ]; do usleep 20000; done; echo HOTDISK-$(cat /sys/block/vdb/size)' >&2
t0=$(now)
answer=$(hp add-disk "path=$img/hot,id=hot0")
ta=$(now)
say "plug: $answer"
case $answer in OK*\"bdf\"*) ;; *) fail "plugging a disk failed: $answer" ;; esac
# Polled every 20 ms here (vm_wait_for's 0.5 s would be most of what is measured).
i=0
until tr -d '\r' <"$SCN_DIR/vm/out" | grep -qE '^HOTDISK-[0-9]+'; do
	[ $i -lt 1500 ] || fail "the guest did not see the hot-plugged disk within 30 s"
	sleep 0.02
	i=$((i + 1))
done
t1=$(now)
say "hot-plugged disk usable in the guest $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }') s after the request (answered in $(awk -v a="$t0" -v b="$ta" 'BEGIN { printf "%.2f", b - a }') s: device process started and connected, slot announced)"
[ "$(run 'echo SZ-$(cat /sys/block/vdb/size)' '^SZ-[0-9]+$' 10)" = 65536 ] || fail "the hot-plugged disk has the wrong size"
run 'dmesg | grep -E "pciehp|virtio_blk" | tail -n 6 | sed "s/^/DMESG /"; echo DM-done' '^DM-done' 10 >/dev/null
tr -d '\r' <"$SCN_DIR/vm/out" | grep '^DMESG' | tail -n 6 | quote "guest"
[ "$(blocks bulkhead-block)" = $((procs0 + 1)) ] || fail "no new bulkhead-block process"
dup=$(hp add-disk "path=$img/hot,id=hot0")
say "same id again: $dup"
case $dup in "ERR 409"*) ;; *) fail "a duplicate id was not refused with 409: $dup" ;; esac

want=$(run 'head -c 8388608 /dev/urandom >/tmp/r && echo W-$(sha256sum /tmp/r | cut -c1-64)' '^W-[0-9a-f]{64}$' 60)
[ "$(run 'dd if=/tmp/r of=/dev/vdb bs=1M conv=fsync 2>/dev/null; echo WROTE-$?' '^WROTE-[0-9]+$' 60)" = 0 ] || fail "writing to the hot-plugged disk failed"
got=$(run 'echo 3 >/proc/sys/vm/drop_caches; echo R-$(head -c 8388608 /dev/vdb | sha256sum | cut -c1-64)' '^R-[0-9a-f]{64}$' 60)
say "written $want, read back $got"
[ "$want" = "$got" ] || fail "read back a different checksum from the hot-plugged disk"

# Unplug it: attention button, pciehp's 5 s window, power off.
t0=$(now)
answer=$(hp remove-device hot0)
t1=$(now)
say "unplug: $answer after $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }') s"
case $answer in *\"removal\":\"orderly\"*) ;; *) fail "the unplug was not orderly: $answer" ;; esac
[ "$(run 'echo GONE-$(ls /sys/block | grep -c vdb)' '^GONE-[0-9]+$' 10)" = 0 ] || fail "the guest still has vdb"
[ "$(blocks bulkhead-block)" = "$procs0" ] || fail "the unplugged disk's process is still there"
host=$(head -c 8388608 "$img/hot" | sha256sum | cut -c1-64)
[ "$host" = "$want" ] || fail "the image does not hold what the guest wrote"
say "image after unplug: $host"
again=$(hp remove-device hot0)
case $again in "ERR 404"*) ;; *) fail "removing twice was not refused with 404: $again" ;; esac

# The slot is free again: the same disk goes back in, and out.
vm_send vm 'while [ ! -e /sys/block/vdb ]; do usleep 20000; done; echo HOTAGAIN-1' >&2
answer=$(hp add-disk "path=$img/hot,id=hot0")
case $answer in OK*\"bdf\"*) ;; *) fail "plugging the disk again failed: $answer" ;; esac
vm_wait_for vm '^HOTAGAIN-1' 30
# A hot-plugged disk has its inflight region as a cold-plugged one does: its process is
# SIGKILLed under a direct read, restarted, and the read completes with the same data.
grep -q 'hot0: vhost-user backend connected.*INFLIGHT_SHMFD' "$SCN_DIR/vm/err" ||
	fail "the hot-plugged disk's process offers no inflight tracking (no --inflight-fd)"
hpid=$(pid_serving bulkhead-block "$img/hot")
[ -n "$hpid" ] || fail "no bulkhead-block process for the hot-plugged disk"
vm_send vm 'echo RA-$(dd if=/dev/vdb bs=4k count=2048 iflag=direct 2>/dev/null | sha256sum | cut -c1-64)'
sleep 1
kill -KILL "$hpid"
say "SIGKILL of the hot-plugged disk's process $hpid under a direct read"
vm_wait_for vm '^RA-[0-9a-f]{64}' 120
again=$(tr -d '\r' <"$SCN_DIR/vm/out" | grep -E '^RA-[0-9a-f]{64}' | tail -n 1 | sed 's/^RA-//')
grep -q 'hot0: device process restarted: session replayed' "$SCN_DIR/vm/err" || fail "the hot-plugged disk was not restarted"
grep 'hot0: device process restarted' "$SCN_DIR/vm/err" | tail -n 1 | quote "!"
[ "$again" = "$want" ] || fail "the disk plugged again reads differently"
say "plugged again, restarted under a read, read back the same"

# Removal while the guest writes: 1 MiB chunks, each with O_DIRECT and fsync, one every 0.3 s,
# from 8 MiB on; chunk i is the output of `yes CHUNK-i`, which L1 can compute too. The unplug
# is asked after the second chunk; every chunk the guest saw complete must be in the image.
vm_send vm 'i=0; while [ $i -lt 24 ]; do yes CHUNK-$i | head -c 1048576 >/tmp/c; dd if=/tmp/c of=/dev/vdb bs=1M seek=$((8 + i)) count=1 oflag=direct conv=fsync 2>/dev/null || break; echo WDONE-$i; i=$((i + 1)); usleep 300000; done; echo WEND-$i'
vm_wait_for vm '^WDONE-1' 60
t0=$(now)
answer=$(hp remove-device hot0)
t1=$(now)
say "unplug while the guest writes: $answer after $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }') s"
case $answer in *\"removal\":\"orderly\"*) ;; *) fail "the unplug under writes was not orderly: $answer" ;; esac
vm_wait_for vm '^WEND-[0-9]+' 60
ended=$(tr -d '\r' <"$SCN_DIR/vm/out" | grep -E '^WEND-[0-9]+' | tail -n 1 | sed 's/^WEND-//')
last=$(tr -d '\r' <"$SCN_DIR/vm/out" | grep -E '^WDONE-[0-9]+$' | tail -n 1 | sed 's/^WDONE-//')
say "the guest's writes: chunks 0-$last completed, the write of chunk $ended failed (the disk went away)"
[ "$ended" -lt 24 ] || fail "all 24 writes completed before the removal: none was under way during it"
i=0
while [ "$i" -le "$last" ]; do
	a=$(yes "CHUNK-$i" | head -c 1048576 | sha256sum | cut -c1-64)
	b=$(dd if="$img/hot" bs=1M skip=$((8 + i)) count=1 2>/dev/null | sha256sum | cut -c1-64)
	[ "$a" = "$b" ] || fail "chunk $i, completed in the guest before the removal, is not in the image"
	i=$((i + 1))
done
say "the $((last + 1)) chunks completed before the removal are in the image"

# Plug a NIC on a tap the VMM creates; the guest pings the host side; unplug it.
[ -c /dev/net/tun ] || fail "no /dev/net/tun in L1 (tun.ko not loaded?)"
vm_send vm 'while [ ! -e /sys/class/net/eth0 ]; do usleep 20000; done; echo HOTNET-$(cat /sys/class/net/eth0/address)' >&2
t0=$(now)
answer=$(hp add-net "tap=bhhp0,mac=52:54:00:00:09:01,ip=192.168.248.1,mask=255.255.255.0,id=hpnet")
say "plug: $answer"
case $answer in OK*\"bdf\"*) ;; *) fail "plugging a NIC failed: $answer" ;; esac
vm_wait_for vm '^HOTNET-' 60
t1=$(now)
say "hot-plugged NIC present in the guest $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }') s after the request"
r=$(run 'ip addr add 192.168.248.2/24 dev eth0 && ip link set eth0 up && ping -c 2 -i 0.2 -W 5 192.168.248.1 >/dev/null 2>&1; echo HPING-$?' '^HPING-[0-9]+$' 60)
[ "$r" = 0 ] || fail "the guest cannot ping the host side of the hot-plugged NIC"
say "the guest pings 192.168.248.1 through the hot-plugged NIC"
answer=$(hp remove-device hpnet)
say "unplug: $answer"
case $answer in *\"removal\":\"orderly\"*) ;; *) fail "the NIC unplug was not orderly: $answer" ;; esac
[ "$(run 'echo NOETH-$(ls /sys/class/net | grep -c eth0)' '^NOETH-[0-9]+$' 10)" = 0 ] || fail "the guest still has eth0"
[ "$(blocks bulkhead-net)" = 0 ] || fail "the unplugged NIC's process is still there"
sleep 0.5
[ -e /sys/class/net/bhhp0 ] && fail "the tap outlived its device"


held=$(grep -c 'was powered off just now' "$SCN_DIR/vm/err" || true)
say "$held of the 2 plugs into the slot just powered off came within pciehp's settling second (held)"

# A cold-plugged disk is removable too.
answer=$(hp remove-device cold)
say "unplug of the cold-plugged disk: $answer"
case $answer in *\"removal\":\"orderly\"*) ;; *) fail "the cold-plugged disk was not removed in order: $answer" ;; esac
[ "$(run 'echo NOVDA-$(ls /sys/block | grep -c vd)' '^NOVDA-[0-9]+$' 10)" = 0 ] || fail "the guest still has a virtio disk"

sleep 1
fds1=$(ls "/proc/$vmm/fd" | wc -l)
thr1=$(ls "/proc/$vmm/task" | wc -l)
say "after: VMM $fds1 descriptors, $thr1 threads; $(blocks bulkhead-block) bulkhead-block process(es)"
[ "$(blocks bulkhead-block)" = $((procs0 - 1)) ] || fail "device processes left behind"
[ "$thr1" -le "$thr0" ] || fail "the VMM has more threads than before ($thr0 -> $thr1)"
[ "$fds1" -le "$fds0" ] || fail "the VMM has more descriptors than before ($fds0 -> $fds1): a removed device's left behind"
# Every device is gone: none holds a GSI or an MSI route (vm.info).
irqs=$(bulkhead-ctl --api-socket "$api" info | tr -d ' \n' | sed -n 's/.*"interrupts":{\([^}]*\)}.*/\1/p')
say "vm.info after every removal: interrupts {$irqs}"
[ "$irqs" = '"gsis":0,"msi_routes":0' ] || fail "GSIs or MSI routes left behind: {$irqs}"

vm_send vm 'poweroff -f'
vm_wait_exit vm 60
vm_no_panic vm
[ "$VM_STATUS" = 0 ] || fail "bulkhead exited with status $VM_STATUS"
exit 0
