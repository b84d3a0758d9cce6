#!/usr/bin/env bash
# Interop test: QEMU, a vhost-user frontend nobody here wrote, drives bulkhead-block.
#
# QEMU x86_64 under TCG (no KVM needed) boots a Debian amd64 cloud kernel with a busybox
# initramfs; its disk is a vhost-user-blk-pci device (2 queues, shared memfd guest memory)
# served by the backend under test over a unix socket. The guest (tests/interop/guest-init)
# writes 64 MiB of random data to /dev/vda, reads it back with O_DIRECT and through the page
# cache, flushes, discards, reads from both vCPUs (both virtqueues), and prints what it saw;
# a second boot exports the image read-only. This script checks the guest's report and the
# image file, and prints
#   RESULT <name> PASS|FAIL|SKIP <reason>
# and finally "N passed, N failed". Exit status: 0 only if nothing failed.
#
# Usage: tests/interop/qemu-vhost-user-blk.sh [--backend bulkhead-block|qsd] [--no-build]
#                                             [--keep] [--timeout SECONDS]
#   --backend B   the vhost-user-blk backend: bulkhead-block (default; built with
#                 cargo build --release -p bulkhead-block) or qsd (qemu-storage-daemon,
#                 to check this test itself)
#   --no-build    do not run cargo; use target/release/bulkhead-block as it is
#   --keep        keep the work directory (image, initramfs, logs) and print its path
#   --timeout S   limit for each QEMU boot (default 90; a boot takes ~10 s here)
#
# Needs Debian 12 (root or sudo for apt); installs qemu-system-x86 and cpio if missing and
# caches the amd64 kernel and busybox-static packages in tests/.cache. Logs: tests/out/interop/.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
CACHE=$ROOT/tests/.cache
OUT=$ROOT/tests/out/interop
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}

backend=bulkhead-block
build=1
keep=0
boot_timeout=90

IMAGE_MIB=128
DATA_MIB=64

log() { printf '[interop] %s\n' "$*" >&2; }
die() { printf '[interop] error: %s\n' "$*" >&2; exit 2; }
usage() { sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}"; }

while [ $# -gt 0 ]; do
	case $1 in
	--backend) [ $# -ge 2 ] || die "--backend needs a name"; backend=$2; shift 2 ;;
	--backend=*) backend=${1#--backend=}; shift ;;
	--no-build) build=0; shift ;;
	--keep) keep=1; shift ;;
	--timeout) [ $# -ge 2 ] || die "--timeout needs seconds"; boot_timeout=$2; shift 2 ;;
	-h | --help) usage; exit 0 ;;
	*) die "unknown argument: $1 (see --help)" ;;
	esac
done
case $backend in
bulkhead-block | qsd) ;;
*) die "--backend must be bulkhead-block or qsd" ;;
esac

# ---------------------------------------------------------------------------------------------
# 1. Host packages.

# shellcheck source=tests/interop/lib.sh
. "$HERE/lib.sh"

# ---------------------------------------------------------------------------------------------
# 3. The backend.

build_backend() {
	BULKHEAD_BLOCK=$TARGET_DIR/release/bulkhead-block
	if [ "$backend" = qsd ]; then
		command -v qemu-storage-daemon >/dev/null || die "qemu-storage-daemon not found"
		return 0
	fi
	if [ "$build" -eq 1 ]; then
		log "cargo build --release -p bulkhead-block"
		(cd "$ROOT" && cargo build --quiet --release -p bulkhead-block) || die "cargo build failed"
	fi
	[ -x "$BULKHEAD_BLOCK" ] || die "$BULKHEAD_BLOCK missing"
}

# ---------------------------------------------------------------------------------------------
# 4. Initramfs: busybox, /init, the modules virtio-blk needs (with their dependencies, in
#    load order; those built into this kernel are skipped).

pack_initramfs() {
	local tree=$WORK/initramfs m
	rm -rf "$tree"
	mkdir -p "$tree"/{bin,dev,proc,sys,tmp,lib/modules}
	cp "$BUSYBOX" "$tree/bin/busybox"
	ln -sf busybox "$tree/bin/sh"
	install -m 0755 "$HERE/guest-init" "$tree/init"
	add_module virtio_pci
	add_module virtio_blk
	for m in "${MOD_ORDER[@]}"; do
		unpacked_module "$(module_file "$m")" >"$tree/lib/modules/$m.ko"
	done
	printf '%s\n' "${MOD_ORDER[@]}" >"$tree/lib/modules/load-order"
	log "guest modules: ${MOD_ORDER[*]:-(all built in)}"
	(cd "$tree" && find . | cpio -o -H newc --quiet | gzip -1) >"$WORK/initramfs.cpio.gz"
}

