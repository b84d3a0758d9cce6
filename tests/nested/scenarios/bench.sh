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

say "bulkhead-spawn-bench: device process spawn to first vhost-user reply, jailed and not"
/bin/bulkhead-spawn-bench --bulkhead-block /bin/bulkhead-block --runs 10 \
	>"$SCN_DIR/spawn.out" 2>&1 </dev/null
st=$?
quote "|" <"$SCN_DIR/spawn.out"
[ "$st" = 0 ] || fail "bulkhead-spawn-bench exited with status $st"
