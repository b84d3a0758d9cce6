#!/bin/sh
# timeout: 360
# Fault injection through the API (docs/fault-injection.md), with bulkhead-ctl, into a Debian
# guest's disk: a bad fault and an unknown id are refused (400, 404); eio=2048-4095 makes the
# guest's direct reads of those sectors fail with EIO (the kernel logs I/O errors) while the
# sectors on either side read, and after `clear` the range reads again; delay_ms=50 makes
# 20 direct 4 KiB reads take at least 1 s, and 0.5 s more than before; `hang` stops the device, the
# liveness probe has it killed and restarted, and a read issued during the hang completes;
# `oom` makes the process allocate until its cgroup's memory.max (its 256 MiB budget plus the
# 256 MiB of guest RAM) gets it OOM-killed, and it is restarted with the disk intact; on a
# NIC, drop=4 makes the guest's ping lose about a quarter of its requests (none before), and
# corrupt=4 about a quarter too, each a checksum error in L1's ICMP; `seccomp` gets a disk's
# process killed by its filter: not restarted by default, restarted with
# restart_on_violation=on.
# shellcheck disable=SC2016 # the commands typed into the guest expand there
. "${HARNESS_DIR:-/harness}/lib.sh"

img=$SCN_DIR/data.img
dd if=/dev/urandom of="$img" bs=1M count=8 2>/dev/null
vimg=$SCN_DIR/viol.img
dd if=/dev/urandom of="$vimg" bs=1M count=1 2>/dev/null
api=$SCN_DIR/api.sock
vm_start vm --kernel "$GUEST_KERNEL" --initramfs "$GUEST_INITRAMFS" --cmdline "$GUEST_CMDLINE" \
	--memory size=256M -v --api-socket "$api" --disk "path=$img,id=data,serial=fi" \
	--disk "path=$vimg,id=viol,serial=vi,restart_on_violation=on" \
	--net "tap=bhfi0,ip=192.168.249.1,mask=255.255.255.0,id=nic"
vm_wait_for vm '^GUEST-READY' "$BOOT_TIMEOUT"
say "guest ready $(elapsed vm) s after start"
disk=$(tr -d '\r' <"$SCN_DIR/vm/out" | sed -n 's/^GUEST-DISK \(vd.\) [0-9]* ro=0 serial=fi .*/\1/p')
[ -n "$disk" ] || fail "the guest does not see the disk"
run() { # run COMMAND ERE TIMEOUT: type COMMAND, wait for a line matching ERE, print its value.
	vm_send vm "$1" >&2
	vm_wait_for vm "$2" "$3"
	tr -d '\r' <"$SCN_DIR/vm/out" | grep -E "$2" | tail -n 1 | sed 's/^[A-Z0-9]*-//'
}
inject() { ctl_call "$api" inject-fault "$1" "$2"; } # inject ID FAULT
# dev_pid [IMAGE]: the pid of the bulkhead-block process serving IMAGE (default: data's).
dev_pid() { pid_serving bulkhead-block "${1:-$img}"; }
# read4k BLOCK: a direct 4 KiB read of 4 KiB block BLOCK; prints dd's status.
read4k() { run "dd if=/dev/$disk of=/dev/null bs=4096 count=1 skip=$1 iflag=direct 2>/dev/null; echo RD$2-\$?" "^RD$2-[0-9]+\$" 60; }
sleep 1
vm_send_until vm 'echo UP-$((40+2))' '^UP-42' 30

# Refused: a fault nobody knows, an id nobody has.
r=$(inject data melt)
say "inject-fault data melt: $r"
case $r in "ERR 400"*) ;; *) fail "an unknown fault was not refused with 400: $r" ;; esac
r=$(inject nodisk crash)
say "inject-fault nodisk crash: $r"
case $r in "ERR 404"*) ;; *) fail "an unknown id was not refused with 404: $r" ;; esac

