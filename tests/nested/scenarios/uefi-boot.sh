#!/bin/sh
# timeout: 420
# UEFI boot (docs/uefi.md): Debian's edk2 ArmVirtQemu build (QEMU_EFI.fd) runs in place from
# flash bank 0 and boots, with no boot entries configured, the removable-media path
# \EFI\BOOT\BOOTAA64.EFI from the ESP of a GPT disk on the virtio-blk device process: first
# systemd-boot (a loader entry), then, in a second bulkhead with the same vars file, GRUB
# (grub-mkstandalone); each loads the guest kernel and initramfs, and the guest reaches its
# init with /sys/firmware/efi. A variable the first guest writes through efivarfs is in the
# --firmware-vars file after bulkhead exits, and the second guest reads it back.
# shellcheck disable=SC2016 # the commands typed into the guest expand there
. "${HARNESS_DIR:-/harness}/lib.sh"

FIRMWARE=$GUEST_DIR/uefi/QEMU_EFI.fd
SDBOOT_DISK=$GUEST_DIR/uefi/systemd-boot.img
GRUB_DISK=$GUEST_DIR/uefi/grub.img
VARS=$SCN_DIR/vars.fd
GUID=3f7c6b0e-0c1d-4a8b-9a55-6b1c2d3e4f50
VAR=/sys/firmware/efi/efivars/BulkheadTest-$GUID
UEFI_TIMEOUT=${UEFI_TIMEOUT:-300}
rm -f "$VARS"

# The image checker accepts both test disks (docs/image-check.md).
for disk in "$SDBOOT_DISK" "$GRUB_DISK"; do
	"$BULKHEAD" image check "$disk" | quote "|"
	"$BULKHEAD" image check "$disk" >/dev/null || fail "bulkhead image check refuses $disk"
done

uefi_vm() { # uefi_vm ID DISK: a 2-vCPU UEFI VM with DISK and the vars file
	vm_start "$1" --firmware "$FIRMWARE" --firmware-vars "$VARS" --cpus boot=2 \
		--disk "path=$2,readonly=on"
	vm_wait_for "$1" '^GUEST-READY' "$UEFI_TIMEOUT"
	say "$1: guest ready $(elapsed "$1") s after start"
	vm_show_markers "$1"
	vm_no_panic "$1"
	sleep 1
	vm_send_until "$1" 'echo EFI-DIR=$(ls -d /sys/firmware/efi)' '^EFI-DIR=/sys/firmware/efi' 30
	vm_send_until "$1" 'insmod /lib/modules/efivarfs.ko; mount -t efivarfs efivarfs /sys/firmware/efi/efivars && echo EFIVARS-MOUNTED' \
		'^EFIVARS-MOUNTED' 30
}

uefi_vm vm1 "$SDBOOT_DISK"
[ -s "$VARS" ] || fail "no vars file $VARS"
say "firmware: $(tr -d '\r' <"$SCN_DIR/vm1/out" | grep -m 1 -E 'UEFI firmware|EDK II|Firmware' || echo '?')"
say "vm1 boot: $(tr -d '\r' <"$SCN_DIR/vm1/out" | grep -m 1 -E 'BdsDxe: starting' || echo '?')"
vm_send vm1 "printf '\\007\\000\\000\\000bulkhead-42' >$VAR"
vm_send_until vm1 "echo SET=\$(tail -c +5 $VAR)" '^SET=bulkhead-42' 30
vm_send vm1 'poweroff -f'
vm_wait_exit vm1 60
[ "$VM_STATUS" = 0 ] || fail "bulkhead exited with status $VM_STATUS after poweroff, expected 0"
grep -q bulkhead-42 "$VARS" 2>/dev/null || fail "the variable is not in the vars file $VARS"
say "the vars file holds the variable after bulkhead exited"

uefi_vm vm2 "$GRUB_DISK"
vm_send_until vm2 "echo GOT=\$(tail -c +5 $VAR)" '^GOT=bulkhead-42' 30
say "second start read the variable back: $(tr -d '\r' <"$SCN_DIR/vm2/out" | grep -m 1 '^GOT=')"
vm_send vm2 'poweroff -f'
vm_wait_exit vm2 60
[ "$VM_STATUS" = 0 ] || fail "bulkhead exited with status $VM_STATUS after poweroff, expected 0"
