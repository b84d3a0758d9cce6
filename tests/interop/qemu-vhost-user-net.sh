#!/usr/bin/env bash
# Interop test: QEMU, a vhost-user frontend nobody here wrote, drives bulkhead-net.
#
# QEMU x86_64 under TCG (no KVM needed) boots a Debian amd64 cloud kernel with a busybox
# initramfs; its NIC is a virtio-net-pci device with two queue pairs (mq=on, shared memfd
# guest memory) whose datapath is served by bulkhead-net over a unix socket. bulkhead-net runs
# in a network namespace of this test's own, on a tap it creates there; the tap's side in the
# namespace has 10.99.0.1/24, the guest 10.99.0.2/24. The guest (its /init is written by this
# script) pings the namespace's address, sends random data to a busybox nc listening in the
# namespace and receives other random data from it, and prints sha256 sums on its console;
# this script compares them with the files', checks in bulkhead-net's exit line that frames
# the guest sent went to the tap in batches (tx_batched), and prints
#   RESULT <name> PASS|FAIL <reason>
# and finally "N passed, N failed". Exit status: 0 only if nothing failed. Nothing is skipped:
# a missing prerequisite is a failure.
#
# Usage: tests/interop/qemu-vhost-user-net.sh [--no-build] [--keep] [--timeout SECONDS]
#                                             [--mib N]
#   --no-build    do not run cargo; use target/release/bulkhead-net as it is
#   --keep        keep the work directory (initramfs, data files) and print its path
#   --timeout S   limit for the QEMU boot (default 180)
#   --mib N       MiB moved each way (default 4)
#   --queues N    queue pairs (default 2; 1 to tell a multiqueue problem from others)
#   --vectors N   MSI-X vectors of the virtio-net-pci device (default 0: INTx; QEMU 7.2 under
#                 TCG segfaults in vhost_net_start -> msix_set_vector_notifiers with
#                 vectors=2*queues+2 before the backend sees SET_FEATURES, see README.md)
#
# Needs root (network namespaces, a tap), Debian 12; installs qemu-system-x86 and cpio if
# missing and caches the amd64 kernel and busybox-static packages in tests/.cache (shared with
# qemu-vhost-user-blk.sh). Logs: tests/out/interop/net.*.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
CACHE=$ROOT/tests/.cache
OUT=$ROOT/tests/out/interop
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}

build=1
keep=0
boot_timeout=180
DATA_MIB=4
QUEUES=2
VECTORS=0
HOST_IP=10.99.0.1
GUEST_IP=10.99.0.2
MAC=52:54:00:b4:4e:01
NS=bulkhead-interop-net.$$
TAP=bhint$$

log() { printf '[interop-net] %s\n' "$*" >&2; }
die() { printf '[interop-net] error: %s\n' "$*" >&2; echo "RESULT setup FAIL $*"; echo "0 passed, 1 failed"; exit 1; }
usage() { sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}"; }

while [ $# -gt 0 ]; do
	case $1 in
	--no-build) build=0; shift ;;
	--keep) keep=1; shift ;;
	--timeout) [ $# -ge 2 ] || die "--timeout needs seconds"; boot_timeout=$2; shift 2 ;;
	--mib) [ $# -ge 2 ] || die "--mib needs a number"; DATA_MIB=$2; shift 2 ;;
	--queues) [ $# -ge 2 ] || die "--queues needs a number"; QUEUES=$2; shift 2 ;;
	--vectors) [ $# -ge 2 ] || die "--vectors needs a number"; VECTORS=$2; shift 2 ;;
	-h | --help) usage; exit 0 ;;
	*) die "unknown argument: $1 (see --help)" ;;
	esac
done
[ "$(id -u)" -eq 0 ] || die "needs root (a network namespace and a tap)"

# ---------------------------------------------------------------------------------------------
# 1. Host packages and guest assets (tests/interop/lib.sh).

# shellcheck source=tests/interop/lib.sh
. "$HERE/lib.sh"

build_backend() {
	BULKHEAD_NET=$TARGET_DIR/release/bulkhead-net
	if [ "$build" -eq 1 ]; then
		log "cargo build --release -p bulkhead-net"
		(cd "$ROOT" && cargo build --quiet --release -p bulkhead-net) || die "cargo build failed"
	fi
	[ -x "$BULKHEAD_NET" ] || die "$BULKHEAD_NET missing"
}

