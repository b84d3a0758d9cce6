#!/bin/sh
# timeout: 240
# Kata Containers' call order (its Cloud Hypervisor driver) against a VMM started with only
# --api-socket: vmm.ping; vm.info, vm.boot before vm.create (409) and bad vm.create bodies
# (400) change nothing; vm.create (Cloud Hypervisor's VmConfig with a disk); vm.info says
# Created; vm.add-net before boot (cold-plugged: 204); vm.boot; the guest boots with the disk
# and the NIC and pings the tap's host side; vm.create and vm.boot again are 409; vm.add-disk
# hot-plugs a disk the guest sees; vm.remove-device removes it; vmm.shutdown ends the VMM with
# status 0.
# shellcheck disable=SC2016 # the commands typed into the guest expand there
. "${HARNESS_DIR:-/harness}/lib.sh"

CTL=${CTL:-/bin/bulkhead-ctl}
sock=$SCN_DIR/api.sock
ctl() { "$CTL" --api-socket "$sock" "$@"; }
# expect_status CODE ARGS...: bulkhead-ctl ARGS fails with HTTP status CODE.
expect_status() {
	_want=$1
	shift
	if ctl "$@" >"$SCN_DIR/ctl.out" 2>"$SCN_DIR/ctl.err"; then
		fail "bulkhead-ctl $* succeeded, expected $_want"
	fi
	_msg=$(cat "$SCN_DIR/ctl.err")
	case $_msg in *": $_want: "*) ;; *) fail "bulkhead-ctl $*: expected status $_want, got: $_msg" ;; esac
	say "  $1 ${2:-} ${3:-} -> $_want: ${_msg#*: "$_want": }"
}
run() { # run COMMAND ERE TIMEOUT: type COMMAND, wait for a line matching ERE, print its value.
	vm_send vm "$1" >&2
	vm_wait_for vm "$2" "$3"
	tr -d '\r' <"$SCN_DIR/vm/out" | grep -E "$2" | tail -n 1 | sed 's/^[A-Z0-9]*-//'
}

dd if=/dev/zero of="$SCN_DIR/root" bs=1M count=8 2>/dev/null
dd if=/dev/zero of="$SCN_DIR/hot" bs=1M count=16 2>/dev/null
vm_start vm --api-socket "$sock" -v
n=0
until ctl ping >"$SCN_DIR/ping" 2>/dev/null; do
	n=$((n + 1))
	[ "$n" -le 100 ] || fail "no vmm.ping answer within 10 s"
	vm_exited vm && fail "bulkhead exited with status $(cat "$SCN_DIR/vm/status") before vm.create"
	sleep 0.1
done
say "vmm.ping: $(tr -d ' \n' <"$SCN_DIR/ping")"

say "before vm.create:"
expect_status 409 info
expect_status 409 boot
expect_status 400 raw PUT vm.create '{"payload": {}}'
expect_status 400 raw PUT vm.create "{\"payload\": {\"kernel\": \"$SCN_DIR/no-such-Image\"}}"
expect_status 400 raw PUT vm.create "{\"payload\": {\"kernel\": \"$GUEST_KERNEL\"}, \"vsock\": {\"cid\": 3, \"socket\": \"/v\"}}"
expect_status 400 raw PUT vm.create "{\"payload\": {\"kernel\": \"$GUEST_KERNEL\"}, \"cpus\": {\"boot_vcpus\": 999}}"
expect_status 409 info

cat >"$SCN_DIR/vm.json" <<EOF
{"cpus": {"boot_vcpus": 2, "max_vcpus": 2, "topology": {"threads_per_core": 1, "cores_per_die": 2, "dies_per_package": 1, "packages": 1}},
 "memory": {"size": 536870912, "shared": true, "hugepages": false},
 "payload": {"kernel": "$GUEST_KERNEL", "initramfs": "$GUEST_INITRAMFS", "cmdline": "$GUEST_CMDLINE"},
 "disks": [{"path": "$SCN_DIR/root", "readonly": true, "id": "root"}],
 "rng": {"src": "/dev/urandom"}, "serial": {"mode": "Tty"}, "console": {"mode": "Off"},
 "iommu": false, "watchdog": false, "pci_slots": 4}
