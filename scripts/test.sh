#!/usr/bin/env bash
# Installs everything the tests need on a fresh Debian machine, then runs them.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
need=""
for cmd in qemu-img:qemu-utils mkfs.ext4:e2fsprogs sfdisk:fdisk restic:restic borg:borgbackup script:util-linux qemu-system-x86_64:qemu-system-x86; do
  command -v "${cmd%%:*}" >/dev/null || need="$need ${cmd##*:}"
done
# alike mount: mfusepy loads libfuse 3 (or 2)
ldconfig -p | grep -q 'libfuse3\.so\.3\|libfuse\.so\.2' || need="$need libfuse3-3"
if [ -n "$need" ]; then
  apt-get update -qq
  apt-get install -y -qq $need >/dev/null
fi
python3 -m pip install -q --disable-pip-version-check -e '.[test]'
export RAY_USAGE_STATS_ENABLED=0
python3 -m pytest -q -p no:cacheprovider "$@"
