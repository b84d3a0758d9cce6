#!/bin/sh
# timeout: 900
# The memory balloon (bulkhead-balloon, docs/balloon.md), issue 10's tests. VM A (1 GiB,
# deflate_on_oom, statistics every second): the guest sees the device and the statistics
# follow its usage; it touches 800 MiB (a 32 MiB checksummed file and 768 MiB of zeros, then
# frees the zeros); inflating to 512 MiB through the API drops L1's Shmem and the VMM's
# RssShmem by at least 450 MiB (the time is printed against issue 10's goal of 10 s; the wait
# allows 60 s, since a loaded nested host took 7.5 s one day and over 10 s another); the balloon
# process is jailed (from /proc);
# deflating to 0 gives the memory back (the guest writes 768 MiB again); with the balloon at
# 704 MiB a guest that needs 400 MiB gets it by deflate-on-OOM, with no OOM kill; the
# checksummed file is intact throughout. VM B (1 GiB, free_page_reporting): a guest that
# writes and frees 512 MiB returns at least 400 MiB to the host with no inflate.
# shellcheck disable=SC2016 # the commands typed into the guest expand there
. "${HARNESS_DIR:-/harness}/lib.sh"

CTL=/bin/bulkhead-ctl
[ -x "$CTL" ] || fail "no $CTL in L1"
MIB_KB=1024

shmem_kb() { awk '$1 == "Shmem:" { print $2 }' /proc/meminfo; }
rss_shmem_kb() { awk '$1 == "RssShmem:" { print $2 }' "/proc/$1/status"; }
# bstat SOCK FIELD: one field of vm.balloon-statistics (empty when the guest has not sent it).
bstat() { "$CTL" --api-socket "$1" balloon-statistics 2>/dev/null | sed -n "s/.*\"$2\": *\([0-9]*\).*/\1/p"; }
# is SOCK FIELD VALUE: the statistics field is VALUE now (a condition for wait_until).
is() { [ "$(bstat "$1" "$2")" = "$3" ]; }
has_stats() { [ -n "$(bstat "$1" free_memory)" ]; }
# grun ID COMMAND MARK TIMEOUT: run COMMAND in the guest (typed once: some take minutes and
# must not run twice), which must print MARK-value; the value (an exit status, or what it
# printed).
grun() {
	_seen=$(vm_count "$1" "^$3-")
	vm_send "$1" "$2" >&2
	vm_wait_for "$1" "^$3-" "$4" $((_seen + 1))
	tr -d '\r' <"$SCN_DIR/$1/out" | grep -E "^$3-" | tail -n 1 | sed "s/^$3-//"
}
# wait_until SECONDS DESCRIPTION CONDITION...: poll CONDITION each 0.5 s; fail after SECONDS.
wait_until() {
	_secs=$1 _what=$2
	shift 2
	_end=$(($(now_s) + _secs))
	until "$@"; do
		[ "$(now_s)" -lt "$_end" ] || fail "$_what: not within $_secs s"
		sleep 0.5
	done
}
balloon_pid() { devices_of "$1" bulkhead-balloo | head -n 1; } # balloon_pid VMM

# ---- VM A.
sock=$SCN_DIR/a.sock
vm_start a --kernel "$GUEST_KERNEL" --initramfs "$GUEST_INITRAMFS" --cmdline "$GUEST_CMDLINE" \
	--cpus boot=2 --memory size=1G -v \
	--balloon size=0,deflate_on_oom=on,stats_polling_interval_s=1 --api-socket "$sock"
vm_wait_for a '^GUEST-READY' "$BOOT_TIMEOUT"
say "guest A ready $(elapsed a) s after start"
vmm=$(vm_pid a)
grep -E '^balloon0: ' "$SCN_DIR/a/err" | head -n 6 | quote "!"
rc=$(grun a 'ls -d /sys/bus/virtio/drivers/virtio_balloon/virtio* >/dev/null 2>&1; echo BAL-$?' BAL 30)
[ "$rc" = 0 ] || fail "the guest has no virtio_balloon device bound"
feat=$(grun a 'echo FEAT-$(cat /sys/bus/virtio/drivers/virtio_balloon/virtio*/features)' FEAT 30)
say "guest's balloon features: $feat"
# Bits 1 (STATS_VQ) and 2 (DEFLATE_ON_OOM) accepted, 5 (REPORTING) not offered.
case $feat in ?11??0*) ;; *) fail "balloon features $feat: expected STATS_VQ and DEFLATE_ON_OOM, no REPORTING" ;; esac

