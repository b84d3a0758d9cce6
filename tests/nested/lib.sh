# Helpers for the nested scenarios; sourced by tests/nested/scenarios/*.sh inside L1 (busybox
# sh). The runner (tests/nested/l1-init) sets SCN_NAME and SCN_DIR and prints the RESULT line:
# a scenario exits 0 for PASS, or calls `fail REASON`.
#
# A VM is named by an id; its files are in $SCN_DIR/<id>/:
#   in      fifo feeding the VMM's stdin (held open read-write, so the VMM never sees EOF)
#   out     the VMM's stdout: the guest console          err  the VMM's stderr
#   pid     the bulkhead pid                             status  its exit status, once it exits

# shellcheck disable=SC2034 # GUEST_*, VM_STATUS: for the scenarios that source this file
SCN_NAME=${SCN_NAME:-scenario}
SCN_DIR=${SCN_DIR:-/tmp/scenario/$SCN_NAME}
mkdir -p "$SCN_DIR"

BULKHEAD=${BULKHEAD:-/bin/bulkhead}
GUEST_DIR=${GUEST_DIR:-/guest}
GUEST_KERNEL=$GUEST_DIR/Image
GUEST_INITRAMFS=$GUEST_DIR/initramfs.cpio.gz
GUEST_CMDLINE="console=ttyAMA0 quiet"
# The 32-bit guest (scenarios/boot-arm32.sh): Debian's armhf LPAE zImage and an armhf initramfs
# with the same /init; packed only when a scenario of the suite needs it.
GUEST32_KERNEL=$GUEST_DIR/arm32/zImage
GUEST32_INITRAMFS=$GUEST_DIR/arm32/initramfs.cpio.gz

# Guest boot budget: a Debian kernel reaches /init after ~12 s of nested-KVM guest time.
BOOT_TIMEOUT=${BOOT_TIMEOUT:-120}

say() { echo "[$SCN_NAME] $*"; }

# quote MARK: stdin as evidence lines "[scenario]   MARK line", without CRs and terminal
# escapes, every line newline-terminated.
quote() {
	awk -v p="[$SCN_NAME]   $1 " '{ gsub(/\r/, ""); gsub(/\033\[[0-9;?]*[A-Za-z]/, ""); print p $0 }'
}

now() { cut -d ' ' -f 1 /proc/uptime; }
now_s() { cut -d . -f 1 /proc/uptime; }

