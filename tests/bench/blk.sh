#!/usr/bin/env bash
# Block benchmark: bulkhead-block over vhost-user, driven by a host-side virtqueue driver (no
# VM), next to qemu-storage-daemon's vhost-user-blk export and plain io_uring on the same file
# in /dev/shm. Prints a table; asserts nothing. Extra arguments go to bulkhead-blk-bench
# (--runs, --seconds, --pin same|split|none, --size-mib, --targets, ...).
set -euo pipefail
cd "$(dirname "$0")/../.."
dpkg -s qemu-system-common >/dev/null 2>&1 || {
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends qemu-system-common >/dev/null
}
cargo build --release -q -p bulkhead-block -p bulkhead-bench
exec target/release/bulkhead-blk-bench --bulkhead-block target/release/bulkhead-block "$@"