# eio=2048-4095: 4 KiB blocks 256-511.
[ "$(read4k 300 A)" = 0 ] || fail "a read before any fault failed"
r=$(inject data eio=2048-4095)
say "inject-fault data eio=2048-4095: $r"
case $r in OK*armed*) ;; *) fail "the eio fault was not armed: $r" ;; esac
in=$(read4k 300 B)
first=$(read4k 256 C)
below=$(read4k 255 D)
above=$(read4k 512 E)
errs=$(run 'echo IOE-$(dmesg | grep -c "I/O error")' '^IOE-[0-9]+$' 20)
say "with eio=2048-4095: block 300 status $in, block 256 $first, block 255 $below, block 512 $above; $errs I/O errors in the guest's log"
[ "$in" != 0 ] || fail "a read inside the range did not fail"
[ "$first" != 0 ] || fail "a read of the range's first sectors did not fail"
[ "$below" = 0 ] || fail "a read just below the range failed"
[ "$above" = 0 ] || fail "a read just above the range failed"
[ "$errs" -gt 0 ] || fail "the guest logged no I/O error"
r=$(inject data clear)
case $r in OK*cleared*) ;; *) fail "clear failed: $r" ;; esac
[ "$(read4k 300 F)" = 0 ] || fail "after clear, a read in the range still fails"
say "after clear the range reads again"

# delay_ms=50: 20 direct reads, before and with it (guest clock, /proc/uptime).
reads='a=$(cut -d" " -f1 /proc/uptime); for i in $(seq 20); do dd if=/dev/'$disk' of=/dev/null bs=4096 count=1 skip=$i iflag=direct 2>/dev/null; done; b=$(cut -d" " -f1 /proc/uptime); echo'
base=$(run "$reads TA-\$a-\$b" '^TA-[0-9.]+-[0-9.]+$' 120)
r=$(inject data delay_ms=50)
case $r in OK*armed*) ;; *) fail "the delay fault was not armed: $r" ;; esac
slow=$(run "$reads TB-\$a-\$b" '^TB-[0-9.]+-[0-9.]+$' 120)
inject data clear >/dev/null
t_base=$(echo "$base" | awk -F- '{ printf "%.2f", $2 - $1 }')
t_slow=$(echo "$slow" | awk -F- '{ printf "%.2f", $2 - $1 }')
say "20 direct 4 KiB reads: $t_base s before, $t_slow s with delay_ms=50"
# Each read is one request that waits 50 ms in the device: 20 of them take at least 1 s (0.98
# for the clock's hundredths), whatever the machine's speed; and at least 0.5 s more than
# without the delay, so that a machine slow enough to take 1 s anyway does not pass it
# unseen. (Once 1.38 s against 0.48 s: the 0.9 s "added" it checked before was too tight.)
awk -v a="$t_base" -v b="$t_slow" 'BEGIN { exit !(b >= 0.98 && b - a >= 0.5) }' ||
	fail "delay_ms=50: 20 reads took $t_slow s, expected at least 1 s and 0.5 s more than the $t_base s before"

# hang: the device stops answering; the liveness probe has it killed and restarted.
want=$(run "echo H0-\$(dd if=/dev/$disk bs=64k count=16 iflag=direct 2>/dev/null | sha256sum | cut -c1-64)" '^H0-[0-9a-f]{64}$' 60)
pid=$(dev_pid)
r=$(inject data hang)
say "inject-fault data hang: $r"
case $r in OK*hanging*) ;; *) fail "the hang fault was not taken: $r" ;; esac
t0=$(now)
vm_send vm "echo H1-\$(dd if=/dev/$disk bs=64k count=16 iflag=direct 2>/dev/null | sha256sum | cut -c1-64)"
end=$(($(now_s) + 40))
until np=$(dev_pid) && [ -n "$np" ] && [ "$np" != "$pid" ]; do
	[ "$(now_s)" -lt "$end" ] || fail "the hung device process was not replaced within 40 s"
	sleep 0.2
done
say "the hung device process $pid was replaced by $np $(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }') s after the fault"
vm_wait_for vm '^H1-[0-9a-f]{64}' 60
got=$(tr -d '\r' <"$SCN_DIR/vm/out" | grep -E '^H1-[0-9a-f]{64}' | tail -n 1 | sed 's/^H1-//')
[ "$got" = "$want" ] || fail "the read issued during the hang returned other data"
grep -E 'fault .* injected through the API|unresponsive|did not answer|restarting' "$SCN_DIR/vm/err" | tail -n 5 | quote "!"

