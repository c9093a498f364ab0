#!/usr/bin/env bash
# Installs alike and runs the main job on the embedded defaults: a local Ray instance and a
# local data store. Makes a real disk image (ext4 in a partition), backs it up twice, restores
# the latest version and checks it byte for byte.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
need=""
for cmd in qemu-img:qemu-utils mkfs.ext4:e2fsprogs sfdisk:fdisk; do
  command -v "${cmd%%:*}" >/dev/null || need="$need ${cmd##*:}"
done
if [ -n "$need" ]; then apt-get update -qq && apt-get install -y -qq $need >/dev/null; fi
python3 -m pip install -q --disable-pip-version-check -e .
work=${ALIKE_DEMO_DIR:-$(mktemp -d /tmp/alike-demo.XXXX)}
python3 - "$work" <<'PY'
import sys
from tests import images
d = sys.argv[1]
t = images.tree(d + "/tree", 24 * images.MiB)
images.ext4_image(d + "/web.raw", 128, t, "web")
PY
export ALIKE_STORE=$work/ads
alike init
alike backup image:$work/web.raw --name web
alike backup image:$work/web.raw --name web
alike versions
alike restore web --to $work/web-restored.raw
cmp $work/web.raw $work/web-restored.raw && echo "restored image is byte-identical"
alike verify
alike stats
