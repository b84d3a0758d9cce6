#!/bin/sh
# timeout: 200
# Two network interfaces in one guest: two bulkhead-net processes, each in its own slot, its
# own network namespace and on its own tap (its queue descriptor names the tap), each NIC
# with its MAC (one given, one the default: locally administered, derived from the id); the
# guest reaches L1 over each.
# shellcheck disable=SC2016 # the commands typed into the guest expand there
. "${HARNESS_DIR:-/harness}/lib.sh"

MAC1=52:54:00:00:01:01
vm_start vm --kernel "$GUEST_KERNEL" --initramfs "$GUEST_INITRAMFS" --cmdline "$GUEST_CMDLINE" \
	--memory size=512M -v \
	--net "tap=bh1,mac=$MAC1,ip=192.168.250.1,mask=255.255.255.0" \
	--net "tap=bh2,ip=192.168.251.1,mask=255.255.255.0,id=second"
vm_wait_for vm '^GUEST-READY' "$BOOT_TIMEOUT"
say "guest ready $(elapsed vm) s after start"
vm_show_markers vm | grep -E 'GUEST-(NET|PCI [^ ]* 1af4)'
[ "$(tr -d '\r' <"$SCN_DIR/vm/out" | grep -cE '^GUEST-PCI [0-9a-f:.]+ 1af4:1041 0x020000 virtio-pci$')" = 2 ] ||
	fail "expected two virtio-net PCI functions"
buses=$(tr -d '\r' <"$SCN_DIR/vm/out" | sed -n 's/^GUEST-NET .* pci=0000:\(..\):00\.0 .*/\1/p' | sort -u | wc -l)
[ "$buses" = 2 ] || fail "the two NICs are not in two slots (buses)"
if1=$(tr -d '\r' <"$SCN_DIR/vm/out" | awk -v m="$MAC1" '$1 == "GUEST-NET" && $3 == m { print $2 }')
if2=$(tr -d '\r' <"$SCN_DIR/vm/out" | awk -v m="$MAC1" '$1 == "GUEST-NET" && $3 != m { print $2 " " $3 }')
set -- $if2
if2=$1
mac2=$2
[ -n "$if1" ] || fail "no guest interface has MAC $MAC1"
[ -n "$if2" ] || fail "no second guest interface"
say "guest: $if1 ($MAC1), $if2 ($mac2, the default MAC of id 'second')"
case $mac2 in 52:*) ;; *) fail "the default MAC $mac2 is not locally administered (52:...)" ;; esac

# Two processes, two namespaces, two taps.
vmm=$(vm_pid vm)
spawner=$(spawner_of "$vmm")
devs=
for p in $(children_of "$spawner"); do devs="$devs $p"; done
[ "$(echo $devs | wc -w)" = 2 ] || fail "expected two device processes, found:$devs"
seen_taps=
seen_ns=
for d in $devs; do
	comm=$(cat "/proc/$d/comm")
	ns=$(readlink "/proc/$d/ns/net")
	tap=$(awk '$1 == "iff:" { print $2 }' "/proc/$d/fdinfo/5" 2>/dev/null)
	ntun=$(ls -l "/proc/$d/fd" | grep -c /dev/net/tun)
	say "device process $d: comm $comm, net namespace $ns, fd 5 a queue of '$tap', $ntun tap descriptor(s)"
	[ "$comm" = bulkhead-net ] || fail "device process $d is $comm, not bulkhead-net"
	[ "$ntun" = 1 ] || fail "device process $d holds $ntun tap descriptors, expected 1"
	[ "$ns" != "$(readlink "/proc/$vmm/ns/net")" ] || fail "device $d shares the VMM's network namespace"
	case " $seen_ns " in *" $ns "*) fail "both device processes share network namespace $ns" ;; esac
	seen_ns="$seen_ns $ns"
	seen_taps="$seen_taps $tap"
done
case "$seen_taps" in " bh1 bh2" | " bh2 bh1") ;; *) fail "the device processes are on taps:$seen_taps, expected bh1 and bh2" ;; esac
grep -qE '^second: ' "$SCN_DIR/vm/err" || fail "no log line of device 'second' on the VMM's stderr"
say "two bulkhead-net processes, own network namespaces, one on bh1 and one on bh2"

vm_send_until vm 'ip addr add 192.168.250.2/24 dev '"$if1"' && ip addr add 192.168.251.2/24 dev '"$if2"' && ip link set '"$if1"' up && ip link set '"$if2"' up && echo NETUP-$?' '^NETUP-' 30
sleep 1
vm_send vm 'ping -c 2 -i 0.2 -W 5 192.168.250.1 >/dev/null 2>&1; a=$?; ping -c 2 -i 0.2 -W 5 192.168.251.1 >/dev/null 2>&1; echo PINGS-$a-$?'
vm_wait_for vm '^PINGS-[0-9]+-[0-9]+$' 60
r=$(tr -d '\r' <"$SCN_DIR/vm/out" | sed -n 's/^PINGS-//p' | tail -n 1)
say "guest pings 192.168.250.1 (bh1) and 192.168.251.1 (bh2): exit statuses $r"
[ "$r" = 0-0 ] || fail "the guest cannot reach L1 over both interfaces ($r)"
ping -c 2 -i 0.2 -W 5 192.168.251.2 >/dev/null 2>&1 || fail "L1 cannot ping the guest over bh2"


vm_send vm "poweroff -f"
vm_wait_exit vm 60
[ "$VM_STATUS" = 0 ] || fail "bulkhead exited with status $VM_STATUS, expected 0"
vm_no_panic vm
exit 0
