#!/bin/sh
# timeout: 400
# A device process that dies comes back (docs/restart.md): bulkhead-block is SIGKILLed again and
# again while the guest writes 16 MiB of random data with O_DIRECT and reads it back; the
# write completes, the guest logs no I/O error, the data read back and the host image hold
# exactly what was written, and the VMM logs each restart with its cause and how long the
# device was away. A stopped (SIGSTOP) device process is found by the liveness probe, killed and
# restarted. A flaky disk (fault=crash_after=100) loses nothing across its processes' crashes
# with requests in flight (the inflight region, docs/restart.md). restart=never leaves its
# device failed (no restart): the guest sees DEVICE_NEEDS_RESET, and the device is removed and
# a new one plugged into its slot through the API. restart_max=1 with restart_standby=on: a
# standby process waits in the device's other cgroup leaf, takes over when the current one is
# killed (the same pid, no spawn) and the disk reads; a new standby follows; the second death
# is not restarted, and the standby is ended.
# shellcheck disable=SC2016 # the commands typed into the guest expand there
. "${HARNESS_DIR:-/harness}/lib.sh"

img=$SCN_DIR/img
mkdir -p "$img"
for d in a b c d; do dd if=/dev/zero of="$img/$d" bs=1M count=24 2>/dev/null; done

vm_start vm --kernel "$GUEST_KERNEL" --initramfs "$GUEST_INITRAMFS" --cmdline "$GUEST_CMDLINE" \
	--memory size=768M --api-socket "$SCN_DIR/api.sock" --pci-slots 4 \
	--disk "path=$img/a,serial=ra,num_queues=2,restart_backoff_ms=0,restart_max=50" \
	--disk "path=$img/b,serial=rb,restart=never" \
	--disk "path=$img/c,serial=rc,restart_max=1,restart_standby=on" \
	--disk "path=$img/d,serial=rd,fault=crash_after=100,restart_max=50,restart_backoff_ms=0"
vm_wait_for vm '^GUEST-READY' "$BOOT_TIMEOUT"
say "guest ready $(elapsed vm) s after start"
disk_of() { tr -d '\r' <"$SCN_DIR/vm/out" | sed -n "s/^GUEST-DISK \(vd.\) [0-9]* ro=0 serial=$1 .*/\1/p"; }
a=$(disk_of ra)
[ -n "$a" ] || fail "disk ra not seen by the guest"
# dev_of IMAGE: the pid of the bulkhead-block process serving IMAGE (its --path).
dev_of() { pid_serving bulkhead-block "$1"; }
run() { # run COMMAND ERE TIMEOUT: type COMMAND, wait for a line matching ERE, print its value.
	vm_send vm "$1" >&2
	vm_wait_for vm "$2" "$3"
	tr -d '\r' <"$SCN_DIR/vm/out" | grep -E "$2" | tail -n 1 | sed 's/^[A-Z]*-//'
}
sleep 1
vm_send_until vm 'echo UP-$((40+2))' '^UP-42' 30

want=$(run 'head -c 16777216 /dev/urandom >/tmp/r && echo W-$(sha256sum /tmp/r | cut -c1-64)' '^W-[0-9a-f]{64}$' 60)
# The write runs in the background; the host kills the device process under it.
# 4 KiB requests (4096 of them): long enough for the kills on a fast host too (64 KiB ones
# were done in under 0.7 s there).
vm_send vm "(dd if=/tmp/r of=/dev/$a bs=4k oflag=direct 2>/tmp/dd.err; echo DDW-\$?; cat /tmp/dd.err) &"
kills=0
pid0=$(dev_of "$img/a")
t_kill=
while [ "$kills" -lt 3 ]; do
	sleep 0.7
	[ "$(vm_count vm 'DDW-[0-9]+$')" -ge 1 ] && break
	p=$(dev_of "$img/a")
	[ -n "$p" ] || continue
	say "kill -KILL bulkhead-block of disk a (pid $p) during the write"
	kill -KILL "$p"
	kills=$((kills + 1))
