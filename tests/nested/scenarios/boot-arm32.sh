#!/bin/sh
# timeout: 420
# 32-bit guests on the arm64 host (docs/boot.md, docs/uefi.md): Debian's armhf LPAE kernel (a
# zImage) and an armhf busybox initramfs, on AArch32 vCPUs, each boot with a virtio disk on the
# PCIe bus (a bulkhead-block process behind a root port, MSI-X through the ITS):
# - a1, 1 vCPU, UEFI: Debian's 32-bit ArmVirtQemu (qemu-efi-arm) runs from flash and boots, with
#   no boot entries configured, \EFI\BOOT\BOOTARM.EFI (systemd-boot for arm, a loader entry for
#   the zImage and initramfs) from a GPT disk that `bulkhead image check --arch arm` accepts;
#   the guest has /sys/firmware/efi. It writes 4 MiB of random data to a second disk, checked
#   against the image on the host.
# - a2, 2 vCPUs, --kernel: the zImage loaded directly; it reads a1's data back and writes a
#   second region, checked on the host again.
# Each vCPU thread is pinned to its own L1 CPU (--cpus affinity=, checked here too): in this
# nested setup (L1's KVM on a QEMU TCG CPU) a 32-bit guest whose vCPU threads moved between L1's
# CPUs, or shared one, crashed now and then ("Returning to usermode but unexpected PSR bits
# set", a corrupted `current`), on 1 vCPU as on 2, or hung; pinned, it never did (docs/boot.md).
# shellcheck disable=SC2016 # the commands typed into the guest expand there
. "${HARNESS_DIR:-/harness}/lib.sh"

FIRMWARE=$GUEST_DIR/arm32/AAVMF32_CODE.fd
ESP_DISK=$GUEST_DIR/arm32/systemd-boot.img
for f in "$GUEST32_KERNEL" "$FIRMWARE" "$ESP_DISK"; do
	[ -f "$f" ] || fail "no $f (packed by run.sh for *arm32* scenarios)"
done
img=$SCN_DIR/img
mkdir -p "$img"
dd if=/dev/zero of="$img/d0" bs=1M count=16 2>/dev/null
MiB4=4194304

# The image checker: the 32-bit disk conforms for arm, not for aarch64 (no BOOTAA64.EFI).
"$BULKHEAD" image check --arch arm "$ESP_DISK" | quote "|"
"$BULKHEAD" image check --arch arm "$ESP_DISK" >/dev/null || fail "bulkhead image check --arch arm refuses $ESP_DISK"
if "$BULKHEAD" image check --arch aarch64 "$ESP_DISK" >/dev/null 2>&1; then
	fail "bulkhead image check --arch aarch64 accepts a disk with only BOOTARM.EFI"
fi

# Pointer authentication is AArch64's: required for a 32-bit guest, it is refused before
# anything starts.
"$BULKHEAD" --kernel "$GUEST32_KERNEL" --cpus boot=1,pauth=on </dev/null >"$SCN_DIR/pauth.out" 2>"$SCN_DIR/pauth.err"
st=$?
say "--cpus pauth=on with the 32-bit kernel: status $st, $(grep -m 1 pauth "$SCN_DIR/pauth.err")"
[ "$st" = 2 ] || fail "--cpus pauth=on with a 32-bit guest gave status $st, expected 2"
grep -q '32-bit guest has no pointer authentication' "$SCN_DIR/pauth.err" ||
	fail "the refusal of pauth=on for a 32-bit guest does not say why"

# run VM CMD PATTERN TIMEOUT: a command in the guest shell; prints the last line matching
# PATTERN, without its marker prefix.
run() {
	vm_send "$1" "$2" >&2
	vm_wait_for "$1" "$3" "$4"
	tr -d '\r' <"$SCN_DIR/$1/out" | grep -E "$3" | tail -n 1 | sed 's/^[A-Z0-9]*-//'
}

# ready VM CPUS DISK: waits for the 32-bit guest and checks what it sees; DISK is the guest's
# name of the 16 MiB data disk.
ready() {
	vm_wait_for "$1" '^GUEST-READY' "$2"
	say "$1: guest ready $(elapsed "$1") s after start"
	vm_show_markers "$1"
	check_guest "$1" 1 "$3" 400000 524288
	tr -d '\r' <"$SCN_DIR/$1/out" | grep -q "^GUEST-DISK $4 32768 ro=0 " ||
		fail "$1: the guest has no 16 MiB virtio disk $4"
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

vm_start a1 --firmware "$FIRMWARE" --firmware-vars "$SCN_DIR/vars.fd" --cpus 'boot=1,affinity=[0@[1]]' -v \
	--disk "path=$ESP_DISK,readonly=on,id=esp" --disk "path=$img/d0,id=data"
ready a1 240 1 vdb
grep -q '32-bit arm code' "$SCN_DIR/a1/err" || fail "a1: bulkhead did not start the firmware as 32-bit arm code"
say "a1: $(tr -d '\r' <"$SCN_DIR/a1/out" | grep -m 1 -E 'BdsDxe: starting' || echo 'no BdsDxe line')"
efi=$(run a1 'echo EFI-$(ls -d /sys/firmware/efi)' '^EFI-' 20)
[ "$efi" = /sys/firmware/efi ] || fail "a1: no /sys/firmware/efi in the UEFI-booted guest ($efi)"
want=$(run a1 "head -c $MiB4 /dev/urandom >/tmp/r && echo W-\$(sha256sum /tmp/r | cut -c1-64)" '^W-[0-9a-f]{64}$' 60)
got=$(run a1 "dd if=/tmp/r of=/dev/vdb bs=64k conv=fsync 2>/dev/null; echo 3 >/proc/sys/vm/drop_caches; echo R-\$(head -c $MiB4 /dev/vdb | sha256sum | cut -c1-64)" '^R-[0-9a-f]{64}$' 60)
say "a1 (UEFI, 1 vCPU): wrote $want, read back $got"
[ "$want" = "$got" ] || fail "a1: the guest read back a different checksum"
stop a1
host=$(head -c $MiB4 "$img/d0" | sha256sum | cut -c1-64)
say "image on the host: $host"
[ "$host" = "$want" ] || fail "the image holds $host, the guest wrote $want"

vm_start a2 --kernel "$GUEST32_KERNEL" --initramfs "$GUEST32_INITRAMFS" --cmdline "$GUEST_CMDLINE" \
	--cpus 'boot=2,affinity=[0@[0],1@[1]]' --memory size=512M --disk "path=$img/d0,id=data"
pid=$(vm_pid a2)
ready a2 "$BOOT_TIMEOUT" 2 vda
for t in /proc/"$pid"/task/*; do
	c=$(cat "$t/comm")
	case $c in vcpu*) echo "$c $(awk '/^Cpus_allowed_list/ { print $2 }' "$t/status")" ;; esac
done >"$SCN_DIR/pinned"
say "a2: vCPU threads' allowed CPUs: $(tr '\n' ' ' <"$SCN_DIR/pinned")"
[ "$(sort "$SCN_DIR/pinned" | tr '\n' ' ')" = "vcpu0 0 vcpu1 1 " ] ||
	fail "a2: the vCPU threads are not pinned as --cpus affinity= asked"
got=$(run a2 "echo R-\$(head -c $MiB4 /dev/vda | sha256sum | cut -c1-64)" '^R-[0-9a-f]{64}$' 60)
say "a2 (--kernel, 2 vCPUs): the first boot's data reads back as $got"
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