# ---------------------------------------------------------------------------------------------
# 2. Initramfs: busybox, /init, virtio_net and what it needs (failover, net_failover), in load
#    order; modules built into this kernel are skipped.

write_guest_init() { # FILE
	cat >"$1" <<'INIT'
#!/bin/sh
# Guest side of tests/interop/qemu-vhost-user-net.sh; reports "INTEROP key value" lines.
export PATH=/bin
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs dev /dev 2>/dev/null
for m in $(cat /lib/modules/load-order); do insmod /lib/modules/$m.ko || echo "INTEROP insmod-fail $m"; done
arg() { sed -n "s/.*interop\.$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
HOST=$(arg host); ME=$(arg me); MIB=$(arg mib)
i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
if [ ! -e /sys/class/net/eth0 ]; then echo "INTEROP no-eth0"; dmesg | grep -i virtio | tail -n 5; poweroff -f; sleep 60; fi
echo "INTEROP mac $(cat /sys/class/net/eth0/address)"
echo "INTEROP features $(cat /sys/class/net/eth0/device/features)"
echo "INTEROP queues $(ls -d /sys/class/net/eth0/queues/rx-* | wc -l)"
ip link set lo up
ip link set eth0 up
ip addr add "$ME/24" dev eth0
i=0
until ping -c 1 -W 1 "$HOST" >/dev/null 2>&1 || [ $i -ge 20 ]; do i=$((i + 1)); done
ping -c 3 -W 2 "$HOST" >/tmp/ping 2>&1
echo "INTEROP ping-rc $? $(grep -o '[0-9]* packets received' /tmp/ping)"
head -c $((MIB << 20)) /dev/urandom >/tmp/out
echo "INTEROP out-sha $(sha256sum </tmp/out | cut -d ' ' -f 1)"
nc "$HOST" 5001 </tmp/out
echo "INTEROP send-rc $?"
i=0
until nc "$HOST" 5002 </dev/null >/tmp/in || [ $i -ge 10 ]; do sleep 1; i=$((i + 1)); done
echo "INTEROP in-sha $(sha256sum </tmp/in | cut -d ' ' -f 1) $(wc -c </tmp/in)"
grep -E 'virtio[0-9]+-(input|output)' /proc/interrupts | awk '{ s = 0; for (i = 2; i <= NF - 2; i++) if ($i ~ /^[0-9]+$/) s += $i; print "INTEROP irq", $NF, s }'
echo "INTEROP finished"
poweroff -f
sleep 60
INIT
	chmod 0755 "$1"
}

pack_initramfs() {
	local tree=$WORK/initramfs m
	rm -rf "$tree"
	mkdir -p "$tree"/{bin,dev,proc,sys,tmp,lib/modules}
	cp "$BUSYBOX" "$tree/bin/busybox"
	ln -sf busybox "$tree/bin/sh"
	write_guest_init "$tree/init"
	add_module virtio_pci
	add_module failover
	add_module net_failover
	add_module virtio_net
	for m in "${MOD_ORDER[@]}"; do
		unpacked_module "$(module_file "$m")" >"$tree/lib/modules/$m.ko"
	done
	printf '%s\n' "${MOD_ORDER[@]}" >"$tree/lib/modules/load-order"
	log "guest modules: ${MOD_ORDER[*]:-(all built in)}"
	(cd "$tree" && find . | cpio -o -H newc --quiet | gzip -1) >"$WORK/initramfs.cpio.gz"
}

# ---------------------------------------------------------------------------------------------
# 3. The run.

pass=0
fail=0
result() {
	local name=$1 verdict=$2
	shift 2
	echo "RESULT $name $verdict $*"
	case $verdict in
	PASS) pass=$((pass + 1)) ;;
	*) fail=$((fail + 1)) ;;
	esac
}
marker() { sed -n "/^INTEROP $2 /{s///p;q}" "$1"; }
has_marker() { grep -q "^INTEROP $2\( \|\$\)" "$1"; }

BACKEND_PID=
SINK_PID=
SOURCE_PID=
cleanup() {
	local p
	for p in $BACKEND_PID $SINK_PID $SOURCE_PID; do kill "$p" 2>/dev/null || true; done
	ip netns del "$NS" 2>/dev/null || true
	if [ "$keep" -eq 1 ]; then log "work directory kept: $WORK"; else rm -rf "${WORK:-/nonexistent}"; fi
}