done
# The background job's line may follow the shell's prompt and the cursor query busybox's line
# editor sends after it ("/ # ESC[6nDDW-0"); the echoed command line never ends in DDW-<digits>.
vm_wait_for vm 'DDW-[0-9]+$' 240
rc=$(tr -d '\r' <"$SCN_DIR/vm/out" | sed -n 's/^.*DDW-\([0-9][0-9]*\)$/\1/p' | tail -n 1)
say "guest dd with O_DIRECT ended with status $rc after $kills kill(s) of its device process"
[ "$kills" -ge 1 ] || fail "the write ended before any kill: nothing tested"
[ "$rc" = 0 ] || fail "the guest's O_DIRECT write failed across the restarts"
# And one more kill under a direct read.
vm_send vm "echo R-\$(dd if=/dev/$a bs=4k count=4096 iflag=direct 2>/tmp/dd.err | sha256sum | cut -c1-64); cat /tmp/dd.err"
sleep 0.5
p=$(dev_of "$img/a")
if [ -n "$p" ] && [ "$(vm_count vm '^R-')" = 0 ]; then
	say "kill -KILL bulkhead-block of disk a (pid $p) during the read"
	kill -KILL "$p"
	kills=$((kills + 1))
fi
vm_wait_for vm '^R-[0-9a-f]{64}$' 120
got=$(tr -d '\r' <"$SCN_DIR/vm/out" | sed -n 's/^R-//p' | tail -n 1)
host=$(head -c 16777216 "$img/a" | sha256sum | cut -c1-64)
say "written $want, read back $got, host image $host"
[ "$want" = "$got" ] || fail "the guest read back other data than it wrote"
[ "$want" = "$host" ] || fail "the host image does not hold what the guest wrote"
vm_send_until vm 'dmesg | grep -ciE "I/O error|blk_update_request|critical medium" | sed "s/^/IOERR-/"' '^IOERR-[0-9]+' 30
ioerr=$(tr -d '\r' <"$SCN_DIR/vm/out" | sed -n 's/^IOERR-//p' | tail -n 1)
say "guest kernel I/O errors: $ioerr"
[ "$ioerr" = 0 ] || fail "the guest logged I/O errors"
grep -E 'restarting its device process|device process restarted|started in place|I/O resumed' "$SCN_DIR/vm/err" | quote "!"
n=$(grep -c 'device process restarted: session replayed' "$SCN_DIR/vm/err")
say "$n restart(s) logged for $kills kill(s)"
[ "$n" -ge "$kills" ] || fail "the VMM logged $n restarts for $kills kills"
sed -n 's/.*session replayed in \([0-9]*\) ms.*, \([0-9]*\) ms after its process ended.*/replay \1 ms, device away \2 ms (process death to session replayed, VMM side)/p' "$SCN_DIR/vm/err" | quote "recovery:"
sed -n 's/.*disk0: I\/O resumed: first request completed \([0-9]*\) ms after its process ended.*/I\/O resumed \1 ms after the process died (its first completion, VMM side)/p' "$SCN_DIR/vm/err" | quote "recovery:"
[ "$(dev_of "$img/a")" != "$pid0" ] || fail "disk a is still served by its first process"
# vm.info and vm.counters say so too.
info=$(bulkhead-ctl --api-socket "$SCN_DIR/api.sock" info | tr -d '\n')
dev0=$(echo "$info" | sed -n 's/.*\({[^{}]*"id": *"disk0"[^{}]*}\).*/\1/p')
say "vm.info's disk0: $dev0"
ri=$(echo "$dev0" | sed -n 's/.*"restarts": *\([0-9]*\).*/\1/p')
[ "${ri:-0}" -ge "$kills" ] || fail "vm.info counts ${ri:-no} restarts of disk0 for $kills kills"
echo "$dev0" | grep -q '"last_cause": *"[^"]*signal 9' || fail "vm.info's last_cause of disk0 does not name the SIGKILL: $dev0"
rcount=$(bulkhead-ctl --api-socket "$SCN_DIR/api.sock" counters | tr -d ' \n' | sed -n 's/.*"disk0":{[^}]*"restarts":\([0-9]*\).*/\1/p')
[ "$rcount" = "$ri" ] || fail "vm.counters counts ${rcount:-no} restarts of disk0, vm.info $ri"

# A stopped (hung) device answers nothing: the liveness probe has it killed and restarted,
# and the disk works again.
ps=$(dev_of "$img/a")
say "kill -STOP bulkhead-block of disk a (pid $ps)"
kill -STOP "$ps"
t0=$(now)
end=$(($(now_s) + 30))
until [ -n "$(dev_of "$img/a")" ] && [ "$(dev_of "$img/a")" != "$ps" ]; do
	[ "$(now_s)" -lt "$end" ] || fail "the stopped device process was not replaced within 30 s"
	sleep 0.2
