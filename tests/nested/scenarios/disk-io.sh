#!/bin/sh
# timeout: 420
# Three disks served by bulkhead-block processes behind PCIe root ports: the guest sees each
# in its own slot; 16 MiB of random data written to one reads back with the same checksum and
# is on the host image afterwards; a read-only disk refuses writes; discard reaches the image;
# unbinding and rebinding the driver keeps I/O working; the VMM itself does no block I/O.
# shellcheck disable=SC2016 # the commands typed into the guest expand there
. "${HARNESS_DIR:-/harness}/lib.sh"
img=$SCN_DIR/img
mkdir -p "$img"
dd if=/dev/zero of="$img/d0" bs=1M count=96 2>/dev/null
# d1 is all 0xff, so a discard shows as zeros.
tr '\000' '\377' </dev/zero | head -c $((32 << 20)) >"$img/d1"
head -c $((16 << 20)) /dev/urandom >"$img/ro"
ro_sum=$(sha256sum "$img/ro" | cut -c1-64)

vm_start vm --kernel "$GUEST_KERNEL" --initramfs "$GUEST_INITRAMFS" --cmdline "$GUEST_CMDLINE" \
	--cpus boot=2 --memory size=1G -v \
	--disk "path=$img/d0,serial=bulkhead-d0" \
	--disk "path=$img/d1,num_queues=2" \
	--disk "path=$img/ro,readonly=on,restart=never"
vm_wait_for vm '^GUEST-READY' "$BOOT_TIMEOUT"
say "guest ready $(elapsed vm) s after start"
vm_show_markers vm

# Each virtio disk is function 0 of its own bus, behind its own root port.
n_virtio=$(tr -d '\r' <"$SCN_DIR/vm/out" | grep -cE '^GUEST-PCI [0-9a-f:.]+ 1af4:1042 0x018000 virtio-pci')
[ "$n_virtio" = 3 ] || fail "expected 3 virtio-blk PCI functions bound to virtio-pci, saw $n_virtio"
n_ports=$(tr -d '\r' <"$SCN_DIR/vm/out" | grep -cE '^GUEST-PCI 0000:00:0[1-8]\.0 1b36:000c 0x060400 pcieport')
[ "$n_ports" = 8 ] || fail "expected 8 root ports bound to pcieport, saw $n_ports"
buses=$(tr -d '\r' <"$SCN_DIR/vm/out" | sed -n 's/^GUEST-DISK vd. [0-9]* ro=. serial=[^ ]* pci=0000:\(..\):00\.0$/\1/p' | sort -u | wc -l)
[ "$buses" = 3 ] || fail "the three disks are not on three different buses"
d0=$(tr -d '\r' <"$SCN_DIR/vm/out" | sed -n 's/^GUEST-DISK \(vd.\) 196608 ro=0 serial=bulkhead-d0 .*/\1/p')
d1=$(tr -d '\r' <"$SCN_DIR/vm/out" | sed -n 's/^GUEST-DISK \(vd.\) 65536 ro=0 .*/\1/p')
ro=$(tr -d '\r' <"$SCN_DIR/vm/out" | sed -n 's/^GUEST-DISK \(vd.\) 32768 ro=1 .*/\1/p')
[ -n "$d0" ] && [ -n "$d1" ] && [ -n "$ro" ] || fail "disks not seen with the right sizes, serial and read-only flag (d0=$d0 d1=$d1 ro=$ro)"
say "disks: $d0 (serial bulkhead-d0), $d1 (2 queues), $ro (read-only)"

sleep 1
vm_send_until vm 'echo Q-$(ls /sys/block/'"$d1"'/mq | wc -l)' '^Q-[0-9]' 30
[ "$(tr -d '\r' <"$SCN_DIR/vm/out" | sed -n 's/^Q-//p' | head -n 1)" = 2 ] ||
	fail "$d1 does not have 2 queues"