# fail REASON: print the evidence of every VM of this scenario, record REASON, exit 1.
fail() {
	say "FAIL: $*"
	for d in "$SCN_DIR"/*/; do
		[ -f "$d/out" ] || continue
		vm_dump "$(basename "$d")" 40
	done
	echo "$*" >"$SCN_DIR/reason"
	exit 1
}

# vm_dump ID [LINES]: the last lines of the VM's console and of the VMM's stderr.
vm_dump() {
	_n=${2:-40}
	say "--- $1: guest console (last $_n lines) ---"
	tail -n "$_n" "$SCN_DIR/$1/out" | quote "|"
	say "--- $1: bulkhead stderr (last $_n lines) ---"
	tail -n "$_n" "$SCN_DIR/$1/err" | quote "!"
	if [ -f "$SCN_DIR/$1/status" ]; then
		say "--- $1: bulkhead exited with status $(cat "$SCN_DIR/$1/status")"
	else
		say "--- $1: bulkhead still running; its threads (name, state, CPU ticks):"
		for _t in /proc/"$(vm_pid "$1")"/task/*; do
			[ -r "$_t/stat" ] || continue
			# stat: pid (comm) state ... utime(14) stime(15); comm has no spaces here.
			awk '{ print $2, $3, $14 + $15 }' "$_t/stat"
		done | quote "~"
	fi
}

_vm_fd_next=3
# vm_start ID BULKHEAD-ARGS...: start bulkhead in the background, stdin from the VM's fifo.
vm_start() {
	_id=$1
	shift
	_d=$SCN_DIR/$_id
	rm -rf "$_d"
	mkdir -p "$_d"
	mkfifo "$_d/in"
	[ "$_vm_fd_next" -le 9 ] || fail "too many VMs in one scenario"
	eval "exec $_vm_fd_next<>\"\$_d/in\""
	echo "$_vm_fd_next" >"$_d/fd"
	_vm_fd_next=$((_vm_fd_next + 1))
	echo "$BULKHEAD $*" >"$_d/cmd"
	say "start $_id: bulkhead $*"
	now >"$_d/t_start"
	(
		"$BULKHEAD" "$@" <"$_d/in" >"$_d/out" 2>"$_d/err" &
		echo $! >"$_d/pid"
		wait $!
		echo $? >"$_d/status"
		now >"$_d/t_exit"
	) &
	while [ ! -s "$_d/pid" ]; do sleep 0.1; done
}

vm_pid() { cat "$SCN_DIR/$1/pid"; }

# vm_exited ID: true once bulkhead has exited.
vm_exited() { [ -s "$SCN_DIR/$1/status" ]; }

# vm_count ID ERE: how many whole console lines match ERE. A line still being written (no
# newline yet) is not counted: the value after a marker may not have arrived.
vm_count() {
	_f=$SCN_DIR/$1/out
	head -n "$(wc -l <"$_f")" "$_f" | tr -d '\r' | grep -cE "$2"
}

# vm_wait_for ID ERE TIMEOUT [COUNT]: wait until COUNT (default 1) console lines match ERE.
# Fails the scenario if bulkhead exits first or on timeout.
vm_wait_for() {
	_want=${4:-1}
	_end=$(($(now_s) + $3))
	while :; do
		[ "$(vm_count "$1" "$2")" -ge "$_want" ] && return 0
		if vm_exited "$1"; then
			sleep 0.2
			[ "$(vm_count "$1" "$2")" -ge "$_want" ] && return 0
			fail "bulkhead ($1) exited with status $(cat "$SCN_DIR/$1/status") before printing '$2' (#$_want)"
		fi
		[ "$(now_s)" -lt "$_end" ] || fail "no '$2' (#$_want) from $1 within $3 s"
		sleep 0.5
	done
}

# vm_send ID TEXT: type TEXT and a newline on the guest console.
vm_send() {
	_fd=$(cat "$SCN_DIR/$1/fd")
	say "type on $1: $2"
	eval "printf '%s\n' \"\$2\" >&$_fd"
}

# vm_send_until ID TEXT ERE TIMEOUT: type TEXT until a console line matches ERE, again every
# TIMEOUT/3 s but at least 10 s apart (the console may drop input typed before the shell reads
# it), for TIMEOUT s but at least 60: an emulated L1 on a loaded CI host can stall for tens of
# seconds, and how fast the guest answers is not what this checks (a console that never
# answers still fails, and a late answer is reported).
vm_send_until() {
	_base=$(vm_count "$1" "$3")
	_limit=$4
	[ "$_limit" -ge 60 ] || _limit=60
	_t0=$(now_s)
	_end=$((_t0 + _limit))
	_tries=0
	_per=$(($4 / 3))
	[ "$_per" -ge 10 ] || _per=10
	while [ "$(now_s)" -lt "$_end" ]; do
		vm_send "$1" "$2"
		_tries=$((_tries + 1))
		_next=$(($(now_s) + _per))
		while [ "$(now_s)" -lt "$_next" ]; do
			if [ "$(vm_count "$1" "$3")" -gt "$_base" ]; then
				[ "$_tries" = 1 ] || say "'$3' came back after $_tries tries, $(($(now_s) - _t0)) s"
				return 0
			fi
			vm_exited "$1" && fail "bulkhead ($1) exited with status $(cat "$SCN_DIR/$1/status") while waiting for '$3'"
			sleep 0.3
		done
	done
	fail "typed '$2' on $1 $_tries times, no '$3' came back within $_limit s"
}

# vm_wait_exit ID TIMEOUT: wait for bulkhead to exit; sets VM_STATUS. Fails on timeout.
vm_wait_exit() {
	_end=$(($(now_s) + $2))
	while ! vm_exited "$1"; do
		[ "$(now_s)" -lt "$_end" ] || fail "bulkhead ($1) still running $2 s later"
		sleep 0.2
	done
	VM_STATUS=$(cat "$SCN_DIR/$1/status")
}

# vm_marker ID NAME [N]: the value of the Nth (default 1st) "GUEST-NAME value" line.
vm_marker() {
	tr -d '\r' <"$SCN_DIR/$1/out" | sed -n "s/^GUEST-$2 //p" | sed -n "${3:-1}p"
}

# vm_show_markers ID: print the GUEST-* lines as evidence.
vm_show_markers() {
	tr -d '\r' <"$SCN_DIR/$1/out" | grep -E '^GUEST-' | quote "|"
}

# vm_no_panic ID: fails when bulkhead's output says "panicked".
vm_no_panic() {
	if grep -q panicked "$SCN_DIR/$1/err" "$SCN_DIR/$1/out"; then
		fail "bulkhead ($1) panicked"
	fi
}

# check_guest ID BOOT NPROC MEM_MIN_KB MEM_MAX_KB: the markers of the BOOTth guest boot.
check_guest() {
	_id=$1 _b=$2
	_v=$(vm_marker "$_id" NPROC "$_b")
	[ "$_v" = "$3" ] || fail "guest sees $_v CPUs, expected $3"
	_v=$(vm_marker "$_id" MEMTOTAL "$_b")
	case $_v in '' | *[!0-9]*) fail "guest MemTotal unreadable: '$_v'" ;; esac
	if [ "$_v" -lt "$4" ] || [ "$_v" -gt "$5" ]; then
		fail "guest MemTotal $_v kB not within [$4, $5]"
	fi
	_v=$(vm_marker "$_id" CLOCKSOURCE "$_b")
	[ "$_v" = arch_sys_counter ] || fail "guest clocksource is '$_v', expected arch_sys_counter"
	_v=$(vm_marker "$_id" GIC "$_b")
	# GICv3 names itself "GICv3" in /proc/interrupts, a GICv2 "GIC-0".
	case $_v in *"${EXPECT_GIC:-GICv3}"*) ;; *) fail "no ${EXPECT_GIC:-GICv3} line in the guest's /proc/interrupts: '$_v'" ;; esac
	_v=$(vm_marker "$_id" TTY-DRIVER "$_b")
	[ "$_v" = uart-pl011 ] || fail "ttyAMA0 is bound to '$_v', expected uart-pl011"
	return 0
}

# ctl_call [-c] API ARGS...: bulkhead-ctl --api-socket API ARGS as one line: "OK <reply>" (-c:
# the reply without its spaces) or "ERR <status> <message>".
ctl_call() {
	_strip='\n'
	if [ "$1" = -c ]; then _strip=' \n'; shift; fi
	_api=$1
	shift
	if _out=$(bulkhead-ctl --api-socket "$_api" "$@" 2>"$SCN_DIR/ctl.err"); then
		echo "OK $(echo "$_out" | tr -d "$_strip")"
	else
		echo "ERR $(sed -n 's/^bulkhead-ctl: [^:]*: \([0-9]*\): /\1 /p' "$SCN_DIR/ctl.err")$(grep -v '^bulkhead-ctl: [^:]*: [0-9]*: ' "$SCN_DIR/ctl.err")"
	fi
}

# info_field API ID NAME: device ID's numeric field NAME in vm.info through the API socket API
# ("" for null or no such device).
info_field() {
	bulkhead-ctl --api-socket "$1" info | tr -d '\n' |
		sed -n "s/.*\({[^{}]*\"id\": *\"$2\"[^{}]*}\).*/\1/p" | sed -n "s/.*\"$3\": *\([0-9]*\).*/\1/p"
}

