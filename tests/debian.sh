# shellcheck shell=bash
# Debian packages for the test scripts (sourced by tests/nested/run.sh and tests/interop/lib.sh,
# which define log, die and CACHE first): root for apt, one apt-get update a run, and guest
# assets downloaded from Debian's archive and unpacked once into $CACHE (tests/.cache).

as_root() {
	if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo -n "$@"; fi
}

apt_updated=0
apt_update() {
	if [ "$apt_updated" -eq 0 ]; then
		log "apt-get update"
		as_root apt-get update -qq >/dev/null
		apt_updated=1
	fi
}

pkg_installed() {
	[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]
}

# download_pkg PKG DEST: apt-get download PKG and unpack it into DEST (once).
download_pkg() {
	local pkg=$1 dest=$2 tmp
	if [ -e "$dest/.unpacked" ]; then return 0; fi
	mkdir -p "$CACHE"
	tmp=$(mktemp -d "$CACHE/dl.XXXXXX")
	log "apt-get download $pkg"
	(cd "$tmp" && apt-get download -qq -o APT::Sandbox::User=root "$pkg" >/dev/null 2>&1) ||
		(cd "$tmp" && apt-get download -qq "$pkg" >/dev/null) ||
		{ rm -rf "$tmp"; die "apt-get download $pkg failed"; }
	rm -rf "$dest"
	mkdir -p "$dest"
	dpkg-deb -x "$tmp"/*.deb "$dest"
	rm -rf "$tmp"
	touch "$dest/.unpacked"
}

# resolve_kernel_pkg META ARCH: the versioned kernel package META depends on, downloaded and
# unpacked; prints its directory (falls back to the newest cached one when offline).
resolve_kernel_pkg() {
	local meta=$1 arch=$2 flavour kpkg kdir
	flavour=${meta#linux-image-}
	kpkg=$(apt-cache depends "$meta:$arch" 2>/dev/null |
		awk -v f="$flavour" '$1 == "Depends:" && $2 ~ ("^linux-image-.*-" f) { print $2; exit }')
	if [ -n "$kpkg" ]; then
		kpkg=${kpkg%:"$arch"}
		kdir=$CACHE/$kpkg
		download_pkg "$kpkg:$arch" "$kdir" >&2
	else
		kdir=$(find "$CACHE" -maxdepth 1 -name "linux-image-*-$flavour" | sort -V | tail -n 1)
		[ -n "$kdir" ] || die "cannot resolve $meta:$arch (apt-cache depends)"
		log "using cached $(basename "$kdir")" >&2
	fi
	echo "$kdir"
}
