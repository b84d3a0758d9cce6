# shellcheck shell=bash
# What the interop tests share (sourced by qemu-vhost-user-blk.sh and qemu-vhost-user-net.sh,
# which define log, die and CACHE first): host packages, the Debian amd64 guest kernel and
# busybox (cached in tests/.cache), and the guest's kernel modules in load order.

# shellcheck source=tests/debian.sh
. "$(dirname "${BASH_SOURCE[0]}")/../debian.sh"

# ensure_host_deps PKG...: the Debian packages installed (apt-get update only when needed),
# and package lists present when the guest assets are not cached yet.
ensure_host_deps() {
	local missing=() p
	for p in "$@"; do
		pkg_installed "$p" || missing+=("$p")
	done
	if [ ${#missing[@]} -gt 0 ]; then
		if ! as_root env DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1; then
			apt_update
			log "apt-get install ${missing[*]}"
			as_root env DEBIAN_FRONTEND=noninteractive \
				apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null ||
				die "apt-get install ${missing[*]} failed"
		fi
	fi
	# Package lists are needed to resolve and download the guest assets, not once cached.
	if ! compgen -G "$CACHE/linux-image-*-cloud-amd64/.unpacked" >/dev/null ||
		[ ! -e "$CACHE/busybox-static-amd64/.unpacked" ]; then
		if ! apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1 ||
			! apt-cache show busybox-static >/dev/null 2>&1; then
			apt_update
		fi
	fi
}

# ---------------------------------------------------------------------------------------------
# 2. Guest kernel and busybox from Debian's amd64 packages, cached in tests/.cache.

fetch_assets() {
	local kdir
	kdir=$(resolve_kernel_pkg linux-image-cloud-amd64 amd64)
	KERNEL=$(find "$kdir/boot" -maxdepth 1 -name 'vmlinuz-*' -print -quit 2>/dev/null)
	[ -f "$KERNEL" ] || die "no boot/vmlinuz-* in $kdir"
	# A bzImage has "HdrS" at offset 0x202.
	[ "$(dd if="$KERNEL" bs=1 skip=514 count=4 status=none)" = HdrS ] || die "$KERNEL is not a bzImage"
	KVER=${KERNEL##*/vmlinuz-}
	MODDIR=$kdir/lib/modules/$KVER
	[ -d "$MODDIR/kernel" ] || die "no modules for $KVER in $kdir"

	download_pkg busybox-static "$CACHE/busybox-static-amd64"
	BUSYBOX=$CACHE/busybox-static-amd64/bin/busybox
	[ -x "$BUSYBOX" ] || die "no bin/busybox in busybox-static"
}

# module_file NAME: the module's file in the package (names use _ or - interchangeably).
module_file() {
	local alt=${1//_/-}
	find "$MODDIR/kernel" \( -name "$1.ko" -o -name "$1.ko.*" -o -name "$alt.ko" -o -name "$alt.ko.*" \) \
		-print -quit
}

declare -A mod_seen=()
MOD_ORDER=()
# add_module NAME: NAME's dependencies, then NAME (built-in modules need nothing).
add_module() {
	local name=$1 file deps d
	[ -z "${mod_seen[$name]:-}" ] || return 0
	mod_seen[$name]=1
	if grep -qE "/${name//_/[_-]}\.ko\$" "$MODDIR/modules.builtin" 2>/dev/null; then
		return 0
	fi
	file=$(module_file "$name")
	[ -n "$file" ] || die "module $name neither built in nor in $MODDIR"
	deps=$(unpacked_module "$file" | { grep -a -o 'depends=[^[:cntrl:]]*' || true; } | sed -n '1s/^depends=//p')
	for d in ${deps//,/ }; do add_module "$d"; done
	MOD_ORDER+=("$name")
}

# unpacked_module FILE: the module, decompressed if it is compressed.
unpacked_module() {
	case $1 in
	*.ko.xz) xz -dc "$1" ;;
	*.ko.zst) zstd -qdc "$1" ;;
	*.ko.gz) gzip -dc "$1" ;;
	*) cat "$1" ;;
	esac
}