# oom: the process allocates until its cgroup's OOM killer ends it; it is restarted.
pid=$(dev_pid)
r=$(inject data oom)
say "inject-fault data oom: $r"
case $r in OK*allocating*) ;; *) fail "the oom fault was not taken: $r" ;; esac
t0=$(now)
end=$(($(now_s) + 90))
until np=$(dev_pid) && [ -n "$np" ] && [ "$np" != "$pid" ]; do
	[ "$(now_s)" -lt "$end" ] || fail "the device process was not OOM-killed and replaced within 90 s"
	sleep 0.2
done
say "the device process $pid was replaced by $np $(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }') s after the oom fault"
grep -E "process $pid (was killed|exited)" "$SCN_DIR/vm/err" | tail -n 1 | quote "!"
grep -q "process $pid was killed by signal 9" "$SCN_DIR/vm/err" || fail "the oom fault did not end in a SIGKILL (OOM kill)"
# The kernel's OOM killer did it (its log names the process), not the VMM's liveness probe.
dmesg | grep -E "Killed process $pid |oom-kill:.*task=bulkhead-block,pid=$pid," | tail -n 2 | quote "L1"
dmesg | grep -qE "Killed process $pid |oom-kill:.*pid=$pid," || fail "process $pid was not killed by the OOM killer"
if grep -q 'data: device process lost: it did not answer' "$SCN_DIR/vm/err" &&
	[ "$(grep -c 'data: device process lost: it did not answer' "$SCN_DIR/vm/err")" -gt 1 ]; then
	fail "the liveness probe took the allocating process for hung (it must go on answering)"
fi
got=$(run "echo H2-\$(dd if=/dev/$disk bs=64k count=16 iflag=direct 2>/dev/null | sha256sum | cut -c1-64)" '^H2-[0-9a-f]{64}$' 60)
[ "$got" = "$want" ] || fail "after the OOM kill the disk reads other data"

# drop=4 on the NIC: every 4th frame the guest sends is lost.
r=$(run 'ip addr add 192.168.249.2/24 dev eth0 && ip link set eth0 up && ping -c 2 -i 0.2 -W 5 192.168.249.1 >/dev/null 2>&1; echo UPNET-$?' '^UPNET-[0-9]+$' 60)
[ "$r" = 0 ] || fail "the guest cannot ping the host side of the NIC"
loss0=$(run 'echo L0-$(ping -c 12 -i 0.2 -W 2 192.168.249.1 2>&1 | sed -n "s/.* \([0-9]*\)% packet loss.*/\1/p")' '^L0-[0-9]+$' 90)
r=$(inject nic drop=4)
say "inject-fault nic drop=4: $r"
case $r in OK*armed*) ;; *) fail "the drop fault was not armed: $r" ;; esac
loss1=$(run 'echo L1-$(ping -c 12 -i 0.2 -W 2 192.168.249.1 2>&1 | sed -n "s/.* \([0-9]*\)% packet loss.*/\1/p")' '^L1-[0-9]+$' 90)
say "the guest's ping: ${loss0}% loss before, ${loss1}% with drop=4"
[ "$loss0" = 0 ] || fail "the guest lost pings before any fault"
[ "$loss1" -ge 8 ] && [ "$loss1" -le 50 ] || fail "drop=4 gave ${loss1}% loss, expected about 25%"
# corrupt=4: every 4th frame the guest sends arrives with its last byte flipped, its checksum
# left wrong: L1's ICMP drops the echo requests for their checksum (Icmp InCsumErrors).
r=$(inject nic clear)
case $r in OK*cleared*) ;; *) fail "clear on the NIC failed: $r" ;; esac
icmp_csum_errors() { awk '/^Icmp:/ { if (!n) { for (i = 2; i <= NF; i++) if ($i == "InCsumErrors") f = i; n = 1 } else print $f }' /proc/net/snmp; }
csum0=$(icmp_csum_errors)
r=$(inject nic corrupt=4)
say "inject-fault nic corrupt=4: $r"
case $r in OK*armed*) ;; *) fail "the corrupt fault was not armed: $r" ;; esac
loss2=$(run 'echo L2-$(ping -c 12 -i 0.2 -W 2 192.168.249.1 2>&1 | sed -n "s/.* \([0-9]*\)% packet loss.*/\1/p")' '^L2-[0-9]+$' 90)
csum1=$(icmp_csum_errors)
corrupted=$(bulkhead-ctl --api-socket "$api" counters | tr -d ' \n' | sed -n 's/.*"nic":{[^}]*"tx_corrupted":\([0-9]*\).*/\1/p')
say "corrupt=4: the guest's ping lost ${loss2}%; L1's ICMP checksum errors $csum0 -> $csum1; the device's tx_corrupted $corrupted"
[ "$loss2" -ge 8 ] && [ "$loss2" -le 50 ] || fail "corrupt=4 gave ${loss2}% loss, expected about 25%"
[ $((csum1 - csum0)) -ge 1 ] || fail "L1 saw no ICMP checksum error: no frame arrived corrupted"
[ "${corrupted:-0}" -ge $((csum1 - csum0)) ] || fail "the device counts ${corrupted:-no} corrupted frames, L1 saw $((csum1 - csum0))"
r=$(inject nic eio=3)
case $r in "ERR 400"*) ;; *) fail "eio on a NIC was not refused with 400: $r" ;; esac

