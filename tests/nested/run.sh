#!/usr/bin/env bash
# Nested-KVM system tests for Bulkhead.
#
# Boots an emulated arm64 host ("L1", QEMU TCG with virtualization=on, so KVM works inside it),
# whose initramfs carries the bulkhead binaries, a guest ("L2") kernel + initramfs and the
# scenario scripts; L1's init runs the scenarios, which start bulkhead VMs with KVM and assert
# on what the guest prints. Results come back on L1's console as lines
#   RESULT <scenario> PASS
#   RESULT <scenario> FAIL <reason>
# which this script collects into a summary ending with "N passed, N failed".
#
# Usage: tests/nested/run.sh [--suite NAME] [--demo] [--keep] [--no-build] [--guest-check]
#                            [--timeout SECONDS]
#   --suite NAME   scenario set from tests/nested/suites/NAME (default: boot); NAME+NAME...
#                  runs several suites' scenarios in one L1 boot (their GICs must agree; the
#                  limit is the sum of theirs)
#   --demo         boot L1 with one 2-vCPU guest whose console is this terminal
#   --keep         keep the work directory (packed initramfs trees) and print its path
#   --no-build     do not run cargo; use the binaries already in the target directory
#   --guest-check  boot the guest kernel + guest initramfs directly under QEMU TCG (no VMM,
#                  no KVM) and check the guest's markers: tests the guest assets alone
#   --timeout S    overall limit for the L1 run (default: per suite, see suites/NAME)
#
# Needs a Debian 12 machine with rustup/cargo; installs what else it needs (apt, rustup).
# Logs: tests/out/<suite>.log (L1 console), tests/out/<suite>.summary.
set -euo pipefail

NESTED_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$NESTED_DIR/../.." && pwd)
GUEST_DIR=$ROOT/tests/guest
CACHE=$ROOT/tests/.cache
OUT=$ROOT/tests/out
TARGET_TRIPLE=aarch64-unknown-linux-musl
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
BIN_DIR=$TARGET_DIR/$TARGET_TRIPLE/release
# A bulkhead with the test-only seccomp-trigger feature (scenarios/vcpu-seccomp.sh), copied
# aside before the real one is built over it (build_project).
TRIGGER_TARGET_DIR=$TARGET_DIR/seccomp-trigger
TRIGGER_BIN=$TRIGGER_TARGET_DIR/$TARGET_TRIPLE/release/bulkhead
# Peers' static arm64 binaries for the boot benchmark (see ../shared/anchors/README.md).
PEERS_DIR=${BULKHEAD_PEERS_DIR:-$ROOT/../shared/anchors/aarch64}

suite=boot
demo=0
keep=0
build=1
guest_check=0
overall_timeout=

log() { printf '[nested] %s\n' "$*" >&2; }
die() { printf '[nested] error: %s\n' "$*" >&2; exit 2; }

usage() { sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}"; }

while [ $# -gt 0 ]; do
	case $1 in
	--suite) [ $# -ge 2 ] || die "--suite needs a name"; suite=$2; shift 2 ;;
	--suite=*) suite=${1#--suite=}; shift ;;
	--demo) demo=1; shift ;;
	--keep) keep=1; shift ;;
	--no-build) build=0; shift ;;
	--guest-check) guest_check=1; shift ;;
	--timeout) [ $# -ge 2 ] || die "--timeout needs seconds"; overall_timeout=$2; shift 2 ;;
	-h | --help) usage; exit 0 ;;
	*) die "unknown argument: $1 (see --help)" ;;
	esac
done

# ---------------------------------------------------------------------------------------------
# 1. Host packages and the Rust target.

# as_root, apt_update, pkg_installed, download_pkg, resolve_kernel_pkg (shared with the
# interop tests).
# shellcheck source=tests/debian.sh
. "$ROOT/tests/debian.sh"