# ---------------------------------------------------------------------------------------------
# 5. One boot: backend + QEMU.

pass=0
fail=0
skip=0
result() {
	local name=$1 verdict=$2
	shift 2
	echo "RESULT $name $verdict $*"
	case $verdict in
	PASS) pass=$((pass + 1)) ;;
	FAIL) fail=$((fail + 1)) ;;
	*) skip=$((skip + 1)) ;;
	esac
}

BACKEND_PID=
start_backend() { # MODE IMAGE SOCKET LOG
	local mode=$1 img=$2 sock=$3 blog=$4
	rm -f "$sock"
	if [ "$backend" = qsd ]; then
		local ro=off wr=on
		[ "$mode" = ro ] && ro=on wr=off
		qemu-storage-daemon \
			--blockdev "driver=file,node-name=f,filename=$img,cache.direct=off,discard=unmap,read-only=$ro" \
			--export "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path=$sock,writable=$wr,num-queues=2" \
			>"$blog" 2>&1 9>&- &
	else
		local extra=()
		[ "$mode" = ro ] && extra+=(--readonly)
		RUST_LOG=${RUST_LOG:-info} "$BULKHEAD_BLOCK" --socket-path "$sock" --path "$img" \
			--num-queues 2 "${extra[@]}" >"$blog" 2>&1 9>&- &
	fi
	BACKEND_PID=$!
	local i=0
	while [ ! -S "$sock" ]; do
		if ! kill -0 "$BACKEND_PID" 2>/dev/null; then
			wait "$BACKEND_PID" || true
			return 1
		fi
		if [ $i -ge 100 ]; then
			kill -9 "$BACKEND_PID" 2>/dev/null || true
			wait "$BACKEND_PID" 2>/dev/null || true
			return 1
		fi
		sleep 0.1
		i=$((i + 1))
	done
}

# stop_backend: the exit status of bulkhead-block, which must exit by itself once QEMU is
# gone (124 if it had to be killed); qemu-storage-daemon is told to stop.
stop_backend() {
	local i=0
	if [ "$backend" = qsd ]; then
		kill "$BACKEND_PID" 2>/dev/null || true
	fi
	while kill -0 "$BACKEND_PID" 2>/dev/null && [ $i -lt 100 ]; do
		sleep 0.1
		i=$((i + 1))
	done
	if kill -0 "$BACKEND_PID" 2>/dev/null; then
		kill -9 "$BACKEND_PID" 2>/dev/null || true
		wait "$BACKEND_PID" 2>/dev/null || true
		BACKEND_STATUS=124
	else
		BACKEND_STATUS=0
		wait "$BACKEND_PID" 2>/dev/null || BACKEND_STATUS=$?
	fi
}

QEMU_STATUS=
run_qemu() { # MODE SOCKET CONSOLE-LOG
	local mode=$1 sock=$2 con=$3
	QEMU_STATUS=0
	timeout -k 5 "$boot_timeout" qemu-system-x86_64 \
		-accel tcg -cpu max -smp 2 -m 512M \
		-object memory-backend-memfd,id=mem,size=512M,share=on -machine memory-backend=mem \
		-chardev "socket,id=c0,path=$sock" -device vhost-user-blk-pci,chardev=c0,num-queues=2 \
		-kernel "$KERNEL" -initrd "$WORK/initramfs.cpio.gz" \
		-append "console=ttyS0 panic=-1 interop.mode=$mode" \
		-nodefaults -no-user-config -display none -serial "file:$con" -no-reboot \
		</dev/null >"$con.qemu" 2>&1 9>&- || QEMU_STATUS=$?
	[ -f "$con" ] || : >"$con"
	tr -d '\r\000' <"$con" >"$con.txt"
}

# marker LOG KEY: the value of the guest's first "INTEROP KEY value" line.
marker() { sed -n "/^INTEROP $2 /{s///p;q}" "$1"; }
has_marker() { grep -q "^INTEROP $2\( \|\$\)" "$1"; }
# grew "A B": true if both are numbers and B > A.
grew() {
	local a=${1% *} b=${1#* }
	case $a$b in '' | *[!0-9]*) return 1 ;; esac
	[ "$b" -gt "$a" ]
}