# The balloon process's jail, from /proc.
bp=$(balloon_pid "$vmm")
[ -n "$bp" ] || fail "no bulkhead-balloon process under the VMM $vmm"
st() { awk -v k="$1:" '$1 == k { print $2 }' "/proc/$bp/status"; }
say "balloon process $bp: Seccomp $(st Seccomp), NoNewPrivs $(st NoNewPrivs), CapEff $(st CapEff)"
[ "$(st Seccomp)" = 2 ] || fail "the balloon is not under its seccomp filter"
[ "$(st NoNewPrivs)" = 1 ] || fail "no_new_privs is not set on the balloon"
[ "$(st CapEff)" = 0000000000000000 ] || fail "the balloon has effective capabilities"
[ "$(readlink "/proc/$vmm/ns/mnt")" != "$(readlink "/proc/$bp/ns/mnt")" ] || fail "the balloon shares the VMM's mount namespace"
bad=
for fd in "/proc/$bp/fd/"*; do
	n=${fd##*/}
	t=$(readlink "$fd")
	case $n:$t in
	0:/dev/null | 1:/dev/null | 2:pipe:\[*\] | 3:socket:\[*\] | 4:socket:\[*\]) ;;
	*:anon_inode:\[eventfd\] | *:anon_inode:\[eventpoll\]) ;;
	*:/memfd:bulkhead-guest-ram* | *:"/bulkhead-guest-ram (deleted)") ;;
	*) bad="$bad $n($t)" ;;
	esac
done
[ -z "$bad" ] || fail "balloon descriptors the jail did not hand over:$bad"
say "the balloon is jailed: filter, no_new_privs, no capabilities, only its sockets, eventfds and guest RAM"

