#!/bin/sh
# timeout: 200
# TEMP: guest dmesg with timestamps, for the boot-time profile.
# shellcheck disable=SC2016
. "${HARNESS_DIR:-/harness}/lib.sh"
dd if=/dev/zero of="$SCN_DIR/d" bs=1M count=8 2>/dev/null
vm_start vm --kernel "$GUEST_KERNEL" --initramfs "$GUEST_INITRAMFS" --cmdline "console=ttyAMA0 quiet" -v \
	--cpus boot=2 --memory size=1G --disk "path=$SCN_DIR/d"
vm_wait_for vm '^GUEST-READY' "$BOOT_TIMEOUT"
say "guest ready $(elapsed vm) s after start"
sleep 1
vm_send vm 'dmesg | sed "s/^/DM /"; echo DMDONE'
vm_wait_for vm '^DMDONE' 60
tr -d '\r' <"$SCN_DIR/vm/out" | grep '^DM ' | quote "dmesg"
tr -d '\r' <"$SCN_DIR/vm/out" | grep -E '^\[ *[0-9]+\.[0-9]+\]' | head -400 | quote "con"
say "t_start $(cat "$SCN_DIR/vm/t_start")"
grep -m1 GUEST-UPTIME "$SCN_DIR/vm/out" | quote "up"
vm_show_markers vm
vm_send vm 'poweroff -f'
vm_wait_exit vm 30
exit 0