image_sha() { # IMAGE OFFSET-BYTES LENGTH-BYTES
	dd if="$1" bs=1M skip="$2" count="$3" iflag=skip_bytes,count_bytes status=none |
		sha256sum | cut -d ' ' -f 1
}

# Dump the evidence of a failed boot.
evidence() { # CONSOLE BACKEND-LOG
	log "--- guest console (last 30 lines): $1.txt"
	tail -n 30 "$1.txt" | sed 's/^/[interop]   | /' >&2
	log "--- QEMU stderr: $1.qemu"
	tail -n 10 "$1.qemu" | sed 's/^/[interop]   ! /' >&2
	log "--- backend log (last 20 lines): $2"
	tail -n 20 "$2" | sed 's/^/[interop]   ! /' >&2
}

# boot_ok NAME CONSOLE BACKEND-LOG: the common checks of a boot; false if the guest never
# got to /dev/vda (then the mode's checks are pointless).
boot_ok() {
	local name=$1 con=$2 blog=$3
	if [ "$QEMU_STATUS" -eq 124 ] || [ "$QEMU_STATUS" -eq 137 ]; then
		result "$name-boot" FAIL "QEMU still running after ${boot_timeout} s"
		evidence "$con" "$blog"
		return 1
	fi
	if ! has_marker "$con.txt" vda; then
		result "$name-boot" FAIL "guest saw no /dev/vda (QEMU exit $QEMU_STATUS)"
		evidence "$con" "$blog"
		return 1
	fi
	local sectors
	sectors=$(marker "$con.txt" size-sectors)
	if [ "$sectors" != $((IMAGE_MIB * 2048)) ]; then
		result "$name-boot" FAIL "guest sees $sectors sectors, image has $((IMAGE_MIB * 2048))"
		evidence "$con" "$blog"
		return 1
	fi
	if ! has_marker "$con.txt" finished; then
		result "$name-boot" FAIL "guest did not finish (QEMU exit $QEMU_STATUS)"
		evidence "$con" "$blog"
		return 1
	fi
	result "$name-boot" PASS "vda of $sectors sectors, guest finished, QEMU exit $QEMU_STATUS"
	return 0
}

check_backend_exit() { # NAME BACKEND-LOG
	if [ "$backend" = qsd ]; then return 0; fi
	if [ "$BACKEND_STATUS" -eq 0 ]; then
		result "$1-backend-exit" PASS "bulkhead-block exited 0 after QEMU disconnected"
	elif [ "$BACKEND_STATUS" -eq 124 ]; then
		result "$1-backend-exit" FAIL "bulkhead-block still running 10 s after QEMU exited"
	else
		result "$1-backend-exit" FAIL "bulkhead-block exited with status $BACKEND_STATUS"
		tail -n 20 "$2" | sed 's/^/[interop]   ! /' >&2
	fi
}

# ---------------------------------------------------------------------------------------------
# 6. The read-write boot.