ensure_host_deps() {
	local missing=() p
	# mtools, gdisk, dosfstools, grub-common: the UEFI scenarios' GPT disks (build_uefi_disk).
	for p in qemu-system-arm cpio gzip device-tree-compiler coreutils mtools gdisk dosfstools grub-common; do
		pkg_installed "$p" || missing+=("$p")
	done
	if ! dpkg --print-foreign-architectures | grep -qx arm64; then
		log "dpkg --add-architecture arm64"
		as_root dpkg --add-architecture arm64
		apt_update
	fi
	# armhf: the 32-bit guest's kernel and busybox (scenarios/boot-arm32.sh), only where it runs.
	# (A new architecture needs its package lists even when apt-get update ran already.)
	if wants_arm32 && ! dpkg --print-foreign-architectures | grep -qx armhf; then
		log "dpkg --add-architecture armhf"
		as_root dpkg --add-architecture armhf
		apt_updated=0
		apt_update
	fi
	if wants_arm32 && ! apt-cache show busybox-static:armhf >/dev/null 2>&1 &&
		[ ! -e "$CACHE/busybox-static-armhf/.unpacked" ]; then
		apt_updated=0
		apt_update
	fi
	if [ ${#missing[@]} -gt 0 ]; then
		apt_update
		log "apt-get install ${missing[*]}"
		as_root env DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
	fi
	# The arm64 package lists, needed to resolve and download the guest assets (not when both
	# are cached already: then an offline machine still runs).
	if ! apt-cache show linux-image-cloud-arm64:arm64 >/dev/null 2>&1 ||
		! apt-cache show busybox-static:arm64 >/dev/null 2>&1; then
		if ! compgen -G "$CACHE/linux-image-*-cloud-arm64/.unpacked" >/dev/null ||
			[ ! -e "$CACHE/busybox-static-arm64/.unpacked" ]; then
			apt_update
		fi
	fi
	if [ "$build" -eq 1 ] || [ ! -x "$BIN_DIR/bulkhead" ]; then
		command -v rustup >/dev/null || die "rustup not found"
		if ! rustup target list --installed | grep -qx "$TARGET_TRIPLE"; then
			log "rustup target add $TARGET_TRIPLE"
			rustup target add "$TARGET_TRIPLE" >/dev/null 2>&1 ||
				die "rustup target add $TARGET_TRIPLE failed"
		fi
	fi
}

# ---------------------------------------------------------------------------------------------
# 2. Guest/L1 kernel and busybox from Debian's arm64 packages, cached in tests/.cache.

# wants_arm32: whether a scenario of this run boots the 32-bit guest.
wants_arm32() {
	echo "${SCENARIOS:-}" | grep -q 'arm32'
}

# The 32-bit guest: Debian's armhf LPAE kernel (a zImage) and armhf busybox.
fetch_arm32_assets() {
	local kdir
	kdir=$(resolve_kernel_pkg linux-image-armmp-lpae armhf)
	KERNEL32=$(find "$kdir/boot" -maxdepth 1 -name 'vmlinuz-*' 2>/dev/null | head -n 1)
	[ -f "$KERNEL32" ] || die "no boot/vmlinuz-* in $kdir"
	# A zImage has 0x016f2818 at offset 0x24.
	[ "$(dd if="$KERNEL32" bs=1 skip=36 count=4 status=none | od -An -tx1 | tr -d ' \n')" = 18286f01 ] ||
		die "$KERNEL32 is not a 32-bit arm zImage"
	KMODS32=$(find "$kdir/lib/modules" -mindepth 1 -maxdepth 1 -type d | head -n 1)
	[ -d "$KMODS32" ] || die "no lib/modules/<version> in $kdir"
	download_pkg busybox-static:armhf "$CACHE/busybox-static-armhf"
	BUSYBOX32=$CACHE/busybox-static-armhf/bin/busybox
	[ -f "$BUSYBOX32" ] || die "no bin/busybox in busybox-static:armhf"
	# UEFI for 32-bit (scenarios/boot-arm32.sh): Debian's 32-bit ArmVirtQemu and systemd-boot.
	download_pkg qemu-efi-arm "$CACHE/qemu-efi-arm"
	UEFI_FIRMWARE32=$CACHE/qemu-efi-arm/usr/share/AAVMF/AAVMF32_CODE.fd
	[ -f "$UEFI_FIRMWARE32" ] || die "no AAVMF32_CODE.fd in qemu-efi-arm"
	download_pkg systemd-boot-efi:armhf "$CACHE/systemd-boot-efi-armhf"
	SYSTEMD_BOOT32=$CACHE/systemd-boot-efi-armhf/usr/lib/systemd/boot/efi/systemd-bootarm.efi
	[ -f "$SYSTEMD_BOOT32" ] || die "no systemd-bootarm.efi in systemd-boot-efi:armhf"
}

fetch_assets() {
	mkdir -p "$CACHE"
	if wants_arm32; then
		fetch_arm32_assets
	fi
	local kdir
	kdir=$(resolve_kernel_pkg linux-image-cloud-arm64 arm64)
	KERNEL=$(find "$kdir/boot" -maxdepth 1 -name 'vmlinuz-*' 2>/dev/null | head -n 1)
	[ -f "$KERNEL" ] || die "no boot/vmlinuz-* in $kdir"
	# An arm64 Image has "ARM\x64" at offset 56.
	[ "$(dd if="$KERNEL" bs=1 skip=56 count=4 status=none | od -An -tx1 | tr -d ' \n')" = 41524d64 ] ||
		die "$KERNEL is not an arm64 Image"

	KMODS=$(find "$kdir/lib/modules" -mindepth 1 -maxdepth 1 -type d | head -n 1)
	[ -d "$KMODS" ] || die "no lib/modules/<version> in $kdir"

	download_pkg busybox-static:arm64 "$CACHE/busybox-static-arm64"
	BUSYBOX=$CACHE/busybox-static-arm64/bin/busybox
	[ -f "$BUSYBOX" ] || die "no bin/busybox in busybox-static:arm64"

	# UEFI (scenarios/uefi-*.sh): Debian's edk2 ArmVirtQemu build and systemd-boot.
	download_pkg qemu-efi-aarch64 "$CACHE/qemu-efi-aarch64"
	UEFI_FIRMWARE=$CACHE/qemu-efi-aarch64/usr/share/qemu-efi-aarch64/QEMU_EFI.fd
	[ -f "$UEFI_FIRMWARE" ] || die "no QEMU_EFI.fd in qemu-efi-aarch64"
	download_pkg systemd-boot-efi:arm64 "$CACHE/systemd-boot-efi-arm64"
	SYSTEMD_BOOT=$CACHE/systemd-boot-efi-arm64/usr/lib/systemd/boot/efi/systemd-bootaa64.efi
	[ -f "$SYSTEMD_BOOT" ] || die "no systemd-bootaa64.efi in systemd-boot-efi:arm64"
	download_pkg grub-efi-arm64-bin:arm64 "$CACHE/grub-efi-arm64-bin"
	GRUB_MODULES=$CACHE/grub-efi-arm64-bin/usr/lib/grub/arm64-efi
	[ -f "$GRUB_MODULES/linux.mod" ] || die "no arm64-efi modules in grub-efi-arm64-bin:arm64"
}

# ---------------------------------------------------------------------------------------------
# 3. Cross-build.

build_project() {
	if [ "$build" -eq 1 ]; then
		# The seccomp-trigger bulkhead first, in the same target directory and with the same
		# dependency features as the real build (so the dependencies are built once), put
		# aside; then the real one, which rebuilds only bulkhead and what links it.
		log "cargo build --release --target $TARGET_TRIPLE --workspace --bins --features bulkhead/seccomp-trigger"
		(cd "$ROOT" && CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_LINKER=rust-lld \
			cargo build --quiet --release --target "$TARGET_TRIPLE" --workspace --bins \
			--features bulkhead/seccomp-trigger) ||
			die "cross-build of the seccomp-trigger bulkhead failed"
		mkdir -p "$(dirname "$TRIGGER_BIN")"
		cp "$BIN_DIR/bulkhead" "$TRIGGER_BIN"
		log "cargo build --release --target $TARGET_TRIPLE --workspace --bins"
		(cd "$ROOT" && CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_LINKER=rust-lld \
			cargo build --quiet --release --target "$TARGET_TRIPLE" --workspace --bins) ||
			die "cross-build failed"
	fi
	[ -x "$BIN_DIR/bulkhead" ] || die "$BIN_DIR/bulkhead missing"
}

# ---------------------------------------------------------------------------------------------
# 4./5. Initramfs images.

# busybox_tree DIR [BUSYBOX]: a root with busybox (arm64's unless given), the directories an init expects and /dev/console.
busybox_tree() {
	local d=$1 a
	mkdir -p "$d"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,etc,root}
	install -m 0755 "${2:-$BUSYBOX}" "$d/bin/busybox"
	# The rest are made at boot by "busybox --install -s"; these are needed before that.
	for a in sh mount mkdir cat echo ln; do ln -sf busybox "$d/bin/$a"; done
	if [ "$(id -u)" -eq 0 ]; then
		mknod -m 600 "$d/dev/console" c 5 1
		mknod -m 666 "$d/dev/null" c 1 3
	fi
}

# pack DIR OUT [gzip]: cpio newc archive of DIR, owned by root.
pack() {
	local d=$1 out=$2 compress=${3:-}
	if [ "$compress" = gzip ]; then
		(cd "$d" && find . -mindepth 1 | LC_ALL=C sort |
			cpio --quiet -o -H newc -R 0:0 | gzip -6 -n) >"$out"
	else
		(cd "$d" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) >"$out"
	fi
}

# virtio_mmio: for the peers' devices in the boot benchmark (Firecracker has only virtio-mmio).
# virtio_console (scenarios/console-virtio.sh) and virtio_balloon (scenarios/balloon.sh) last.
GUEST_MODULES="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_mmio virtio_blk failover net_failover virtio_net virtio_console virtio_balloon"
GUEST_EXTRA_MODULES="efivarfs"
# Modules L1's init loads, in this order: tun, for the taps --net opens.
L1_MODULES="tun"

pack_guest() {
	local d=$WORK/guest-root
	busybox_tree "$d"
	install -m 0755 "$GUEST_DIR/init" "$d/init"
	# The cloud kernel builds virtio as modules: the guest's init loads these, in this order.
	local m f
	mkdir -p "$d/lib/modules"
	for m in $GUEST_MODULES; do
		f=$(find "$KMODS/kernel" -name "$m.ko" | head -n 1)
		[ -n "$f" ] || die "module $m.ko not in $KMODS"
		install -m 0644 "$f" "$d/lib/modules/"
	done
	echo "$GUEST_MODULES" >"$d/lib/modules/order"
	# Packed but not loaded at boot: efivarfs, for the UEFI variable scenario.
	for m in $GUEST_EXTRA_MODULES; do
		f=$(find "$KMODS/kernel" -name "$m.ko" | head -n 1)
		[ -n "$f" ] || die "module $m.ko not in $KMODS"
		install -m 0644 "$f" "$d/lib/modules/"
	done
	# Programs the scenarios run inside the guest: the bins of tests/guest-tools, when built.
	local src b
	for src in "$ROOT"/tests/guest-tools/src/bin/*.rs; do
		[ -f "$src" ] || continue
		b=$BIN_DIR/$(basename "$src" .rs)
		if [ -x "$b" ]; then
			install -m 0755 "$b" "$d/usr/bin/"
		else
			log "guest tool $(basename "$b") not built; the guest will not have it"
		fi
	done
	GUEST_INITRAMFS=$WORK/guest-initramfs.cpio.gz
	pack "$d" "$GUEST_INITRAMFS" gzip
}

# The 32-bit guest's initramfs: armhf busybox, the same /init, the armhf kernel's virtio
# modules (virtio and virtio_ring are built in there).
GUEST32_MODULES="virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk"

pack_guest32() {
	local d=$WORK/guest32-root m f
	busybox_tree "$d" "$BUSYBOX32"
	install -m 0755 "$GUEST_DIR/init" "$d/init"
	mkdir -p "$d/lib/modules"
	for m in $GUEST32_MODULES; do
		f=$(find "$KMODS32/kernel" -name "$m.ko" | head -n 1)
		[ -n "$f" ] || die "module $m.ko not in $KMODS32"
		install -m 0644 "$f" "$d/lib/modules/"
	done
	echo "$GUEST32_MODULES" >"$d/lib/modules/order"
	GUEST32_INITRAMFS=$WORK/guest32-initramfs.cpio.gz
	pack "$d" "$GUEST32_INITRAMFS" gzip
}

# build_uefi_disk LOADER OUT: a GPT disk (sgdisk) whose EFI System Partition (FAT32, mkfs.fat
# and mtools) holds LOADER as \EFI\BOOT\BOOTAA64.EFI and the guest kernel and initramfs: what
# the firmware boots with no boot entries configured. LOADER: systemd-boot (with a loader
# entry) or grub (grub-mkstandalone with an embedded grub.cfg). Built by public tools, never
# by Bulkhead.
build_uefi_disk() {
	local loader=$1 out=$2 esp=$WORK/esp.img esp_mib files=$WORK/esp-files
	local kernel=$KERNEL initramfs=$GUEST_INITRAMFS
	if [ "$loader" = systemd-boot-arm ]; then
		kernel=$KERNEL32 initramfs=$GUEST32_INITRAMFS
	fi
	# FAT32 needs 65525 clusters at least: 512-byte clusters and 40 MiB or more.
	esp_mib=$((($(stat -c %s "$kernel") + $(stat -c %s "$initramfs")) / 1048576 + 8))
	[ "$esp_mib" -ge 40 ] || esp_mib=40
	rm -rf "$esp" "$out" "$files"
	mkdir -p "$files"
	mkfs.fat -F 32 -s 1 -n ESP -C "$esp" $((esp_mib * 1024)) >/dev/null
	mmd -i "$esp" ::/EFI ::/EFI/BOOT
	case $loader in
	systemd-boot)
		printf 'default guest.conf\ntimeout 0\n' >"$files/loader.conf"
		printf 'title Bulkhead test guest\nlinux /vmlinuz\ninitrd /initrd.gz\noptions console=ttyAMA0 quiet\n' \
			>"$files/guest.conf"
		mmd -i "$esp" ::/loader ::/loader/entries
		mcopy -i "$esp" "$SYSTEMD_BOOT" ::/EFI/BOOT/BOOTAA64.EFI
		mcopy -i "$esp" "$files/loader.conf" ::/loader/loader.conf
		mcopy -i "$esp" "$files/guest.conf" ::/loader/entries/guest.conf
		;;
	grub)
		printf 'set timeout=0\nsearch --no-floppy --file --set=root /vmlinuz\nlinux /vmlinuz console=ttyAMA0 quiet\ninitrd /initrd.gz\nboot\n' \
			>"$files/grub.cfg"
		grub-mkstandalone -O arm64-efi -d "$GRUB_MODULES" -o "$files/BOOTAA64.EFI" \
			--modules="part_gpt fat search_fs_file linux normal" --locales= --fonts= --themes= \
			"boot/grub/grub.cfg=$files/grub.cfg" || die "grub-mkstandalone failed"
		mcopy -i "$esp" "$files/BOOTAA64.EFI" ::/EFI/BOOT/BOOTAA64.EFI
		;;
	systemd-boot-arm)
		# The 32-bit guest: systemd-boot for arm as \EFI\BOOT\BOOTARM.EFI, with a loader entry.
		printf 'default guest.conf\ntimeout 0\n' >"$files/loader.conf"
		printf 'title Bulkhead 32-bit test guest\nlinux /vmlinuz\ninitrd /initrd.gz\noptions console=ttyAMA0 quiet\n' \
			>"$files/guest.conf"
		mmd -i "$esp" ::/loader ::/loader/entries
		mcopy -i "$esp" "$SYSTEMD_BOOT32" ::/EFI/BOOT/BOOTARM.EFI
		mcopy -i "$esp" "$files/loader.conf" ::/loader/loader.conf
		mcopy -i "$esp" "$files/guest.conf" ::/loader/entries/guest.conf
		;;

	*) die "build_uefi_disk: unknown loader $loader" ;;
	esac
	mcopy -i "$esp" "$kernel" ::/vmlinuz
	mcopy -i "$esp" "$initramfs" ::/initrd.gz
	# 1 MiB before the ESP (protective MBR, GPT header and entries), 1 MiB after (backup GPT).
	truncate -s $(((esp_mib + 2) * 1048576)) "$out"
	sgdisk -n 1:2048:+"${esp_mib}M" -t 1:EF00 -c 1:ESP "$out" >/dev/null 2>&1 || die "sgdisk failed on $out"
	dd if="$esp" of="$out" bs=1M seek=1 conv=notrunc status=none
	rm -rf "$esp" "$files"
}

# suite_scenarios NAME: the scenario names of a suite, one per line.
# suite_files NAME[+NAME...]: the suite files, one per line.
suite_files() {
	local n
	for n in ${1//+/ }; do
		[ -f "$NESTED_DIR/suites/$n" ] || die "no suite '$n' (have: $(cd "$NESTED_DIR/suites" && echo *))"
		echo "$NESTED_DIR/suites/$n"
	done
}

suite_scenarios() {
	local f
	for f in $(suite_files "$1"); do
		sed -e 's/#.*//' -e '/^[[:space:]]*$/d' -e 's/^[[:space:]]*//' -e 's/[[:space:]]*$//' "$f" |
			grep -v -E '^(timeout|gic)=' || true
	done
}

# suite_timeout NAME[+NAME...]: the sum of the suites' limits (empty if none has one).
suite_timeout() {
	local f t total=
	for f in $(suite_files "$1"); do
		t=$(sed -n 's/^timeout=\([0-9]*\).*/\1/p' "$f" | head -n 1)
		[ -z "$t" ] || total=$((${total:-0} + t))
	done
	echo "$total"
}

# suite_gic NAME[+NAME...]: the GIC version of the suites' L1 machine (gic=N in the suite
# file; 3 if unset); suites that differ cannot share an L1.
suite_gic() {
	local f g gics=
	for f in $(suite_files "$1"); do
		g=$(sed -n 's/^gic=\([23]\).*/\1/p' "$f" | head -n 1)
		gics="$gics ${g:-3}"
	done
	gics=$(echo "$gics" | tr ' ' '\n' | sed '/^$/d' | sort -u)
	[ "$(echo "$gics" | wc -l)" = 1 ] || die "suites '$1' need different GICs: they cannot share an L1"
	echo "$gics"
}

pack_l1() {
	local d=$WORK/l1-root b s
	busybox_tree "$d"
	mkdir -p "$d/guest" "$d/harness/scenarios"
	install -m 0755 "$NESTED_DIR/l1-init" "$d/init"
	# L1 runs the same cloud kernel as the guest: its modules come from the same package.
	mkdir -p "$d/lib/modules"
	for m in $L1_MODULES; do
		f=$(find "$KMODS/kernel" -name "$m.ko" | head -n 1)
		[ -n "$f" ] || die "module $m.ko not in $KMODS"
		install -m 0644 "$f" "$d/lib/modules/"
	done
	echo "$L1_MODULES" >"$d/lib/modules/order"
	for b in "$BIN_DIR"/bulkhead "$BIN_DIR"/bulkhead-*; do
		[ -f "$b" ] && [ -x "$b" ] && install -m 0755 "$b" "$d/bin/"
	done
	if [ -x "$TRIGGER_BIN" ]; then
		install -m 0755 "$TRIGGER_BIN" "$d/bin/bulkhead-seccomp-trigger"
	else
		log "$TRIGGER_BIN not built; L1 will not have /bin/bulkhead-seccomp-trigger"
	fi
	cp "$KERNEL" "$d/guest/Image"
	cp "$GUEST_INITRAMFS" "$d/guest/initramfs.cpio.gz"
	# Peers for the boot benchmark (scenarios/bench.sh), only where it runs and only when present.
	if echo "$SCENARIOS" | grep -qx bench; then
		local peer
		for peer in firecracker cloud-hypervisor; do
			if [ -x "$PEERS_DIR/$peer" ]; then
				mkdir -p "$d/peers"
				install -m 0755 "$PEERS_DIR/$peer" "$d/peers/"
			else
				log "no $PEERS_DIR/$peer: the boot benchmark runs without it"
			fi
		done
	fi
	# The 32-bit guest, only where it runs (~7 MB).
	if wants_arm32; then
		pack_guest32
		mkdir -p "$d/guest/arm32"
		cp "$KERNEL32" "$d/guest/arm32/zImage"
		cp "$GUEST32_INITRAMFS" "$d/guest/arm32/initramfs.cpio.gz"
		if [ -n "${UEFI_FIRMWARE32:-}" ]; then
			install -m 0644 "$UEFI_FIRMWARE32" "$d/guest/arm32/AAVMF32_CODE.fd"
			build_uefi_disk systemd-boot-arm "$d/guest/arm32/systemd-boot.img"
		fi
	fi
	# The UEFI scenarios' firmware and disk, only where they run (~45 MB).
	if echo "$SCENARIOS" | grep -q '^uefi'; then
		mkdir -p "$d/guest/uefi"
		install -m 0644 "$UEFI_FIRMWARE" "$d/guest/uefi/QEMU_EFI.fd"
		build_uefi_disk systemd-boot "$d/guest/uefi/systemd-boot.img"
		build_uefi_disk grub "$d/guest/uefi/grub.img"
	fi
	install -m 0644 "$NESTED_DIR/lib.sh" "$d/harness/lib.sh"
	for s in "$NESTED_DIR"/scenarios/*.sh; do install -m 0755 "$s" "$d/harness/scenarios/"; done
	{
		if [ "$demo" -eq 1 ]; then
			echo "MODE=demo"
		else
			echo "MODE=suite"
			echo "SUITE=$suite"
			if [ "$(suite_gic "$suite")" = 2 ]; then echo "EXPECT_GIC=GIC-0"; else echo "EXPECT_GIC=GICv3"; fi
			echo "SCENARIOS=\"$(echo "$SCENARIOS" | tr '\n' ' ')\""
		fi
	} >"$d/harness/config"
	L1_INITRAMFS=$WORK/l1-initramfs.cpio
	# Uncompressed (~30 MB): QEMU loads it as is, L1 spends no time on gunzip under TCG.
	pack "$d" "$L1_INITRAMFS"
}

# ---------------------------------------------------------------------------------------------
# 6. Boot L1 (or, with --guest-check, the guest alone) and collect results.

# The L1 machine: virtualization=on gives L1 EL2, so its KVM works (HARNESS.md).
qemu_l1_args() {
	L1_GIC=3
	[ "$demo" -eq 1 ] || L1_GIC=$(suite_gic "$suite")
	# log_buf_len: room for the audit records of the seccomp rule usage trace
	# (scenarios/seccomp-usage.sh) while its recorder catches up; it detects any it missed.
	# shellcheck disable=SC2054 # the commas are QEMU's
	L1_QEMU=(qemu-system-aarch64 -M virt,virtualization=on,gic-version="$L1_GIC" -cpu max,pauth-impdef=on -smp 2 -m 3072
		-nographic -no-reboot -nic none -kernel "$KERNEL" -initrd "$L1_INITRAMFS"
		-append "console=ttyAMA0 panic=-1 quiet kvm-arm.mode=nvhe log_buf_len=64M")
}

run_guest_check() {
	local logf=$OUT/guest-check.log rc=0 fails=0 v
	log "booting the guest directly under QEMU TCG (no KVM): $logf"
	rm -f "$logf"
	timeout --foreground -k 5 240 qemu-system-aarch64 -M virt,gic-version=3 -cpu max,pauth-impdef=on -smp 2 -m 512 \
		-display none -monitor none -serial stdio -no-reboot -nic none \
		-kernel "$KERNEL" -initrd "$GUEST_INITRAMFS" -append "console=ttyAMA0 panic=-1 quiet" < <(
			# Wait for the shell, run a command, then power off.
			for _ in $(seq 1 200); do
				grep -q GUEST-READY "$logf" 2>/dev/null && break
				sleep 1
			done
			sleep 2
			# shellcheck disable=SC2016 # expands in the guest
			echo 'echo marker-$((6*7))'
			sleep 2
			echo 'poweroff -f'
			for _ in $(seq 1 60); do
				grep -q 'reboot: Power down' "$logf" 2>/dev/null && break
				sleep 1
			done
		) | sed -u 's/\r//g' | tee "$logf" || rc=$?
	echo
	check() { # check NAME ERE
		if grep -Eq "$2" "$logf"; then echo "ok   $1"; else echo "FAIL $1"; fails=$((fails + 1)); fi
	}
	check "init ran" '^GUEST-INIT boot_id=[0-9a-f-]{36}$'
	check "nproc 2" '^GUEST-NPROC 2$'
	v=$(sed -n 's/^GUEST-MEMTOTAL \([0-9]*\)$/\1/p' "$logf" | head -n 1)
	if [ -n "$v" ] && [ "$v" -gt 400000 ] && [ "$v" -le 524288 ]; then
		echo "ok   memtotal $v kB"
	else
		echo "FAIL memtotal '$v'"; fails=$((fails + 1))
	fi
	check "clocksource" '^GUEST-CLOCKSOURCE arch_sys_counter$'
	check "gic line" '^GUEST-GIC .*GIC'
	check "pl011 driver" '^GUEST-TTY-DRIVER uart-pl011$'
	check "ready" '^GUEST-READY$'
	check "shell runs typed commands" '^marker-42$'
	check "poweroff" 'reboot: Power down'
	echo "$((9 - fails)) passed, $fails failed"
	[ "$fails" -eq 0 ]
}

run_demo() {
	log "demo: L1 boots (~20 s), then a 2-vCPU guest whose console is this terminal."
	log "Power the guest off with 'poweroff -f'; QEMU's escape is Ctrl-A x."
	qemu_l1_args
	"${L1_QEMU[@]}"
}

# parse_results LOG: per-scenario summary; sets passed/failed.
parse_results() {
	local logf=$1 s line
	passed=0
	failed=0
	{
		echo "== nested suite '$suite' ($(date -u +%Y-%m-%dT%H:%M:%SZ)) =="
		if grep -q '^RESULT kvm FAIL' "$logf"; then
			grep '^RESULT kvm FAIL' "$logf" | head -n 1
		fi
		for s in $SCENARIOS; do
			line=$(grep -E "^RESULT $s (PASS|FAIL)" "$logf" | tail -n 1 || true)
			if [ -z "$line" ]; then
				echo "RESULT $s FAIL no RESULT line (L1 crashed, hung or timed out)"
				failed=$((failed + 1))
			elif [ "${line#RESULT "$s" PASS}" != "$line" ]; then
				echo "$line"
				passed=$((passed + 1))
			else
				echo "$line"
				failed=$((failed + 1))
			fi
		done
		if grep -q '^RESULT kvm FAIL' "$logf"; then
			failed=$((failed + 1))
		fi
		if ! grep -q '^HARNESS-DONE' "$logf"; then
			echo "L1 did not finish (no HARNESS-DONE line)"
		fi
	} >"$OUT/$suite.summary"
	echo "$passed passed, $failed failed" >>"$OUT/$suite.summary"
	cat "$OUT/$suite.summary"
}

main() {
	local t0 rc=0 logf
	t0=$(date +%s)
	local s
	if [ "$demo" -eq 0 ] && [ "$guest_check" -eq 0 ]; then
		SCENARIOS=$(suite_scenarios "$suite")
		[ -n "$SCENARIOS" ] || die "suite '$suite' is empty"
		for s in $SCENARIOS; do
			[ -f "$NESTED_DIR/scenarios/$s.sh" ] || die "suite '$suite' names unknown scenario '$s'"
		done
		suite_gic "$suite" >/dev/null
	fi
	ensure_host_deps
	fetch_assets
	mkdir -p "$OUT"
	WORK=$(mktemp -d "${TMPDIR:-/tmp}/bulkhead-nested.XXXXXX")
	if [ "$keep" -eq 1 ]; then
		log "work directory: $WORK"
	else
		trap 'rm -rf "$WORK"' EXIT
	fi
	if [ "$guest_check" -eq 1 ]; then
		pack_guest
		run_guest_check
		return
	fi

	build_project
	pack_guest
	if [ "$demo" -eq 1 ] && [ "$(uname -m)" = aarch64 ] && [ -r /dev/kvm ] && [ -w /dev/kvm ]; then
		log "arm64 host with /dev/kvm: running the demo VM directly ('poweroff -f' in the guest ends it)"
		"$BIN_DIR/bulkhead" --kernel "$KERNEL" --initramfs "$GUEST_INITRAMFS" \
			--cmdline "console=ttyAMA0 quiet" --cpus boot=2 --memory size=512M
		return
	fi
	if [ "$demo" -eq 1 ]; then
		SCENARIOS=
		pack_l1
		run_demo
		return
	fi
	pack_l1
	overall_timeout=${overall_timeout:-$(suite_timeout "$suite")}
	overall_timeout=${overall_timeout:-600}
	logf=$OUT/$suite.log
	log "prepared in $(($(date +%s) - t0)) s; booting L1 (limit ${overall_timeout} s), console: $logf"
	local t1
	t1=$(date +%s)
	qemu_l1_args
	set +e
	timeout --foreground -k 10 "$overall_timeout" "${L1_QEMU[@]}" </dev/null 2>&1 | sed -u 's/\r//g' | tee "$logf"
	rc=${PIPESTATUS[0]}
	set -e
	echo
	if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
		echo "L1 TIMEOUT after ${overall_timeout} s" | tee -a "$logf"
	elif [ "$rc" -ne 0 ]; then
		echo "qemu exited with status $rc" | tee -a "$logf"
	fi
	log "L1 run took $(($(date +%s) - t1)) s"
	parse_results "$logf"
	if [ "$rc" -ne 0 ] || [ "$failed" -ne 0 ] || ! grep -q '^HARNESS-DONE' "$logf"; then
		return 1
	fi
}

main