done
say "the stopped device process was replaced $(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }') s after SIGSTOP"
grep -E 'liveness|does not answer|did not answer' "$SCN_DIR/vm/err" | tail -n 3 | quote "!"
got2=$(run "echo 3 >/proc/sys/vm/drop_caches; echo S-\$(dd if=/dev/$a bs=64k count=256 iflag=direct 2>/dev/null | sha256sum | cut -c1-64)" '^S-[0-9a-f]{64}$' 120)
[ "$got2" = "$want" ] || fail "after the hung device's restart the disk reads other data"

# A flaky disk (fault=crash_after=100): each of its processes aborts as it takes its 100th
# request, with requests in flight; the guest writes and reads back 16 MiB with O_DIRECT (256
# requests each way), with no error and the same data, on the host image too.
fd=$(disk_of rd)
[ -n "$fd" ] || fail "disk rd not seen by the guest"
rc=$(run "dd if=/tmp/r of=/dev/$fd bs=64k oflag=direct 2>/dev/null; echo FW-\$?" '^FW-[0-9]+$' 240)
[ "$rc" = 0 ] || fail "the guest's write to the flaky disk failed"
got3=$(run "echo FR-\$(dd if=/dev/$fd bs=64k count=256 iflag=direct 2>/dev/null | sha256sum | cut -c1-64)" '^FR-[0-9a-f]{64}$' 240)
host3=$(head -c 16777216 "$img/d" | sha256sum | cut -c1-64)
crashes=$(grep -c 'disk3: .*crash_after reached' "$SCN_DIR/vm/err" || true)
say "flaky disk: $crashes crash(es) with requests in flight; read back $got3, host image $host3"
grep -E 'disk3: .*(resubmitted|session replayed)' "$SCN_DIR/vm/err" | head -n 4 | quote "!"
[ "$got3" = "$want" ] || fail "the flaky disk read back other data than was written"
[ "$host3" = "$want" ] || fail "the flaky disk's image does not hold what was written"
[ "$crashes" -ge 2 ] || fail "expected at least 2 injected crashes of the flaky disk's process, saw $crashes"
vm_send_until vm 'dmesg | grep -ciE "I/O error|blk_update_request|critical medium" | sed "s/^/IOERR2-/"' '^IOERR2-[0-9]+' 30
ioerr=$(tr -d '\r' <"$SCN_DIR/vm/out" | sed -n 's/^IOERR2-//p' | tail -n 1)
[ "$ioerr" = 0 ] || fail "the guest logged I/O errors on the flaky disk"

# restart=never: the device fails for good, no new process.
pb=$(dev_of "$img/b")
say "kill -KILL bulkhead-block of disk b (restart=never, pid $pb)"
kill -KILL "$pb"
sleep 2
grep -E 'disk1: .*(NOT RESTARTED|killed by signal|restarting|failed)' "$SCN_DIR/vm/err" | quote "!"
# A restart=never device is not watched for a restart at all: its process's end fails it at
# once, as a device's end did before restarts existed.
grep -q "disk1: device process $pb was killed by signal 9; the VM goes on without it" "$SCN_DIR/vm/err" ||
	fail "no 'goes on without it' for the restart=never disk"
grep -q 'disk1: device failed: device process' "$SCN_DIR/vm/err" ||
	fail "the restart=never disk was not failed"
if grep -q 'disk1: restarting' "$SCN_DIR/vm/err"; then fail "the restart=never disk was restarted"; fi
[ -z "$(dev_of "$img/b")" ] || fail "the restart=never disk got a new process"
# The guest sees the failed device's status with DEVICE_NEEDS_RESET (0x40), the VM goes on,
# and the device is removed and a new one plugged into its slot through the API (the VM has 4
# slots for its 4 disks: the freed one is the only one).
b=$(disk_of rb)
bdf=$(tr -d '\r' <"$SCN_DIR/vm/out" | sed -n 's/^GUEST-DISK vd. [0-9]* ro=0 serial=rb pci=\(.*\)$/\1/p')
st=$(run "echo ST-\$(cat /sys/block/$b/device/status)" '^ST-0x[0-9a-f]+$' 30)
say "the guest's $b (disk b, $bdf): virtio status $st"
[ $((st & 0x40)) = 64 ] || fail "the guest does not see DEVICE_NEEDS_RESET on the failed disk (status $st)"
ctl() { bulkhead-ctl --api-socket "$SCN_DIR/api.sock" "$@" 2>&1 | tr -d ' \n'; }
r=$(ctl remove-device disk1)
say "remove-device disk1 (failed): $r"
case $r in *'"removal":"orderly"'*) ;; *) fail "the failed disk was not removed in order: $r" ;; esac
[ "$(run "echo GONE-\$(ls /sys/block | grep -c '^$b\$')" '^GONE-[0-9]+$' 30)" = 0 ] || fail "the guest still has $b"
vm_send vm 'while ! grep -qs rb2 /sys/block/vd*/serial; do usleep 20000; done; echo NEWDISK-$(grep -ls rb2 /sys/block/vd*/serial | cut -d/ -f4)'
r=$(ctl add-disk "path=$img/b,serial=rb2,id=b2")
say "add-disk in its place: $r"
case $r in *"\"bdf\":\"$bdf\""*) ;; *) fail "the new disk did not go into the freed slot ($bdf): $r" ;; esac
vm_wait_for vm '^NEWDISK-vd' 30
nb=$(tr -d '\r' <"$SCN_DIR/vm/out" | sed -n 's/^NEWDISK-//p' | tail -n 1)
[ "$(run "echo RD-\$(dd if=/dev/$nb bs=4k count=16 iflag=direct 2>/dev/null | wc -c)" '^RD-[0-9]+$' 30)" = 65536 ] ||
	fail "the new disk in the freed slot does not read"