case_rw() {
	local img=$WORK/rw.img sock=$WORK/rw.sock con=$OUT/rw.console blog=$OUT/rw.backend.log
	local t0=$SECONDS
	rm -f "$img"
	truncate -s "${IMAGE_MIB}M" "$img"
	# Non-zero data where the guest discards, to see what the backend does with it.
	head -c $((4 << 20)) /dev/urandom | dd of="$img" bs=1M seek=96 conv=notrunc status=none
	if ! start_backend rw "$img" "$sock" "$blog"; then
		result rw-boot FAIL "backend did not come up (no socket $sock)"
		tail -n 20 "$blog" | sed 's/^/[interop]   ! /' >&2
		return
	fi
	log "rw: booting the guest (backend $backend)"
	run_qemu rw "$sock" "$con"
	stop_backend
	log "rw: QEMU exit $QEMU_STATUS after $((SECONDS - t0)) s; backend status $BACKEND_STATUS"
	grep '^INTEROP' "$con.txt" | sed 's/^/[interop]   | /' >&2 || true
	check_backend_exit rw "$blog"
	boot_ok rw "$con" "$blog" || return 0
	local c=$con.txt v a b

	# Both virtqueues: two of them, and completions signalled on each.
	v=$(marker "$c" queues)
	local irqs
	irqs=$(sed -n 's/^INTEROP irq \([^ ]*\) \([0-9]*\)$/\1=\2/p' "$c" | tr '\n' ' ')
	if [ "$v" != 2 ]; then
		result multiqueue FAIL "guest has $v hardware queues, want 2"
	elif [ "$(grep -c '^INTEROP irq ' "$c")" != 2 ]; then
		result multiqueue FAIL "want 2 request-queue interrupts in the guest, have: $irqs"
	elif grep -q '^INTEROP irq [^ ]* 0$' "$c"; then
		result multiqueue FAIL "a virtqueue signalled no completion: $irqs"
	else
		result multiqueue PASS "2 queues, completion interrupts per virtqueue: $irqs"
	fi

	# The data: written from the guest, read back by the guest and found in the image.
	local data direct cached
	data=$(marker "$c" data-sha)
	direct=$(marker "$c" disk-sha-direct)
	cached=$(marker "$c" disk-sha-cached)
	v=$(marker "$c" write-rc)
	if [ "${v%% *}" != 0 ]; then
		result write FAIL "guest dd to /dev/vda failed: $v"
	else
		result write PASS "${DATA_MIB} MiB written with O_DIRECT, fsync"
	fi
	if [ -z "$data" ] || [ "$direct" != "$data" ]; then
		result read-back-direct FAIL "guest wrote sha256 $data, read back $direct (O_DIRECT)"
	else
		result read-back-direct PASS "sha256 ${data:0:16}... matches"
	fi
	if [ -z "$data" ] || [ "$cached" != "$data" ]; then
		result read-back-cached FAIL "guest wrote sha256 $data, read back $cached (page cache, caches dropped)"
	else
		result read-back-cached PASS "sha256 matches after drop_caches"
	fi
	a=$(image_sha "$img" 0 $((32 << 20)))
	b=$(image_sha "$img" $((32 << 20)) $((32 << 20)))
	v=$(marker "$c" half-sha)
	if [ "$v" != "$a $b" ]; then
		result read-both-queues FAIL "halves read from vCPU 0 and 1: $v; image: $a $b"
	else
		result read-both-queues PASS "both halves read concurrently from vCPU 0 and 1 match the image"
	fi
	v=$(image_sha "$img" 0 $((DATA_MIB << 20)))
	if [ -z "$data" ] || [ "$v" != "$data" ]; then
		result host-image FAIL "image's first ${DATA_MIB} MiB: sha256 $v, guest wrote $data"
	else
		result host-image PASS "image's first ${DATA_MIB} MiB equal what the guest wrote"
	fi

	# Flush: VIRTIO_BLK_F_FLUSH negotiated, a write-back cache (from the start, or switched on
	# through VIRTIO_BLK_F_CONFIG_WCE), and dd's fsync and `sync /dev/vda` each completed flush
	# requests.
	local features wc f1 f2 page
	features=$(marker "$c" features)
	wc=$(marker "$c" write-cache)
	has_marker "$c" cache-type-set && wc="$wc, then $(marker "$c" cache-type-set | cut -d ' ' -f 2-)"
	f1=$(marker "$c" flush-after-fsync)
	f2=$(marker "$c" flush-after-sync)
	page=$(image_sha "$img" $((80 << 20)) 4096)
	if [ "${features:9:1}" != 1 ]; then
		result flush FAIL "VIRTIO_BLK_F_FLUSH not negotiated (features $features)"
	elif [ "${wc##*, then }" != "write back" ]; then
		result flush FAIL "no write-back cache ($wc; CONFIG_WCE ${features:11:1}): the guest never flushes"
	elif [ "$(marker "$c" sync-rc)" != 0 ] || ! grew "$f1" || ! grew "$f2"; then
		result flush FAIL "flushes completed before/after fsync: $f1, around sync /dev/vda: $f2, sync rc $(marker "$c" sync-rc)"
	elif [ "$page" != "$(marker "$c" page-sha)" ]; then
		result flush FAIL "page written through the page cache and synced is not in the image"
	else
		result flush PASS "cache: $wc; flush requests completed around fsync: $f1, around sync /dev/vda: $f2; synced page in image"
	fi

	# Discard.
	# The device offers discard on a writable disk and the guest's busybox has blkdiscard: a
	# guest that could not try it is a failure, not a skip.
	if has_marker "$c" discard-skip; then
		result discard FAIL "discard not exercised: $(marker "$c" discard-skip)"
	elif ! has_marker "$c" discard; then
		result discard FAIL "no discard report from the guest"
	else
		read -r v a b _ <<<"$(marker "$c" discard)"
		local zero
		zero=$(image_sha /dev/zero 0 $((4 << 20)))
		if [ "$(image_sha "$img" $((96 << 20)) $((4 << 20)))" = "$zero" ]; then
			zero="range reads as zeros in the image now"
		else
			zero="range not zeroed in the image (allowed)"
		fi
		if [ "$v" != 0 ]; then
			result discard FAIL "blkdiscard failed: $(marker "$c" discard)"
		elif ! grew "$a $b"; then
			result discard FAIL "no discard request completed ($a -> $b)"
		else
			result discard PASS "4 MiB discarded, discard requests completed $a -> $b; $zero"
		fi
	fi
}

