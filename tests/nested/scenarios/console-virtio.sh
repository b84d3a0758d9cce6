#!/bin/sh
# timeout: 600
# The virtio console (docs/console.md), in a real Debian guest with virtio_console:
# - bad input: --console tty with --serial tty (the default) exits 2 before anything starts;
# - file=: what the guest writes to hvc0 lands in the file byte-exact (a 1 MiB checksummed
#   stream, hvc0 in raw mode);
# - socket=: a command typed into the socket runs in the guest's shell on hvc0 and its output
#   comes back; the client disconnects, a new one connects and gets the console back; a slow
#   reader (64 KiB/s) of a 768 KiB stream loses nothing (checksums at both ends) and the
#   device counted the guest as throttled; vm.resize-console 132x43 is what the guest's hvc0
#   then says; vm.info reports the console; the process is jailed (Seccomp 2, no path);
# - pty: the pty path is printed and in vm.info, and a line written to it runs in the guest.
# shellcheck disable=SC2016 # the commands typed into the guest expand there
. "${HARNESS_DIR:-/harness}/lib.sh"

CTL=${CTL:-/bin/bulkhead-ctl}
CLIENT=${CLIENT:-/bin/bulkhead-console-client}
[ -x "$CLIENT" ] || fail "$CLIENT was not built"

run() { # run VM COMMAND ERE TIMEOUT: type COMMAND, wait for a line matching ERE, print its value.
	vm_send "$1" "$2" >&2
	vm_wait_for "$1" "$3" "$4"
	tr -d '\r' <"$SCN_DIR/$1/out" | grep -E "$3" | tail -n 1 | sed 's/^[A-Z]*-//'
}
console_pid() { pids_named bulkhead-consol | head -n 1; }

# ---- Bad input: one terminal cannot be both consoles.
vm_start bad --kernel "$GUEST_KERNEL" --initramfs "$GUEST_INITRAMFS" --console tty
vm_wait_exit bad 20
say "--console tty with --serial tty: status $VM_STATUS: $(tail -n 1 "$SCN_DIR/bad/err")"
[ "$VM_STATUS" = 2 ] || fail "--console tty with --serial tty exited with $VM_STATUS, expected 2"
grep -q 'the terminal is already the serial console' "$SCN_DIR/bad/err" || fail "no clear message for --console tty"

# ---- file=: 1 MiB byte-exact.
log=$SCN_DIR/hvc0.log
vm_start vmf --kernel "$GUEST_KERNEL" --initramfs "$GUEST_INITRAMFS" --cmdline "$GUEST_CMDLINE" \
	--cpus boot=2 --memory size=512M -v --console "file=$log"
vm_wait_for vmf '^GUEST-READY' "$BOOT_TIMEOUT"
sleep 1
vm_send_until vmf 'echo UP-$((40+2))' '^UP-42' 30
vm_show_markers vmf
vm_marker vmf PCI | grep -q ' 1af4:1043 ' || tr -d '\r' <"$SCN_DIR/vmf/out" | grep -q '^GUEST-PCI .* 1af4:1043 ' ||
	fail "the guest sees no virtio console function (1af4:1043)"
hvc=$(run vmf 'echo HVC-$(ls /dev/hvc0 2>&1)' '^HVC-' 20)
[ "$hvc" = /dev/hvc0 ] || fail "the guest has no /dev/hvc0: $hvc"
want=$(run vmf 'head -c 1048576 /dev/urandom >/tmp/s && echo W-$(sha256sum /tmp/s | cut -c1-64)' '^W-[0-9a-f]{64}$' 60)
t0=$(now)
# One open of hvc0 for both: hvc resets the termios at the last close (TTY_DRIVER_RESET_TERMIOS),
# so a stty in a process of its own would leave cat with ONLCR (every \n sent as \r\n).
vm_send vmf 'sh -c "stty raw -echo && cat /tmp/s" 0<>/dev/hvc0 1>&0; echo FDONE-$?'
vm_wait_for vmf '^FDONE-' 300
# The device writes as it takes: give the last buffer a moment.
n=0
while [ "$(stat -c %s "$log")" -lt 1048576 ] && [ "$n" -lt 50 ]; do sleep 0.2; n=$((n + 1)); done
got=$(sha256sum "$log" | cut -c1-64)
say "1 MiB through hvc0 in $(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }') s: $(stat -c %s "$log") bytes, guest $want, file $got"
[ "$(stat -c %s "$log")" = 1048576 ] || fail "the file holds $(stat -c %s "$log") bytes, expected 1048576"
[ "$got" = "$want" ] || fail "the file's checksum differs from the guest's"
vm_send vmf 'poweroff -f'
vm_wait_exit vmf 60
vm_no_panic vmf

# ---- socket=: a shell on hvc0, reconnects, a slow reader, resize, vm.info, the jail.
sock=$SCN_DIR/con.sock
api=$SCN_DIR/api.sock
vm_start vms --kernel "$GUEST_KERNEL" --initramfs "$GUEST_INITRAMFS" --cmdline "$GUEST_CMDLINE" \
	--cpus boot=2 --memory size=512M -v --api-socket "$api" --console "socket=$sock"
vm_wait_for vms '^GUEST-READY' "$BOOT_TIMEOUT"
sleep 1
vm_send_until vms 'echo UP-$((40+2))' '^UP-42' 30
[ -S "$sock" ] || fail "no console socket at $sock"
# A shell on hvc0, started from the PL011's.
vm_send vms 'setsid sh -c "exec sh -i </dev/hvc0 >/dev/hvc0 2>&1" & echo SHELL-STARTED'
vm_wait_for vms '^SHELL-STARTED' 20
sleep 1
out=$("$CLIENT" "$sock" --send 'echo hvc-$((6*7))\n' --until 'hvc-42' --timeout 30) ||
	fail "no answer from the shell on hvc0 through the socket: $out"