# A checksummed file that must survive everything below.
# 32 MiB of 1 MiB random blocks, each after its number (so no two pages match): urandom for
# all 32 MiB takes minutes under TCG.
ck=$(grun a 'mkdir -p /ck && mount -t tmpfs -o size=40M tmpfs /ck && head -c 1048576 /dev/urandom >/tmp/seed && for i in $(seq 32); do echo "$i"; cat /tmp/seed; done >/ck/f && echo CK1-$(md5sum </ck/f | cut -c1-32)' CK1 300)
[ ${#ck} = 32 ] || fail "no checksum of the guest's file: '$ck'"
checksum() { # checksum WHEN: the file's checksum is still $ck
	n=$(($(vm_count a '^CK[0-9]+-') + 1))
	got=$(grun a "echo CK$n-\$(md5sum </ck/f | cut -c1-32)" "CK$n" 120)
	[ "$got" = "$ck" ] || fail "the guest's memory changed $1: checksum $got, was $ck"
	say "checksum intact $1"
}

# Statistics follow the guest's usage.
wait_until 15 "the guest's first statistics" has_stats "$sock"
free0=$(bstat "$sock" free_memory)
"$CTL" --api-socket "$sock" balloon-statistics | quote "@"
rc=$(grun a 'mkdir -p /t && mount -t tmpfs -o size=900M tmpfs /t && dd if=/dev/zero of=/t/a bs=1M count=768 2>/dev/null; echo TA-$?' TA 300)
[ "$rc" = 0 ] || fail "the guest could not write 768 MiB ($rc)"
sleep 3
free1=$(bstat "$sock" free_memory)
say "guest free memory: $((free0 >> 20)) MiB before, $((free1 >> 20)) MiB with 800 MiB touched"
[ $((free0 - free1)) -ge $((600 << 20)) ] || fail "statistics did not follow the guest's usage ($free0 -> $free1)"
rc=$(grun a 'rm /t/a; echo RA-$?' RA 60)
h0=$(shmem_kb)
r0=$(rss_shmem_kb "$vmm")
say "after the guest freed its 768 MiB: L1 Shmem $((h0 / MIB_KB)) MiB, VMM RssShmem $((r0 / MIB_KB)) MiB"

# Inflate to 512 MiB: at least 450 MiB leaves the host (issue 10's goal: within 10 s; printed,
# not asserted: a timing figure, and this nested host's speed varies by up to 2x between runs).
t0=$(now)
"$CTL" --api-socket "$sock" resize --balloon 512M || fail "resize --balloon 512M failed"
dropped() { [ $((h0 - $(shmem_kb))) -ge $((450 * MIB_KB)) ] && [ $((r0 - $(rss_shmem_kb "$vmm"))) -ge $((450 * MIB_KB)) ]; }
wait_until 60 "L1 Shmem and the VMM's RssShmem dropping by 450 MiB after inflating to 512 MiB" dropped
h1=$(shmem_kb)
r1=$(rss_shmem_kb "$vmm")
say "inflated in $(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }') s (goal: 10 s): L1 Shmem -$(((h0 - h1) / MIB_KB)) MiB, VMM RssShmem -$(((r0 - r1) / MIB_KB)) MiB"
wait_until 30 "actual_mib reaching 512" is "$sock" actual_mib 512
"$CTL" --api-socket "$sock" info | grep -E '"memory_actual_size"|"balloon"' | quote "@"
grep -E '^balloon0: ' "$SCN_DIR/a/err" | tail -n 3 | quote "!"
checksum "after inflating"

# Out-of-range targets are refused, the balloon unchanged.
if "$CTL" --api-socket "$sock" resize --balloon 2G 2>"$SCN_DIR/big"; then fail "a 2G balloon in a 1G guest was accepted"; fi
quote "!" <"$SCN_DIR/big"
grep -q 'larger than guest RAM' "$SCN_DIR/big" || fail "no clear message for a balloon larger than RAM"
[ "$(bstat "$sock" target_mib)" = 512 ] || fail "a refused target changed the balloon"

# Deflate: the guest gets its memory back.
"$CTL" --api-socket "$sock" resize --balloon 0 || fail "resize --balloon 0 failed"
wait_until 60 "actual_pages reaching 0 after deflating" is "$sock" actual_pages 0
rc=$(grun a 'dd if=/dev/zero of=/t/a bs=1M count=768 2>/dev/null; echo TB-$?; rm /t/a' TB 300)
[ "$rc" = 0 ] || fail "after deflating, the guest could not write 768 MiB again ($rc)"
say "deflated: the guest wrote 768 MiB again; L1 Shmem now $(($(shmem_kb) / MIB_KB)) MiB"
checksum "after deflating"

# deflate_on_oom: with 704 MiB in the balloon (about 150 MiB left free), a guest that needs
# 400 MiB takes the rest back from the balloon.
"$CTL" --api-socket "$sock" resize --balloon 704M || fail "resize --balloon 704M failed"
wait_until 60 "actual_mib reaching 704" is "$sock" actual_mib 704
rc=$(grun a 'dd if=/dev/zero of=/t/b bs=1M count=400 2>/dev/null; echo TC-$?' TC 400)
actual=$(bstat "$sock" actual_mib)
kills=$(grun a 'echo OOM-$(dmesg | grep -c "Killed process")' OOM 30)
say "with the balloon at 704 MiB the guest wrote 400 MiB: status $rc, balloon now $actual MiB, OOM kills $kills"
[ "$rc" = 0 ] || fail "the guest could not get 400 MiB back from the balloon ($rc)"
[ "$kills" = 0 ] || fail "the guest OOM-killed $kills processes although the balloon could deflate"
[ "$actual" -lt 704 ] || fail "the balloon did not deflate on OOM (actual $actual MiB)"
grun a 'rm /t/b; echo RB-$?' RB 60 >/dev/null
checksum "after deflate-on-OOM"
"$CTL" --api-socket "$sock" resize --balloon 0 || fail "resize --balloon 0 failed"

vm_send a 'poweroff -f'
vm_wait_exit a 60
vm_no_panic a
[ "$VM_STATUS" = 0 ] || fail "VM A: bulkhead exited with status $VM_STATUS"
grep -E '^balloon0: .*served' "$SCN_DIR/a/err" | tail -n 1 | quote "!"

# ---- VM B: free page reporting, no inflate.
vm_start b --kernel "$GUEST_KERNEL" --initramfs "$GUEST_INITRAMFS" --cmdline "$GUEST_CMDLINE" \
	--cpus boot=2 --memory size=1G -v --balloon size=0,free_page_reporting=on
vm_wait_for b '^GUEST-READY' "$BOOT_TIMEOUT"
vmm=$(vm_pid b)
rc=$(grun b 'mkdir -p /t && mount -t tmpfs -o size=600M tmpfs /t && dd if=/dev/zero of=/t/a bs=1M count=512 2>/dev/null; echo TD-$?' TD 300)
[ "$rc" = 0 ] || fail "VM B: the guest could not write 512 MiB ($rc)"
sleep 2
h0=$(shmem_kb)
r0=$(rss_shmem_kb "$vmm")
say "VM B touched 512 MiB: L1 Shmem $((h0 / MIB_KB)) MiB, VMM RssShmem $((r0 / MIB_KB)) MiB"
rc=$(grun b 'rm /t/a; echo RD-$?' RD 60)
t0=$(now)
reported() { [ $((h0 - $(shmem_kb))) -ge $((400 * MIB_KB)) ]; }
wait_until 60 "L1 Shmem dropping by 400 MiB after the guest freed 512 MiB (free page reporting)" reported
say "reported in $(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }') s: L1 Shmem -$(((h0 - $(shmem_kb)) / MIB_KB)) MiB, VMM RssShmem -$(((r0 - $(rss_shmem_kb "$vmm")) / MIB_KB)) MiB"
vm_send b 'poweroff -f'
vm_wait_exit b 60
vm_no_panic b
[ "$VM_STATUS" = 0 ] || fail "VM B: bulkhead exited with status $VM_STATUS"
grep -E '^balloon0: .*served' "$SCN_DIR/b/err" | tail -n 1 | quote "!"
exit 0