# elapsed ID: seconds from vm_start to now.
elapsed() { awk -v a="$(cat "$SCN_DIR/$1/t_start")" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# The process table, read once: one "PID PPID COMM" line per process (one cat of every
# /proc/PID/stat; a loop over /proc/* running a program per process costs seconds in L1, where
# every program start is emulated). COMM has no spaces for the programs looked for here.
procs() {
	cat /proc/[0-9]*/stat 2>/dev/null | sed -n 's/^\([0-9]*\) (\(.*\)) [A-Za-z] \([0-9]*\) .*/\1 \3 \2/p'
}

# children_of PPID [COMM]: the pids of PPID's children, of those whose name starts with COMM.
children_of() {
	procs | awk -v p="$1" -v c="$2" '$2 == p && (c == "" || index($3, c) == 1) { print $1 }'
}

# pids_named COMM: the pids of every process named COMM (15 characters at most, as the kernel
# keeps it: bulkhead-balloo, bulkhead-consol).
pids_named() { procs | awk -v c="$1" '$3 == c { print $1 }'; }

# spawner_of VMM: the pid of the VMM's device spawner (bulkhead-spawn), the device processes' parent.
spawner_of() { children_of "$1" bulkhead-spawn | head -n 1; }

# devices_of VMM [COMM]: the VMM's device processes (its spawner's children), those named COMM*.
devices_of() {
	_sp=$(spawner_of "$1")
	[ -n "$_sp" ] || return 0
	children_of "$_sp" "$2"
}

# pid_serving COMM PATH: the pid of the process named COMM whose command line has "--path PATH".
pid_serving() {
	for _p in $(pids_named "$1"); do
		tr '\0' ' ' <"/proc/$_p/cmdline" 2>/dev/null | grep -q -- "--path $2 " && echo "$_p" && return
	done
	return 0
}
