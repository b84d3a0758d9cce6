#!/usr/bin/env bash
# The whole test suite: installs what it needs, runs the unit tests on x86_64 and (under
# qemu-aarch64-static) on aarch64, then the nested-KVM system tests against a real Debian
# arm64 kernel. Exits non-zero if anything failed or could not run.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n=== %s\n' "$*"; }

need_pkgs=()
for p in qemu-system-arm qemu-user-static cpio device-tree-compiler; do
    dpkg -s "$p" >/dev/null 2>&1 || need_pkgs+=("$p")
done
if [ ${#need_pkgs[@]} -gt 0 ]; then
    log "installing ${need_pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi
rustup target list --installed | grep -qx aarch64-unknown-linux-musl \
    || rustup target add aarch64-unknown-linux-musl

export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_LINKER=rust-lld
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_RUNNER=qemu-aarch64-static

log "unit tests, x86_64"
cargo test --workspace

log "unit tests, aarch64 (qemu-aarch64-static)"
# Unit tests only: integration tests start programs, and this machine runs aarch64 ones only
# through the test runner.
cargo test --workspace --target aarch64-unknown-linux-musl --lib --bins

rc=0
log "fuzzing the block request parser (60 s, cargo-fuzz)"
if rustup toolchain list | grep -q '^nightly'; then
    command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked --quiet
    (cd devices/block/fuzz && cargo +nightly fuzz run request_parser -- \
        -max_total_time=60 -rss_limit_mb=2048 -print_final_stats=1 2>&1 | tail -n 12) ||
        { echo "FUZZ FAILED: see devices/block/fuzz/artifacts"; rc=1; }
else
    echo "SKIPPED: fuzzing needs a nightly toolchain, which this machine does not have"
fi

log "interop: QEMU (a vhost-user frontend nobody here wrote) drives bulkhead-block for a Debian amd64 guest"
tests/interop/qemu-vhost-user-blk.sh || rc=1

rm -f tests/out/*.summary
log "system tests, nested KVM (L1 with a GICv3)"
tests/nested/run.sh --suite boot || rc=1

log "system tests, nested KVM (L1 with a GICv2: the vGICv2 fallback)"
tests/nested/run.sh --suite gicv2 --no-build || rc=1

log "system tests, nested KVM: disks (bulkhead-block processes behind PCIe root ports)"
tests/nested/run.sh --suite disk --no-build || rc=1

log "system tests, nested KVM: the device-process jail (attack probe)"
tests/nested/run.sh --suite jail --no-build || rc=1

log "summary"
cat tests/out/boot.summary tests/out/gicv2.summary tests/out/disk.summary tests/out/jail.summary 2>/dev/null | grep -E '^RESULT|passed' || true
passed=$(cat tests/out/boot.summary tests/out/gicv2.summary tests/out/disk.summary tests/out/jail.summary 2>/dev/null | grep -c '^RESULT .* PASS' || true)
failed=$(cat tests/out/boot.summary tests/out/gicv2.summary tests/out/disk.summary tests/out/jail.summary 2>/dev/null | grep -c '^RESULT .* FAIL' || true)
[ "$passed" -gt 0 ] || rc=1
echo "nested: $passed passed, $failed failed"
exit "$rc"