# The shell is up (it answered): from here each command is typed once and waited for, since
# typing one again would redo its side effects.
run() { # run COMMAND ERE TIMEOUT: type COMMAND, wait for a line matching ERE, print its value.
	vm_send vm "$1" >&2
	vm_wait_for vm "$2" "$3"
	tr -d '\r' <"$SCN_DIR/vm/out" | grep -E "$2" | tail -n 1 | sed 's/^[A-Z]*-//'
}
# Who does the I/O: the VMM's read/write counters before and after 128 MiB of guest I/O.
vmm=$(vm_pid vm)
io_of() { awk -v k="$2" '$1 == k":" { print $2 }' "/proc/$1/io"; }
vmm_r0=$(io_of "$vmm" rchar)
vmm_w0=$(io_of "$vmm" wchar)
want=$(run 'head -c 16777216 /dev/urandom >/tmp/r && echo W-$(sha256sum /tmp/r | cut -c1-64)' '^W-[0-9a-f]{64}$' 120)
[ "$(run "dd if=/tmp/r of=/dev/$d0 bs=1M conv=fsync 2>/dev/null; echo WROTE-\$?" '^WROTE-[0-9]+$' 180)" = 0 ] ||
	fail "writing 16 MiB to $d0 failed"
got=$(run "echo 3 >/proc/sys/vm/drop_caches; echo R-\$(head -c 16777216 /dev/$d0 | sha256sum | cut -c1-64)" '^R-[0-9a-f]{64}$' 120)
say "written $want, read back $got"
[ "$want" = "$got" ] || fail "read back a different checksum"

vmm_dr=$(($(io_of "$vmm" rchar) - vmm_r0))
vmm_dw=$(($(io_of "$vmm" wchar) - vmm_w0))
say "VMM (pid $vmm) during the 16 MiB write and read: rchar +$vmm_dr, wchar +$vmm_dw bytes"
[ "$vmm_dr" -lt 1048576 ] && [ "$vmm_dw" -lt 1048576 ] || fail "the VMM moved data during guest I/O: it is on the data path"
# The VMM holds no image open but to hand it to a restarted device process (restart=, the
# default): one duplicate per restartable disk, none for the restart=never one; each device
# process holds its own.
vmm_fds=$(ls -l "/proc/$vmm/fd" 2>/dev/null | grep -c "$img/" || true)
say "VMM open descriptors on the images: $vmm_fds (kept for restarts)"
[ "$vmm_fds" = 2 ] || fail "the VMM holds $vmm_fds image descriptors, expected 2 (d0, d1; not ro with restart=never)"
if ls -l "/proc/$vmm/fd" 2>/dev/null | grep -q "$img/ro"; then fail "the VMM holds the restart=never image open"; fi
n_dev=0
for p in $(devices_of "$vmm" bulkhead-block); do
	p=/proc/$p
	held=$(ls -l "$p/fd" 2>/dev/null | sed -n "s|.*-> $img/||p" | tr '\n' ' ')
	say "device process ${p#/proc/}: holds image(s) $held; $(awk '{ print "utime " $14 ", stime " $15 " ticks" }' "$p/stat")"
	[ -n "$held" ] && n_dev=$((n_dev + 1))
done
[ "$n_dev" = 3 ] || fail "expected 3 device processes each holding its image, found $n_dev"

rc=$(run "dd if=/dev/zero of=/dev/$ro bs=4096 count=1 conv=fsync 2>/dev/null; echo ROW-\$?" '^ROW-[0-9]+$' 30)
say "write to read-only $ro: status $rc"
[ "$rc" != 0 ] || fail "a write to the read-only disk succeeded"

rc=$(run "blkdiscard -o 0 -l 4194304 /dev/$d1; echo DISC-\$?" '^DISC-[0-9]+$' 30)
[ "$rc" = 0 ] || fail "discard on $d1 failed (status $rc)"

