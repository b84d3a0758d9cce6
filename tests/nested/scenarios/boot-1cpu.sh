#!/bin/sh
# timeout: 210
# One vCPU, 512M (the defaults: no --cpus/--memory): the guest reaches /init and sees what a
# virt-like arm64 machine should show; the VMM's stdin reaches the guest shell; `reboot -f`
# boots the guest again in the same process; `poweroff -f` ends the VMM with status 0. The guest
# has pointer authentication (paca, pacg). The VMM says that the console's output, its register
# reads and bus 0's configuration reads go without exits (KVM's coalesced MMIO and read-only
# slots), and the guest's markers (root ports, console) come through them; printing 4000
# characters costs far fewer exits than characters.
# shellcheck disable=SC2016 # the commands typed into the guest expand there
. "${HARNESS_DIR:-/harness}/lib.sh"

vm_start vm -v --kernel "$GUEST_KERNEL" --initramfs "$GUEST_INITRAMFS" --cmdline "$GUEST_CMDLINE"
vm_wait_for vm '^GUEST-READY' "$BOOT_TIMEOUT"
say "guest ready $(elapsed vm) s after start"
vm_show_markers vm
check_guest vm 1 1 400000 524288
for what in 'console: KVM queues' 'console: PL011 register reads come from memory' \
	"PCI: bus 0's configuration registers are read from memory"; do
	line=$(grep -m 1 "$what" "$SCN_DIR/vm/err") || fail "no '$what' line in bulkhead's log"
	say "bulkhead: ${line#*] }"
done
# Pointer authentication, which the nested host's CPU (-cpu max) has: the guest's kernel and
# programs can sign return addresses, as under QEMU (docs/boot.md "vCPU features").
line=$(grep -m 1 'pointer authentication' "$SCN_DIR/vm/err") ||
	fail "no 'pointer authentication' line in bulkhead's log"
say "bulkhead: ${line#*] }"
feats=$(vm_marker vm CPU-FEATURES)
say "the guest's CPU features: $feats"
for f in paca pacg; do
	case " $feats " in *" $f "*) ;; *) fail "the guest's CPU lacks '$f' (pointer authentication)" ;; esac
done
ports=$(vm_count vm '^GUEST-PCI 0000:00:0[1-8]\.0 1b36:000c 0x060400 pcieport')
[ "$ports" = 8 ] || fail "the guest found $ports root ports with pcieport bound, expected 8"

sleep 1
vm_send_until vm 'echo marker-$((6*7))' '^marker-42' 30
say "the guest shell answered: $(tr -d '\r' <"$SCN_DIR/vm/out" | grep -m 1 '^marker-42')"

# The console's register page: Linux reads the PL011's flag register before each character a
# tty write sends, which without the page is an MMIO exit to the VMM per character. A line of
# 4000 characters, printed in one write, must cost far fewer exits than that (what is left:
# the writes that mask the TX interrupt after each batch, and the queued-write ring filling
# every ~170 characters); typing the command (the page goes while input waits, and the reads
# exit) costs a few hundred. KVM's per-VM counters are in L1's debugfs.
if ! grep -q ' /sys/kernel/debug ' /proc/mounts; then
	mount -t debugfs none /sys/kernel/debug || fail "cannot mount debugfs for KVM's exit counters"
fi
mmio_exits() {
	_n=0
	_seen=0
	for _f in /sys/kernel/debug/kvm/"$(vm_pid vm)"-*/mmio_exit_user; do
		[ -r "$_f" ] || continue
		_n=$((_n + $(cat "$_f")))
		_seen=1
	done
	[ "$_seen" = 1 ] || fail "no KVM exit counters for bulkhead's VM in /sys/kernel/debug/kvm"
	echo "$_n"
}
long='^0000000000000000'
exits0=$(mmio_exits)
prints0=$(vm_count vm "$long")
vm_send_until vm "printf '%04000d\\n' 0; echo printed-\$((2*2))" '^printed-4' 30
prints=$(($(vm_count vm "$long") - prints0))
exits=$(($(mmio_exits) - exits0))
say "printing a line of 4000 characters $prints time(s) through the PL011 took $exits MMIO exits to the VMM"
[ "$prints" -ge 1 ] || fail "the guest printed no line of 4000 characters"
[ "$exits" -lt $((prints * 2000)) ] ||
	fail "$exits MMIO exits for $prints x 4000 printed characters: the flag register reads exit"

id1=$(vm_marker vm INIT 1)
vm_send vm 'reboot -f'
vm_wait_for vm '^GUEST-READY' "$BOOT_TIMEOUT" 2
id2=$(vm_marker vm INIT 2)
say "second boot ready $(elapsed vm) s after start: $id2 (first: $id1)"
if [ -z "$id2" ] || [ "$id1" = "$id2" ]; then
	fail "second boot has the same boot id as the first ($id1)"
fi
check_guest vm 2 1 400000 524288
# A new VM after the reset: the read-only slots are given to it again.
ports=$(vm_count vm '^GUEST-PCI 0000:00:0[1-8]\.0 1b36:000c 0x060400 pcieport')
[ "$ports" = 16 ] || fail "after the reboot the guest found $((ports - 8)) root ports with pcieport bound, expected 8"
vm_send_until vm 'echo again-$((6*7))' '^again-42' 30

vm_send vm 'poweroff -f'
vm_wait_exit vm 30
say "bulkhead exited with status $VM_STATUS $(elapsed vm) s after start"
vm_no_panic vm
[ "$VM_STATUS" = 0 ] || fail "bulkhead exited with status $VM_STATUS after guest poweroff, expected 0"