say "through the socket: $(echo "$out" | tr -d '\r' | tail -n 1)"
# The client went; a new one gets the console back.
out=$("$CLIENT" "$sock" --send 'echo again-$((7*6))\n' --until 'again-42' --timeout 30) ||
	fail "a second client did not get the console: $out"
say "a second client: $(echo "$out" | tr -d '\r' | tail -n 1)"
# A slow reader: 768 KiB at 64 KiB/s (more than the device's buffer and the socket's hold), written raw by the guest after a start mark.
want=$(run vms 'head -c 786432 /dev/urandom >/tmp/r && echo R-$(sha256sum /tmp/r | cut -c1-64)' '^R-[0-9a-f]{64}$' 60)
vm_send vms 'stty -F /dev/hvc0 raw -echo && printf "STREAM-BEGIN\n" >/dev/hvc0 && cat /tmp/r >/dev/hvc0 && echo SDONE-$?'
t0=$(now)
"$CLIENT" "$sock" --after 'STREAM-BEGIN\n' --bytes 786432 --rate 65536 --timeout 120 >"$SCN_DIR/slow.out" ||
	fail "the slow reader did not get 768 KiB"
got=$(sha256sum "$SCN_DIR/slow.out" | cut -c1-64)
say "slow reader: $(stat -c %s "$SCN_DIR/slow.out") bytes in $(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }') s, guest $want, read $got"
[ "$got" = "$want" ] || fail "the slow reader's stream differs from the guest's"
vm_wait_for vms '^SDONE-0' 60
pid=$(console_pid)
[ -n "$pid" ] || fail "no bulkhead-consol process"
# Resize, and what the guest then sees (Linux applies F_SIZE to hvc0 only on a configuration
# interrupt while hvc0 is open: the shell holds it).
"$CTL" --api-socket "$api" resize-console 132 43 || fail "vm.resize-console failed"
sleep 1
size=$(run vms 'echo SIZE-$(stty -F /dev/hvc0 size | tr " " x)' '^SIZE-' 20)
say "hvc0's size after vm.resize-console 132 43: $size"
[ "$size" = 43x132 ] || fail "hvc0's size is $size after the resize, expected 43x132"
info=$("$CTL" --api-socket "$api" info | tr -d ' \n') || fail "vm.info failed"
echo "$info" | grep -qF '"console":{"mode":"Socket","socket":"'"$sock"'"}' || fail "vm.info's console: $info"
echo "$info" | grep -q '"kind":"console"' || fail "vm.info lists no console device: $info"
# The jail, from /proc: its filter, no path, the socket as fd 5, its parent the spawner.
grep -q '^Seccomp:[[:space:]]*2' "/proc/$pid/status" || fail "the console process has no seccomp filter"
grep -q '^NoNewPrivs:[[:space:]]*1' "/proc/$pid/status" || fail "the console process lacks NoNewPrivs"
fd5=$(readlink "/proc/$pid/fd/5")
case $fd5 in socket:*) ;; *) fail "fd 5 of the console process is $fd5, not the socket" ;; esac
say "console process $pid: Seccomp 2, NoNewPrivs 1, fd 5 $fd5, root $(readlink "/proc/$pid/root")"
vm_send vms 'poweroff -f'
vm_wait_exit vms 60
vm_no_panic vms
grep 'served tx_bytes' "$SCN_DIR/vms/err" | quote "stats"
grep 'served tx_bytes' "$SCN_DIR/vms/err" | grep -q 'clients=[3-9]' || fail "the device counted fewer than 3 clients"
grep 'served tx_bytes' "$SCN_DIR/vms/err" | grep -q 'dropped=0 ' || fail "the device dropped output"
grep 'served tx_bytes' "$SCN_DIR/vms/err" | grep -qv 'throttled=0 ' || fail "the slow reader never throttled the guest"

# ---- pty: its path printed and in vm.info; a line written to it runs in the guest.
api2=$SCN_DIR/api2.sock
vm_start vmp --kernel "$GUEST_KERNEL" --initramfs "$GUEST_INITRAMFS" --cmdline "$GUEST_CMDLINE" \
	--memory size=512M --api-socket "$api2" --console pty
vm_wait_for vmp '^GUEST-READY' "$BOOT_TIMEOUT"
pty=$(sed -n 's/.*virtio console on pty \(\/dev\/pts\/[0-9]*\).*/\1/p' "$SCN_DIR/vmp/err" | head -n 1)
[ -c "$pty" ] || fail "no pty path printed (got '$pty')"
# serde_json orders the keys: file, mode.
"$CTL" --api-socket "$api2" info | tr -d ' \n' | grep -qF '"console":{"file":"'"$pty"'","mode":"Pty"}' ||
	fail "vm.info does not report the pty $pty"
sleep 1
vm_send_until vmp 'echo UP-$((40+2))' '^UP-42' 30
vm_send vmp 'setsid sh -c "exec sh -i </dev/hvc0 >/dev/hvc0 2>&1" & echo SHELL-STARTED'
vm_wait_for vmp '^SHELL-STARTED' 20
sleep 1
# The answer goes to ttyAMA0, after its shell's prompt: a newline first puts it at a line's start.
printf '{ echo; echo PTY-$((6*7)); } >/dev/ttyAMA0\n' >"$pty"
vm_wait_for vmp '^PTY-42' 30
say "pty $pty: printed, in vm.info, a line written to it ran in the guest"
vm_send vmp 'poweroff -f'
vm_wait_exit vmp 60
vm_no_panic vmp
