#!/bin/sh
# timeout: 300
# A 32-bit guest on the arm64 host: Debian's armhf LPAE kernel (a zImage) boots to its init
# with AArch32 vCPUs, on 1 vCPU and then on 2, each time with a virtio disk on the PCIe bus
# (a bulkhead-block process behind a root port, MSI-X through the ITS). The first boot writes
# 4 MiB of random data, checked against the image on the host; the second reads it back and
# writes a second region, checked again.
# shellcheck disable=SC2016 # the commands typed into the guest expand there
. "${HARNESS_DIR:-/harness}/lib.sh"

[ -f "$GUEST32_KERNEL" ] || fail "no 32-bit guest kernel at $GUEST32_KERNEL (packed by run.sh for *arm32* scenarios)"
img=$SCN_DIR/img
mkdir -p "$img"
dd if=/dev/zero of="$img/d0" bs=1M count=16 2>/dev/null
MiB4=4194304

# run VM CMD PATTERN TIMEOUT: a command in the guest shell; prints the last line matching
# PATTERN, without its marker prefix.
run() {
	vm_send "$1" "$2" >&2
	vm_wait_for "$1" "$3" "$4"
	tr -d '\r' <"$SCN_DIR/$1/out" | grep -E "$3" | tail -n 1 | sed 's/^[A-Z0-9]*-//'
}

# boot VM CPUS: starts the 32-bit guest and checks what it sees.
boot() {
	vm_start "$1" --kernel "$GUEST32_KERNEL" --initramfs "$GUEST32_INITRAMFS" \
		--cmdline "$GUEST_CMDLINE" --cpus boot="$2" --memory size=512M --disk "path=$img/d0,id=disk0"
	vm_wait_for "$1" '^GUEST-READY' "$BOOT_TIMEOUT"
	say "$1: guest ready $(elapsed "$1") s after start"
	vm_show_markers "$1"
	check_guest "$1" 1 "$2" 400000 524288
	tr -d '\r' <"$SCN_DIR/$1/out" | grep -q '^GUEST-DISK vda 32768 ro=0 ' ||
		fail "$1: the guest has no 16 MiB virtio disk vda"
	sleep 1
	machine=$(run "$1" 'echo ARCH-$(uname -m)' '^ARCH-[a-z0-9_]+$' 20)
	say "$1: uname -m in the guest: $machine"
	case $machine in armv7l | armv8l) ;; *) fail "$1: the guest runs as '$machine', not 32-bit arm" ;; esac
}

# stop VM: poweroff in the guest ends the VMM with status 0.
stop() {
	vm_send "$1" 'poweroff -f'
	vm_wait_exit "$1" 30
	vm_no_panic "$1"
	[ "$VM_STATUS" = 0 ] || fail "$1: bulkhead exited with status $VM_STATUS after poweroff"
}

boot a1 1
want=$(run a1 "head -c $MiB4 /dev/urandom >/tmp/r && echo W-\$(sha256sum /tmp/r | cut -c1-64)" '^W-[0-9a-f]{64}$' 60)
got=$(run a1 "dd if=/tmp/r of=/dev/vda bs=64k conv=fsync 2>/dev/null; echo 3 >/proc/sys/vm/drop_caches; echo R-\$(head -c $MiB4 /dev/vda | sha256sum | cut -c1-64)" '^R-[0-9a-f]{64}$' 60)
say "a1 (1 vCPU): wrote $want, read back $got"
[ "$want" = "$got" ] || fail "a1: the guest read back a different checksum"
stop a1
host=$(head -c $MiB4 "$img/d0" | sha256sum | cut -c1-64)
say "image on the host: $host"
[ "$host" = "$want" ] || fail "the image holds $host, the guest wrote $want"

boot a2 2
got=$(run a2 "echo R-\$(head -c $MiB4 /dev/vda | sha256sum | cut -c1-64)" '^R-[0-9a-f]{64}$' 60)
say "a2 (2 vCPUs): the first boot's data reads back as $got"
[ "$got" = "$want" ] || fail "a2: the data written by the first boot reads back as $got"
cpus=$(run a2 'echo ONLINE-$(cat /sys/devices/system/cpu/online)' '^ONLINE-[0-9,-]+$' 10)
[ "$cpus" = 0-1 ] || fail "a2: online CPUs are '$cpus', expected 0-1"
want2=$(run a2 "head -c $MiB4 /dev/urandom >/tmp/r2 && echo W2-\$(sha256sum /tmp/r2 | cut -c1-64)" '^W2-[0-9a-f]{64}$' 60)
run a2 "dd if=/tmp/r2 of=/dev/vda bs=64k seek=64 conv=fsync 2>/dev/null; echo DONE2-ok" '^DONE2-ok' 60 >/dev/null
irqs=$(run a2 'echo MSI-$(grep -c "ITS-MSI" /proc/interrupts)' '^MSI-[0-9]+$' 10)
say "a2: ITS-MSI lines in /proc/interrupts: $irqs"
[ "$irqs" -gt 0 ] || fail "a2: the disk has no MSI through the ITS"
stop a2
host=$(dd if="$img/d0" bs=64k skip=64 count=64 2>/dev/null | sha256sum | cut -c1-64)
say "a2 wrote $want2; the image holds $host"
[ "$host" = "$want2" ] || fail "the image holds $host where the 2-vCPU guest wrote $want2"
