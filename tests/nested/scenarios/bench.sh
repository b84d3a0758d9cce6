#!/bin/sh
# timeout: 400
# Runs bulkhead-bench (tests/bench) against the test guest and prints its figures.
. "${HARNESS_DIR:-/harness}/lib.sh"

BENCH=${BENCH:-/bin/bulkhead-bench}
[ -x "$BENCH" ] || fail "$BENCH was not built"
say "bulkhead-bench --kernel $GUEST_KERNEL --initramfs $GUEST_INITRAMFS"
"$BENCH" --kernel "$GUEST_KERNEL" --initramfs "$GUEST_INITRAMFS" \
	>"$SCN_DIR/bench.out" 2>&1 </dev/null
st=$?
quote "|" <"$SCN_DIR/bench.out"
[ "$st" = 0 ] || fail "bulkhead-bench exited with status $st"