say "the new disk is the guest's $nb at $bdf and reads"

# restart_max=1 and restart_standby=on: the first death is taken over by the standby process,
# the second is not restarted and the standby ends.
field() { info_field "$SCN_DIR/api.sock" "$@"; }
leaf() { sed -n 's|^0::.*/||p' "/proc/$1/cgroup" 2>/dev/null; }
pc=$(field disk2 pid)
sc=$(field disk2 standby_pid)
say "disk c: process $pc in cgroup leaf $(leaf "$pc"), standby process $sc in $(leaf "$sc")"
[ -n "$sc" ] || fail "disk c (restart_standby=on) has no standby process in vm.info"
tr '\0' ' ' <"/proc/$sc/cmdline" | grep -q -- "--path $img/c " || fail "the standby process $sc is not disk c's program"
[ "$(leaf "$sc")" = disk2.standby ] || fail "the standby process is in cgroup leaf '$(leaf "$sc")', expected disk2.standby"
kill -KILL "$pc"
end=$(($(now_s) + 20))
until [ "$(field disk2 pid)" = "$sc" ]; do
	[ "$(now_s)" -lt "$end" ] || fail "disk c's standby process $sc did not take over (pid now $(field disk2 pid))"
	sleep 0.2
done
grep -E 'disk2: .*(standby|session replayed)' "$SCN_DIR/vm/err" | quote "!"
grep -q "disk2: standby process $sc takes over" "$SCN_DIR/vm/err" || fail "no takeover logged for disk c"
c=$(disk_of rc)
[ "$(run "echo RC-\$(dd if=/dev/$c bs=4k count=64 iflag=direct 2>/dev/null | wc -c)" '^RC-[0-9]+$' 30)" = 262144 ] ||
	fail "disk c does not read after its standby took over"
end=$(($(now_s) + 20))
until [ -n "$(field disk2 standby_pid)" ]; do
	[ "$(now_s)" -lt "$end" ] || fail "disk c got no new standby process after the takeover"
	sleep 0.2
done
sc2=$(field disk2 standby_pid)
say "disk c: standby $sc took over and reads; new standby $sc2 in cgroup leaf $(leaf "$sc2"); kill $sc"
[ "$(leaf "$sc2")" = disk2 ] || fail "the new standby is in cgroup leaf '$(leaf "$sc2")', expected disk2 (the leaves take turns)"
kill -KILL "$sc"
end=$(($(now_s) + 20))
while [ -d "/proc/$sc2" ]; do
	[ "$(now_s)" -lt "$end" ] || fail "disk c's standby $sc2 still runs after the device gave up"
	sleep 0.2
done
grep -q 'disk2: DEVICE PROCESS NOT RESTARTED: it was restarted 1 time(s) already (restart_max=1)' "$SCN_DIR/vm/err" ||
	fail "restart_max=1 not honoured"
[ -z "$(dev_of "$img/c")" ] || fail "disk c got a second restart"
grep -E 'disk2: .*(NOT RESTARTED|restarting)' "$SCN_DIR/vm/err" | quote "!"

vm_send_until vm 'echo alive-$((20+22))' '^alive-42' 60
say "the guest still answers"
kill -TERM "$(vm_pid vm)"
vm_wait_exit vm 30
exit 0