EOF
ctl create "$SCN_DIR/vm.json" || fail "vm.create failed"
expect_status 409 create "$SCN_DIR/vm.json"
info=$(ctl info | tr -d ' \n') || fail "vm.info failed"
say "vm.info after vm.create: $info"
case $info in *'"state":"Created"'*) ;; *) fail "vm.info does not say Created" ;; esac
case $info in *'"boot_vcpus":2'*'"id":"root"'*) ;; *) fail "vm.info does not show the created VM" ;; esac
[ -c /dev/net/tun ] || fail "no /dev/net/tun in L1 (tun.ko not loaded?)"
out=$(ctl add-net "tap=bhkata0,mac=52:54:00:00:0a:01,ip=192.168.247.1,mask=255.255.255.0,id=eth0") ||
	fail "vm.add-net before boot failed"
[ -z "$out" ] || fail "vm.add-net before boot answered '$out', expected 204 (no body)"
expect_status 409 add-net "tap=bhkata1,id=eth0"
ctl info | tr -d ' \n' | grep -q '"net":\[{"id":"eth0"' || fail "vm.info does not list eth0 before boot"
say "vm.add-net before boot: 204, in vm.info's config; a second eth0: 409"

t0=$(now)
ctl boot || fail "vm.boot failed"
say "vm.boot answered in $(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }') s"
vm_wait_for vm '^GUEST-READY' "$BOOT_TIMEOUT"
say "guest ready $(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }') s after vm.boot"
tr -d '\r' <"$SCN_DIR/vm/out" | grep -E '^GUEST-(NPROC|DISK|NET)' | quote "guest"
[ "$(vm_marker vm NPROC)" = 2 ] || fail "the guest has $(vm_marker vm NPROC) CPUs, vm.create said 2"
vm_marker vm DISK | grep -q '^vda 16384 ro=1' || fail "the guest has no read-only 8 MiB vda from vm.create"
vm_marker vm NET | grep -q '^eth0 52:54:00:00:0a:01 ' || fail "the guest has no eth0 from vm.add-net before boot"
ctl info | tr -d ' \n' | grep -q '"state":"Running"' || fail "vm.info does not say Running after vm.boot"
r=$(run 'ip addr add 192.168.247.2/24 dev eth0 && ip link set eth0 up && ping -c 2 -i 0.2 -W 5 192.168.247.1 >/dev/null 2>&1; echo KPING-$?' '^KPING-[0-9]+$' 60)
[ "$r" = 0 ] || fail "the guest cannot ping the host side of the NIC added before boot"
say "the guest pings 192.168.247.1 through eth0 (added before boot)"
expect_status 409 create "$SCN_DIR/vm.json"
expect_status 409 boot

# Kata's hot-plug after boot: a disk in, seen by the guest, and out.
vm_send vm 'while [ ! -e /sys/block/vdb ]; do usleep 20000; done; echo KDISK-$(cat /sys/block/vdb/size)' >&2
t0=$(now)
answer=$(ctl add-disk "path=$SCN_DIR/hot,id=hot0" | tr -d ' \n') || fail "vm.add-disk failed"
vm_wait_for vm '^KDISK-[0-9]+' 30
say "vm.add-disk: $answer; vdb in the guest $(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }') s after the request"
[ "$(vm_count vm '^KDISK-32768')" = 1 ] || fail "the hot-plugged disk has the wrong size"
answer=$(ctl remove-device hot0 | tr -d ' \n') || fail "vm.remove-device failed"
say "vm.remove-device: $answer"
case $answer in *'"removal":"orderly"'*) ;; *) fail "the unplug was not orderly: $answer" ;; esac
[ "$(run 'echo KGONE-$(ls /sys/block | grep -c vdb)' '^KGONE-[0-9]+$' 10)" = 0 ] || fail "the guest still has vdb"

t0=$(now)
ctl shutdown-vmm || fail "vmm.shutdown failed"
vm_wait_exit vm 15
say "vmm.shutdown: bulkhead exited with status $VM_STATUS $(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }') s later"
vm_no_panic vm
[ "$VM_STATUS" = 0 ] || fail "bulkhead exited with status $VM_STATUS after vmm.shutdown, expected 0"
grep -E 'API: PUT /api/v1/vm\.(create|boot)' "$SCN_DIR/vm/err" | quote "!"
exit 0
