#!/bin/sh
# timeout: 300
# The block device's jail, built by bulkhead_block::jail and entered through bulkhead_sandbox,
# seen from outside and attacked from inside (bulkhead-jail-probe): the jailed process has
# seccomp in filter mode, no_new_privs, no capabilities, its own user/mount/pid/net/ipc/uts/
# cgroup namespaces, an empty read-only root, only the descriptors the jail lists, the
# jail's rlimits and cgroup limits; every attack fails or is killed, with the block device's
# seccomp filter and (for those the lower layers must stop) without it; the image and the
# socket it was handed still work.
. "${HARNESS_DIR:-/harness}/lib.sh"

probe=/bin/bulkhead-jail-probe
[ -x "$probe" ] || fail "$probe is not in L1"
cd "$SCN_DIR" || fail "no scenario directory"

# --- The jailed process seen from outside, while it waits (with a cgroup v2 leaf). ---
"$probe" view --cgroup /sys/fs/cgroup >view.out 2>view.err
rc=$?
quote "|" <view.out
[ -s view.err ] && quote "!" <view.err
[ "$rc" = 0 ] || fail "probe view mode exited with status $rc"
v() { sed -n "s/^VIEW $1 //p" view.out; }

[ "$(v status | sed -n 's/^Seccomp: //p')" = 2 ] || fail "the jailed process is not in seccomp filter mode"
[ "$(v status | sed -n 's/^NoNewPrivs: //p')" = 1 ] || fail "no_new_privs is not set"
for cap in CapEff CapPrm CapInh CapBnd CapAmb; do
	[ "$(v status | sed -n "s/^$cap: //p")" = 0000000000000000 ] || fail "$cap is not all zero"
done
say "seccomp mode 2, no_new_privs 1, every capability set empty"
[ "$(v comm)" = bulkhead-jail-p ] || fail "the jailed process is named '$(v comm)', not after its program"
v status | grep -qE '^NSpid: [0-9]+ 1$' || fail "the jailed process is not PID 1 of its own pid namespace"
for ns in user mnt pid net ipc uts cgroup; do
	v ns | grep -qE "^$ns differs " || fail "the $ns namespace is the host's"
done
say "user, mnt, pid, net, ipc, uts and cgroup namespaces differ from the host's; it is PID 1 in its own"
[ "$(v root-entries)" = 0 ] || fail "the jail's root is not empty: $(v root-entry | tr '\n' ' ')"
[ "$(v mounts)" = 1 ] || fail "the jail has more than its root mounted"
v mount | grep -qE '^/ tmpfs ro,' || fail "the jail's root is not a read-only tmpfs"
say "root: an empty read-only tmpfs, the only mount"
# Only the listed descriptors: 0 and 1 /dev/null, 2 the log, 3 the socket, 5 the image.
[ "$(v fd-count)" = 5 ] || fail "expected 5 descriptors, saw $(v fd-count)"
v fd | grep -qE '^0 /dev/null$' || fail "fd 0 is not /dev/null"
v fd | grep -qE '^1 /dev/null$' || fail "fd 1 is not /dev/null"
v fd | grep -qE '^3 socket:' || fail "fd 3 is not the vhost-user socket"
v fd | grep -qE '^5 .*bulkhead-jail-probe-[0-9]+\.img$' || fail "fd 5 is not the image"
say "descriptors: exactly 0-3 and 5 (null, null, log, socket, image)"
v limit | grep -qE '^Max core file size 0 0 ' || fail "core dumps are not disabled"
v limit | grep -qE '^Max open files 72 72 ' || fail "RLIMIT_NOFILE is not the block jail's 72"
v cgroup | grep -qE '^0::/bulkhead-jail-probe-[0-9]+$' || fail "the jailed process is not in its cgroup leaf"
[ "$(v cgroup-limit | sed -n 's/^pids.max //p')" = 64 ] || fail "pids.max is not 64"
[ "$(v cgroup-limit | sed -n 's/^memory.max //p')" = 268435456 ] || fail "memory.max is not 256 MiB"
[ "$(v cgroup-limit | sed -n 's/^cpu.max //p')" = "50000 100000" ] || fail "cpu.max is not 50000 100000"
[ "$(v cgroup-removed)" = true ] || fail "the cgroup leaf was not removed after the process was reaped"
say "rlimits (core 0, nofile 72) and cgroup leaf (memory.max, pids.max, cpu.max) applied; leaf removed afterwards"

# --- Attacks, with the block device's seccomp filter (as bulkhead-block runs). ---
"$probe" attack >attack.out 2>attack.err
rc=$?
quote "|" <attack.out
[ "$rc" = 0 ] || fail "an attack got through (probe status $rc)"
n=$(grep -c '^PROBE [a-z-]*: ' attack.out)
[ "$n" -ge 13 ] || fail "expected 13 attack results, saw $n"
grep -E '^PROBE [a-z-]*: ' attack.out | grep -vqE ': (killed by SIGSYS|failed E[A-Z]+)$' &&
	fail "an attack ended other than failed or killed by SIGSYS"
say "$n attacks with seccomp: every one killed by SIGSYS or failed"

# --- The layers below seccomp on their own. ---
"$probe" attack --without-seccomp >below.out 2>below.err
rc=$?
quote "|" <below.out
[ "$rc" = 0 ] || fail "an attack got through the layers below seccomp (probe status $rc)"
grep -E '^PROBE .*\(without seccomp\): ' below.out | grep -vqE ': failed E[A-Z]+$' &&
	fail "an attack without seccomp ended other than failing with an errno"
grep -qE '^PROBE list-root \(without seccomp\): failed EACCES$' below.out ||
	fail "landlock did not deny listing the root"
say "without seccomp: every attack failed with an errno (namespaces, empty root, no capabilities, landlock)"

# --- What the jail must still allow. ---
"$probe" control >control.out 2>control.err
rc=$?
quote "|" <control.out
[ "$rc" = 0 ] || fail "the jailed process cannot use its image and socket"
say "the image and the socket it was handed still work under the filter"
exit 0
