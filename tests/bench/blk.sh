#!/usr/bin/env bash
# Block benchmark: bulkhead-block over vhost-user, driven by a host-side virtqueue driver (no
# VM), next to qemu-storage-daemon's vhost-user-blk export, Cloud Hypervisor's vhost_user_block
# (with --ch PATH; /work/shared/anchors/x86_64/vhost_user_block on the build machines; without
# it those rows are skipped and the output says so) and plain io_uring on the same file in
# /dev/shm. Prints a table; asserts nothing. Extra arguments go to bulkhead-blk-bench
# (--ch, --runs, --seconds, --driver irq,poll, --pin, --pin-poll, --poll-us, --direct, --image,
# --size-mib, --targets, ...).
set -euo pipefail
cd "$(dirname "$0")/../.."
dpkg -s qemu-system-common >/dev/null 2>&1 || {
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends qemu-system-common >/dev/null
}
cargo build --release -q -p bulkhead-block -p bulkhead-bench
exec target/release/bulkhead-blk-bench --bulkhead-block target/release/bulkhead-block "$@"
