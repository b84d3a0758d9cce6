#!/usr/bin/env bash
# The whole test suite: installs what it needs, runs the unit tests on x86_64 and (under
# qemu-aarch64-static) on aarch64, then the nested-KVM system tests against a real Debian
# arm64 kernel. Exits non-zero if anything failed or could not run.
set -euo pipefail
cd "$(dirname "$0")/.."

# Each step's header says how far into the run it starts (CI's budget is 45 minutes).
log() { printf '\n=== %s (at %d:%02d)\n' "$*" $((SECONDS / 60)) $((SECONDS % 60)); }

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

log "formatting (cargo fmt --check)"
rustup component list --installed | grep -q '^rustfmt' || rustup component add rustfmt
rustup component list --installed | grep -q '^clippy' || rustup component add clippy
cargo fmt --all --check

rc=0
# The nested system tests run in the background from here, the longest part of the run: their
# cross-build first (beside the unit tests and the interop tests, which run at the same
# priority), then one emulated host at a time, each busy with its scenarios' real timing
# (device deadlines, rate limits). The emulated hosts leave about a third of the machine's two
# CPUs idle, and the lints and the fuzz targets get that: at the lowest priority (nice 19), so
# that they take only idle time and do not slow an emulated host down. The L1 consoles go to a
# file, shown from the start once the fuzzing is done and then as they come.
rm -f tests/out/*.summary
mkdir -p tests/out
nested_log=tests/out/nested-all.txt
log "system tests, nested KVM, in the background (cross-build, then three emulated hosts in turn; console in $nested_log until the fuzzing is done)"
# In a process group of its own (set -m), which ends with this script however it ends: an
# interrupted run leaves no emulated host behind. Its own target directory: cargo locks a
# target directory's release build while it builds, and the interop tests build their x86_64
# release programs meanwhile.
set -m
(
    export CARGO_TARGET_DIR=$PWD/target/nested
    nested_rc=0
    log "system tests, nested KVM (L1 with a GICv3)"
    tests/nested/run.sh --suite boot || nested_rc=1
    log "system tests, nested KVM (L1 with a GICv2: the vGICv2 fallback)"
    tests/nested/run.sh --suite gicv2 --no-build || nested_rc=1
    # Three suites in one L1 boot (the same GICv3 machine; an L1 boot costs a minute on a slow day).
    log "system tests, nested KVM: disks (bulkhead-block processes behind PCIe root ports), the device-process jail (attack probe), networking (bulkhead-net processes on taps)"
    tests/nested/run.sh --suite disk+jail+net --no-build || nested_rc=1
    exit "$nested_rc"
) >"$nested_log" 2>&1 </dev/null &
nested_pid=$!
set +m
trap 'kill -TERM -- "-$nested_pid" 2>/dev/null || true' EXIT

log "unit tests, x86_64"
# Strict: a test that needs root (a real tap, namespaces) fails instead of skipping.
# The device programs first: the VMM's tests start them from beside the test binaries.
cargo build --workspace --bins || rc=1
BULKHEAD_TEST_STRICT=1 cargo test --workspace || rc=1

log "unit tests, aarch64 (qemu-aarch64-static)"
# Unit tests only: integration tests start programs, and this machine runs aarch64 ones only
# through the test runner.
cargo test --workspace --target aarch64-unknown-linux-musl --lib --bins || rc=1

log "interop: QEMU (a vhost-user frontend nobody here wrote) drives bulkhead-block for a Debian amd64 guest"
tests/interop/qemu-vhost-user-blk.sh || rc=1
log "interop: QEMU drives bulkhead-net (vhost-user-net, 2 queue pairs) on a tap in a namespace of its own"
tests/interop/qemu-vhost-user-net.sh || rc=1

log "lints (cargo clippy -D warnings, nice 19, beside the nested tests)"
nice -n 19 cargo clippy --workspace --all-targets -- -D warnings || rc=1

# Fuzz targets: CRATE_DIR:TARGET:SECONDS. Each replays its committed corpus (fuzz/seeds/TARGET:
# a crash there is a regression) and then fuzzes for a bounded time. They share one target
# directory so that their common dependencies are built once. Leak detection is off: the
# targets that drive a server start threads per input (workers, deadline keepers) that are
# still winding down when libFuzzer checks, or at exit, which LeakSanitizer reports as leaks
# (libFuzzer's -detect_leaks covers the per-input check, ASAN_OPTIONS the one at exit).
# The seconds are a smoke run within the suite's 45-minute budget (docs/testing.md says how to
# fuzz for longer).
FUZZ_TARGETS=(
    devices/block/fuzz:request_parser:8
    devices/net/fuzz:descriptor_handling:5
    devices/console/fuzz:queue_handling:5
    devices/balloon/fuzz:queues:5
    devices/runtime/fuzz:vhost_user_messages:5
    vmm/fuzz:virtio_pci_transport:5
    vmm/fuzz:vhost_user_replies:5
    vmm/fuzz:api_requests:5
)
log "fuzzing (cargo-fuzz, nightly, nice 19, beside the nested tests): ${FUZZ_TARGETS[*]}"
fuzz_tools=1
if ! rustup toolchain list | grep -q '^nightly'; then
    rustup toolchain install nightly --profile minimal ||
        { echo "FUZZ FAILED: cannot install the nightly toolchain cargo-fuzz needs"; fuzz_tools=0; rc=1; }
fi
command -v cargo-fuzz >/dev/null || nice -n 19 cargo install cargo-fuzz --locked --quiet ||
    { echo "FUZZ FAILED: cannot install cargo-fuzz"; fuzz_tools=0; rc=1; }
[ "$fuzz_tools" -eq 1 ] || FUZZ_TARGETS=()
fuzz_target_dir=$PWD/target/fuzz
for t in "${FUZZ_TARGETS[@]}"; do
    IFS=: read -r dir name secs <<<"$t"
    [ -f "$dir/fuzz_targets/$name.rs" ] || { echo "FUZZ FAILED: no target $dir/fuzz_targets/$name.rs"; rc=1; continue; }
    corpus=$dir/seeds/$name
    [ -d "$corpus" ] || { echo "FUZZ FAILED: no seed corpus $corpus"; rc=1; continue; }
    # libFuzzer adds what it finds to the first directory: a scratch one, so the committed
    # corpus (the second, read as seeds) stays as it is.
    scratch=$(mktemp -d)
    echo "--- $dir $name: replay $(find "$corpus" -type f | wc -l) corpus inputs, then ${secs} s"
    (cd "$dir" && ASAN_OPTIONS=detect_leaks=0 nice -n 19 cargo +nightly fuzz run --target-dir "$fuzz_target_dir" "$name" "$scratch" "seeds/$name" -- \
        -max_total_time="$secs" -rss_limit_mb=2048 -detect_leaks=0 -print_final_stats=1 2>&1 | tail -n 12
        exit "${PIPESTATUS[0]}") ||
        { echo "FUZZ FAILED: $dir $name (see $dir/artifacts/$name)"; rc=1; }
    rm -rf "$scratch"
done

log "system tests, nested KVM: what they printed so far, then the rest as it comes"
tail -n +1 -f --pid="$nested_pid" "$nested_log" || true
wait "$nested_pid" || rc=1

log "summary"
summaries=(tests/out/boot.summary tests/out/gicv2.summary tests/out/disk+jail+net.summary)
cat "${summaries[@]}" 2>/dev/null | grep -E '^RESULT|passed' || true
passed=$(cat "${summaries[@]}" 2>/dev/null | grep -c '^RESULT .* PASS' || true)
failed=$(cat "${summaries[@]}" 2>/dev/null | grep -c '^RESULT .* FAIL' || true)
[ "$passed" -gt 0 ] || rc=1
echo "nested: $passed passed, $failed failed"
# A failed scenario's own lines (its evidence: what it did, the guest console and the VMM's
# stderr it dumped) once more at the very end, where a CI log cut in the middle keeps them.
for name in $(cat "${summaries[@]}" 2>/dev/null | sed -n 's/^RESULT \([^ ]*\) FAIL.*/\1/p'); do
    echo
    echo "=== evidence of the failed scenario $name (its last 120 lines)"
    cat tests/out/boot.log tests/out/gicv2.log tests/out/disk+jail+net.log 2>/dev/null |
        tr -d '\r' | grep -aF "[$name]" | tail -n 120 || true
done
exit "$rc"
