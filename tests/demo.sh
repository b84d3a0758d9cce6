#!/usr/bin/env bash
# Bulkhead's demo: one VM (2 vCPUs, 512 MiB, Debian's arm64 kernel, a busybox initramfs) whose
# console is this terminal. On an arm64 host with /dev/kvm it runs directly; anywhere else it
# runs nested, inside an emulated arm64 host under QEMU (about 10 s to the guest's shell).
# Type commands at the guest's shell; 'poweroff -f' ends the demo.
set -euo pipefail
exec "$(dirname "$0")/nested/run.sh" --demo "$@"
