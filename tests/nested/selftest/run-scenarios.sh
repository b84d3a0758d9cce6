#!/usr/bin/env bash
# Runs scenarios on the build machine against selftest/fake-bulkhead (the guest under QEMU TCG):
# checks a scenario's own logic in seconds, without L1 and without a working bulkhead.
#   tests/nested/selftest/run-scenarios.sh GUEST_DIR SCENARIO...
# GUEST_DIR holds Image and initramfs.cpio.gz (e.g. from `run.sh --guest-check --keep`:
# guest-initramfs.cpio.gz, and the kernel from tests/.cache/linux-image-*/boot/vmlinuz-*).
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
[ $# -ge 2 ] || { sed -n '2,6s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; exit 2; }
guest=$(cd "$1" && pwd)
shift
fails=0
for s in "$@"; do
	dir=$(mktemp -d "${TMPDIR:-/tmp}/scenario-$s.XXXXXX")
	HARNESS_DIR=$here/.. GUEST_DIR=$guest BULKHEAD=$here/fake-bulkhead SCN_NAME=$s SCN_DIR=$dir \
		timeout -s KILL 300 setsid sh "$here/../scenarios/$s.sh" &
	pid=$!
	wait "$pid"
	st=$?
	kill -KILL -- "-$pid" 2>/dev/null # what the scenario left running
	if [ "$st" -eq 0 ]; then
		echo "RESULT $s PASS"
	else
		echo "RESULT $s FAIL $(cat "$dir/reason" 2>/dev/null || echo "status $st")"
		fails=$((fails + 1))
	fi
	rm -rf "$dir"
done
[ "$fails" -eq 0 ]