# ---------------------------------------------------------------------------------------------
# 7. The read-only boot.

case_ro() {
	local img=$WORK/ro.img sock=$WORK/ro.sock con=$OUT/ro.console blog=$OUT/ro.backend.log
	local t0=$SECONDS before after first
	rm -f "$img"
	head -c $((IMAGE_MIB << 20)) /dev/urandom >"$img"
	before=$(sha256sum "$img" | cut -d ' ' -f 1)
	first=$(image_sha "$img" 0 $((1 << 20)))
	if ! start_backend ro "$img" "$sock" "$blog"; then
		result ro-boot FAIL "backend did not come up (no socket $sock)"
		tail -n 20 "$blog" | sed 's/^/[interop]   ! /' >&2
		return
	fi
	log "ro: booting the guest (backend $backend, read-only)"
	run_qemu ro "$sock" "$con"
	stop_backend
	log "ro: QEMU exit $QEMU_STATUS after $((SECONDS - t0)) s; backend status $BACKEND_STATUS"
	grep '^INTEROP' "$con.txt" | sed 's/^/[interop]   | /' >&2 || true
	check_backend_exit ro "$blog"
	after=$(sha256sum "$img" | cut -d ' ' -f 1)
	if [ "$before" = "$after" ]; then
		result ro-image-unchanged PASS "image sha256 unchanged"
	else
		result ro-image-unchanged FAIL "a read-only export changed the image"
	fi
	boot_ok ro "$con" "$blog" || return 0
	local c=$con.txt v
	v=$(marker "$c" ro)
	if [ "$v" = 1 ]; then
		result ro-flag PASS "/sys/block/vda/ro is 1"
	else
		result ro-flag FAIL "/sys/block/vda/ro is '$v'"
	fi
	v=$(marker "$c" ro-read-sha)
	if [ "$v" = "$first" ]; then
		result ro-read PASS "first MiB read with O_DIRECT matches the image"
	else
		result ro-read FAIL "first MiB: guest read sha256 $v, image $first"
	fi
	v=$(marker "$c" ro-write-rc)
	if [ -n "$v" ] && [ "${v%% *}" != 0 ]; then
		result ro-write-refused PASS "guest write failed: $v"
	else
		result ro-write-refused FAIL "guest write to the read-only disk returned '$v'"
	fi
}

# ---------------------------------------------------------------------------------------------

mkdir -p "$OUT"
# One run at a time: runs share tests/out/interop and would clobber each other's logs.
exec 9>"$OUT/.lock"
if ! flock -n 9; then
	log "another run holds $OUT/.lock; waiting for it"
	flock -w 600 9 || die "$OUT/.lock still held after 600 s"
fi
# qemu-system-x86 brings qemu-system-common, which has qemu-storage-daemon.
ensure_host_deps qemu-system-x86 cpio gzip
fetch_assets
build_backend
WORK=$(mktemp -d /tmp/bulkhead-interop.XXXXXX)
cleanup() {
	[ -z "$BACKEND_PID" ] || kill "$BACKEND_PID" 2>/dev/null || true
	if [ "$keep" -eq 1 ]; then log "work directory kept: $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
pack_initramfs
log "kernel $KVER, backend $backend, QEMU $(qemu-system-x86_64 --version | sed -n 1p)"

start=$SECONDS
case_rw
case_ro
log "took $((SECONDS - start)) s"
[ "$skip" -eq 0 ] || echo "$skip skipped"
echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ] && [ "$skip" -eq 0 ]