# seccomp: the process makes a call its filter forbids and is killed (SIGSYS). By default that
# is not restarted (a device that tries what its jail forbids is treated as compromised); the
# disk with restart_on_violation=on is restarted and reads again.
vdisk=$(tr -d '\r' <"$SCN_DIR/vm/out" | sed -n 's/^GUEST-DISK \(vd.\) [0-9]* ro=0 serial=vi .*/\1/p')
[ -n "$vdisk" ] || fail "the guest does not see the restart_on_violation disk"
vpid=$(dev_pid "$vimg")
r=$(inject viol seccomp)
say "inject-fault viol seccomp (restart_on_violation=on, pid $vpid): $r"
end=$(($(now_s) + 20))
until np=$(dev_pid "$vimg") && [ -n "$np" ] && [ "$np" != "$vpid" ]; do
	[ "$(now_s)" -lt "$end" ] || fail "the restart_on_violation=on disk was not restarted after its seccomp kill"
	sleep 0.2
done
grep -E 'viol: .*(seccomp|restart)' "$SCN_DIR/vm/err" | tail -n 3 | quote "!"
[ "$(run "dd if=/dev/$vdisk of=/dev/null bs=4096 count=1 iflag=direct 2>/dev/null; echo RV-\$?" '^RV-[0-9]+$' 60)" = 0 ] ||
	fail "the restarted restart_on_violation=on disk does not read"
say "restart_on_violation=on: the seccomp-killed process $vpid was replaced by $(dev_pid "$vimg"), the disk reads"
dpid=$(dev_pid)
r=$(inject data seccomp)
say "inject-fault data seccomp (default policy, pid $dpid): $r"
sleep 2
grep -E 'data: .*(seccomp|NOT RESTARTED)' "$SCN_DIR/vm/err" | tail -n 3 | quote "!"
grep -q 'data: DEVICE PROCESS NOT RESTARTED: .*seccomp' "$SCN_DIR/vm/err" ||
	fail "no 'NOT RESTARTED' for the seccomp kill of the default disk"
[ -z "$(dev_pid)" ] || fail "the seccomp-killed default disk got a new process $(dev_pid)"
vm_send_until vm 'echo alive-$((20+22))' '^alive-42' 60
say "the default disk was not restarted; the guest goes on"

vm_send vm 'poweroff -f'
vm_wait_exit vm 60
vm_no_panic vm
[ "$VM_STATUS" = 0 ] || fail "bulkhead exited with status $VM_STATUS"
exit 0