# Unbind and rebind the PCI function of d0, then reload the virtio-blk driver: I/O goes on.
bdf=$(tr -d '\r' <"$SCN_DIR/vm/out" | sed -n "s/^GUEST-DISK $d0 .* pci=//p" | head -n 1)
d0b=$(run "echo $bdf >/sys/bus/pci/drivers/virtio-pci/unbind; echo $bdf >/sys/bus/pci/drivers/virtio-pci/bind; sleep 1; echo UB-\$(ls /sys/bus/pci/devices/$bdf/virtio*/block)" '^UB-vd[a-z]+$' 60)
say "after unbind and bind of $bdf: $d0b"
again=$(run "rmmod virtio_blk && insmod /lib/modules/virtio_blk.ko && sleep 1 && echo 3 >/proc/sys/vm/drop_caches; echo RB-\$(head -c 16777216 /dev/\$(ls /sys/bus/pci/devices/$bdf/virtio*/block) | sha256sum | cut -c1-64)" '^RB-[0-9a-f]{64}$' 120)
say "after rebinding $bdf and reloading virtio_blk: $again"
[ "$again" = "$want" ] || fail "reading after the rebind gave a different checksum"

# A guest reboot resets every device and the VM is rebuilt; the disks come back and still
# hold the data.
vm_send vm 'reboot -f'
vm_wait_for vm '^GUEST-READY' "$BOOT_TIMEOUT" 2
n=$(tr -d '\r' <"$SCN_DIR/vm/out" | grep -cE '^GUEST-DISK vd')
say "after the reboot the guest lists $((n - 3)) disks"
[ "$n" = 6 ] || fail "after the reboot the guest does not see its 3 disks again"
sleep 1
after=$(run "echo AR-\$(head -c 16777216 /dev/\$(ls /sys/bus/pci/devices/$bdf/virtio*/block) | sha256sum | cut -c1-64)" '^AR-[0-9a-f]{64}$' 120)
say "after the reboot: $after"
[ "$after" = "$want" ] || fail "reading after the reboot gave a different checksum"

vm_send vm 'poweroff -f'
vm_wait_exit vm 60
say "bulkhead exited with status $VM_STATUS $(elapsed vm) s after start"
vm_no_panic vm
[ "$VM_STATUS" = 0 ] || fail "bulkhead exited with status $VM_STATUS after guest poweroff, expected 0"

# Each device process reports what it served when the VMM disconnects.
grep -E 'bulkhead_block.*served' "$SCN_DIR/vm/err" | quote "!"
stat_of() { grep -E "disk $img/$1: served" "$SCN_DIR/vm/err" | sed -n "s/.* $2=\([0-9]*\).*/\1/p" | tail -n 1; }
flushes=$(stat_of d0 flushes)
written=$(stat_of d0 write_bytes)
discards=$(stat_of d1 discards)
[ "${flushes:-0}" -ge 1 ] || fail "no flush reached d0's device process (flushes=$flushes)"
[ "${written:-0}" -ge 16777216 ] || fail "d0's device process wrote $written bytes, expected at least 16 MiB"
[ "${discards:-0}" -ge 1 ] || fail "no discard reached d1's device process (discards=$discards)"
[ "$(stat_of ro writes)" = 0 ] || fail "the read-only disk's process saw writes"

host=$(head -c 16777216 "$img/d0" | sha256sum | cut -c1-64)
say "host image d0: $host"
[ "$host" = "$want" ] || fail "the host image does not hold the guest's data"
[ "$(sha256sum "$img/ro" | cut -c1-64)" = "$ro_sum" ] || fail "the read-only image changed"
zeros=$(head -c 4194304 "$img/d1" | tr -d '\000' | wc -c)
rest=$(tail -c +4194305 "$img/d1" | head -c 4096 | tr -d '\377' | wc -c)
say "d1 after discard: $zeros non-zero bytes in the discarded 4 MiB, $rest non-0xff bytes after it"
[ "$zeros" = 0 ] || fail "the discarded range of d1 is not zero on the host"
[ "$rest" = 0 ] || fail "discard changed data outside its range"
exit 0
