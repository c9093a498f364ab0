#!/usr/bin/env bash
# Installs everything the tests need on a fresh Debian machine, then runs them.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
need=""
for cmd in qemu-img:qemu-utils mkfs.ext4:e2fsprogs sfdisk:fdisk restic:restic borg:borgbackup script:util-linux qemu-system-x86_64:qemu-system-x86 \
           mkfs.xfs:xfsprogs mkfs.vfat:dosfstools mkntfs:ntfs-3g mcopy:mtools; do
  command -v "${cmd%%:*}" >/dev/null || need="$need ${cmd##*:}"
done
# kvm: tests: libvirt and QEMU; libvirt-python (a test dependency) builds against libvirt's headers
for cmd in libvirtd:libvirt-daemon-system virtlogd:libvirt-daemon-system virsh:libvirt-clients \
           pkg-config:pkg-config gcc:gcc; do
  command -v "${cmd%%:*}" >/dev/null || [ -x "/usr/sbin/${cmd%%:*}" ] || need="$need ${cmd##*:}"
done
[ -e /usr/include/libvirt/libvirt.h ] || need="$need libvirt-dev"
# alike mount: mfusepy loads libfuse 3 (or 2)
ldconfig -p | grep -q 'libfuse3\.so\.3\|libfuse\.so\.2' || need="$need libfuse3-3"
if [ -n "$need" ]; then
  apt-get update -qq
  apt-get install -y -qq $need >/dev/null
fi
# libvirtd needs virtlogd; no init system starts them here. /dev/kvm gets the owner and mode
# that Debian's udev rules give it (else libvirtd re-probes QEMU at every call: tests/kvm_env.py).
if [ "$(id -u)" = 0 ]; then
  if [ -e /dev/kvm ] && getent group kvm >/dev/null; then chgrp kvm /dev/kvm && chmod 0660 /dev/kvm || true; fi
  pgrep -x virtlogd >/dev/null || /usr/sbin/virtlogd -d
  pgrep -x libvirtd >/dev/null || /usr/sbin/libvirtd -d
fi
# vmware: tests: govmomi's vCenter simulator, built from Debian's Go packages (cached: tests/vcsim/build.sh).
# Built in the background while the tests run (a cold build takes 2-3 min); the vmware: tests wait
# for it (the script's lock) and fail with its error if it failed.
bash tests/vcsim/build.sh >/dev/null 2>"${TMPDIR:-/tmp}/alike-vcsim-build.log" &
python3 -m pip install -q --disable-pip-version-check -e '.[test]'
export RAY_USAGE_STATS_ENABLED=0
python3 -m pytest -q -p no:cacheprovider --durations=25 "$@"