run() {
	local sock=$WORK/net.sock con=$OUT/net.console blog=$OUT/net.backend.log
	local i qemu_status=0 backend_status

	ip netns add "$NS" || { result setup FAIL "ip netns add $NS"; return; }
	ip -n "$NS" link set lo up
	# bulkhead-net creates the tap in the namespace it runs in (--tap), then listens.
	RUST_LOG=${RUST_LOG:-info} ip netns exec "$NS" "$BULKHEAD_NET" --socket-path "$sock" \
		--tap "$TAP" --queue-pairs "$QUEUES" --mac "$MAC" >"$blog" 2>&1 9>&- &
	BACKEND_PID=$!
	i=0
	while [ ! -S "$sock" ]; do
		if ! kill -0 "$BACKEND_PID" 2>/dev/null || [ $i -ge 100 ]; then
			result backend-start FAIL "bulkhead-net did not listen on $sock"
			tail -n 20 "$blog" | sed 's/^/[interop-net]   ! /' >&2
			return
		fi
		sleep 0.1
		i=$((i + 1))
	done
	ip -n "$NS" addr add "$HOST_IP/24" dev "$TAP" && ip -n "$NS" link set "$TAP" up ||
		{ result backend-start FAIL "cannot configure tap $TAP in $NS"; return; }
	result backend-start PASS "bulkhead-net listening, tap $TAP ($HOST_IP/24) in namespace $NS"

	# The peers in the namespace: a sink for the guest's data and a source for the guest.
	head -c $((DATA_MIB << 20)) /dev/urandom >"$WORK/to-guest"
	ip netns exec "$NS" "$BUSYBOX" nc -l -p 5001 -e "$BUSYBOX" sh -c "cat >'$WORK/from-guest'" \
		</dev/null >/dev/null 2>&1 9>&- &
	SINK_PID=$!
	ip netns exec "$NS" "$BUSYBOX" nc -l -p 5002 -e "$BUSYBOX" cat "$WORK/to-guest" \
		</dev/null >/dev/null 2>&1 9>&- &
	SOURCE_PID=$!

	log "booting the guest (QEMU TCG, virtio-net-pci mq=on, $QUEUES queue pairs, $VECTORS MSI-X vectors)"
	local t0=$SECONDS
	timeout -k 5 "$boot_timeout" qemu-system-x86_64 \
		-accel tcg -cpu max -smp 2 -m 512M \
		-object memory-backend-memfd,id=mem,size=512M,share=on -machine memory-backend=mem \
		-chardev "socket,id=c0,path=$sock" -netdev "vhost-user,id=n0,chardev=c0,queues=$QUEUES" \
		-device "virtio-net-pci,netdev=n0,mq=on,vectors=$VECTORS,mac=$MAC" \
		-kernel "$KERNEL" -initrd "$WORK/initramfs.cpio.gz" \
		-append "console=ttyS0 panic=-1 interop.host=$HOST_IP interop.me=$GUEST_IP interop.mib=$DATA_MIB" \
		-nodefaults -no-user-config -display none -serial "file:$con" -no-reboot \
		</dev/null >"$con.qemu" 2>&1 9>&- || qemu_status=$?
	[ -f "$con" ] || : >"$con"
	tr -d '\r\000' <"$con" >"$con.txt"
	log "QEMU exit $qemu_status after $((SECONDS - t0)) s"
	grep '^INTEROP' "$con.txt" | sed 's/^/[interop-net]   | /' >&2 || true

	# bulkhead-net exits 0 by itself once QEMU is gone.
	i=0
	while kill -0 "$BACKEND_PID" 2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
	if kill -0 "$BACKEND_PID" 2>/dev/null; then
		kill -9 "$BACKEND_PID" 2>/dev/null || true
		wait "$BACKEND_PID" 2>/dev/null || true
		result backend-exit FAIL "bulkhead-net still running 10 s after QEMU exited"
	else
		backend_status=0
		wait "$BACKEND_PID" 2>/dev/null || backend_status=$?
		if [ "$backend_status" -eq 0 ]; then
			result backend-exit PASS "bulkhead-net exited 0 after QEMU disconnected"
		else
			result backend-exit FAIL "bulkhead-net exited with status $backend_status"
			tail -n 20 "$blog" | sed 's/^/[interop-net]   ! /' >&2
		fi
	fi
	BACKEND_PID=

	local c=$con.txt v
	if [ "$qemu_status" -eq 124 ] || [ "$qemu_status" -eq 137 ] || ! has_marker "$c" finished; then
		result boot FAIL "guest did not finish (QEMU exit $qemu_status, limit ${boot_timeout} s)"
		tail -n 30 "$c" | sed 's/^/[interop-net]   | /' >&2
		tail -n 10 "$con.qemu" | sed 's/^/[interop-net]   ! /' >&2
		tail -n 20 "$blog" | sed 's/^/[interop-net]   ! /' >&2
	else
		result boot PASS "guest finished, QEMU exit $qemu_status"
	fi
	v=$(marker "$c" mac)
	if [ "$v" = "$MAC" ] && [ "$(marker "$c" queues)" = "$QUEUES" ]; then
		result nic PASS "guest eth0 with MAC $v, $QUEUES rx queues"
	else
		result nic FAIL "guest eth0 MAC '$v' with '$(marker "$c" queues)' rx queues, want $MAC and $QUEUES"
	fi
	v=$(marker "$c" features)
	# Bits (from the left): 15 MRG_RXBUF, 22 MQ, 29 EVENT_IDX in QEMU's and the guest's view.
	if [ -n "$v" ] && [ "${v:15:1}" = 1 ] && [ "${v:22:1}" = 1 ]; then
		result features PASS "MRG_RXBUF and MQ negotiated (EVENT_IDX ${v:29:1}, HOST_TSO4 ${v:11:1}, GUEST_TSO4 ${v:7:1})"
	else
		result features FAIL "features '$v': want MRG_RXBUF (15) and MQ (22)"
	fi
	v=$(marker "$c" ping-rc)
	if [ "${v%% *}" = 0 ]; then
		result ping PASS "guest pinged $HOST_IP: ${v#* }"
	else
		result ping FAIL "guest ping $HOST_IP: rc ${v:-none}"
	fi
	local want got
	want=$(marker "$c" out-sha)
	got=$(sha256sum <"$WORK/from-guest" 2>/dev/null | cut -d ' ' -f 1 || true)
	if [ -n "$want" ] && [ "$want" = "$got" ] && [ "$(marker "$c" send-rc)" = 0 ]; then
		result guest-to-host PASS "$DATA_MIB MiB over TCP (busybox nc), sha256 ${got:0:16}... at both ends"
	else
		result guest-to-host FAIL "guest sent sha256 '$want' (nc rc $(marker "$c" send-rc)), namespace got '$got' ($(stat -c %s "$WORK/from-guest" 2>/dev/null || echo 0) bytes)"
	fi
	want=$(sha256sum <"$WORK/to-guest" | cut -d ' ' -f 1)
	v=$(marker "$c" in-sha)
	got=${v%% *}
	if [ "$want" = "$got" ]; then
		result host-to-guest PASS "$DATA_MIB MiB over TCP (busybox nc), sha256 ${got:0:16}... at both ends"
	else
		result host-to-guest FAIL "namespace sent sha256 $want, guest got '$v'"
	fi
	# The backend's exit line: frames the guest sent that went to the tap in batches (several
	# writes in one io_uring_enter, devices/net/src/writebatch.rs; this host's kernel takes
	# RWF_NOWAIT writes on a tap).
	v=$(sed -n 's/.* served .* tx_packets=\([0-9]*\) .* tx_batched=\([0-9]*\) .*/\1 \2/p' "$blog" | tail -n 1)
	if [ -n "$v" ] && [ "${v#* }" -gt 0 ]; then
		result tx-batched PASS "${v#* } of the ${v%% *} frames the guest sent went to the tap in batches"
	else
		result tx-batched FAIL "no frame went to the tap in a batch (tx_packets, tx_batched: '${v:-no exit line}')"
	fi
	v=$(sed -n 's/^INTEROP irq \([^ ]*\) \([0-9]*\)$/\1=\2/p' "$c" | tr '\n' ' ')
	log "guest interrupts per virtqueue: ${v:-none}"
}

mkdir -p "$OUT"
exec 9>"$OUT/.net.lock"
flock -w 600 9 || die "$OUT/.net.lock still held after 600 s"
ensure_host_deps qemu-system-x86 cpio gzip iproute2
fetch_assets
build_backend
WORK=$(mktemp -d /tmp/bulkhead-interop-net.XXXXXX)
trap cleanup EXIT
pack_initramfs
log "kernel $KVER, QEMU $(qemu-system-x86_64 --version | sed -n 1p)"
start=$SECONDS
run
log "took $((SECONDS - start)) s"
echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
