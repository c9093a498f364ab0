#!/usr/bin/env bash
# Builds tests/vcsim (alike's launcher for govmomi's vCenter simulator) from Debian packages only:
# golang-go and golang-github-vmware-govmomi-dev (0.24.2, with golang-github-google-uuid-dev, the
# one package outside the standard library that the simulator imports), GO111MODULE=off, no Go
# module downloads. Installs the packages when missing (apt-get, as root; idempotent).
#
# The binary goes to ${ALIKE_VCSIM_CACHE:-$HOME/.cache/alike/vcsim}/vcsim-<hash>, the hash of the
# launcher's sources, this script, the Go version and the packages' versions; an existing one is
# kept and the build skipped. The binary's path is the only line printed on stdout; the rest goes
# to stderr.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cache="${ALIKE_VCSIM_CACHE:-${HOME:-/root}/.cache/alike/vcsim}"
pkgs="golang-go golang-github-vmware-govmomi-dev golang-github-google-uuid-dev"

mkdir -p "$cache"
# one build at a time: scripts/test.sh starts one in the background while the tests run, and the
# vmware: tests' fixtures call this script again; the second waits for the first and finds its binary
exec 9>"$cache/.build.lock"
flock 9

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }
missing=""
for p in $pkgs; do installed "$p" || missing="$missing $p"; done
if [ -n "$missing" ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "vcsim build: needs the Debian packages$missing (apt-get install, as root)" >&2
    exit 1
  fi
  echo "vcsim build: installing$missing" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends $missing >/dev/null </dev/null
fi

cache="$(cd "$cache" && pwd)"
versions="$(dpkg-query -W -f='${Package} ${Version}\n' $pkgs)"
go_version="$(go version)"
hash="$( { cat "$here"/*.go "$here/build.sh"; echo "$versions"; echo "$go_version"; } | sha256sum | cut -c1-16)"
bin="$cache/vcsim-$hash"
if [ -x "$bin" ]; then
  echo "$bin"
  exit 0
fi

work="$(mktemp -d "$cache/build.XXXXXX")"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/src/alike-vcsim"
cp "$here"/*.go "$work/src/alike-vcsim/"
echo "vcsim build: compiling $bin (govmomi $(dpkg-query -W -f='${Version}' golang-github-vmware-govmomi-dev))" >&2
start=$(date +%s)
(
  cd "$work/src/alike-vcsim"
  GO111MODULE=off GOPATH="$work:/usr/share/gocode" GOFLAGS="" CGO_ENABLED=0 \
    GOCACHE="$cache/go-build" GOTMPDIR="$work" \
    nice -n 10 go build -trimpath -ldflags="-s -w" -o "$work/vcsim" . >&2
)
mv "$work/vcsim" "$bin"
# binaries of other sources, unused for a week (other work trees may share this cache)
find "$cache" -maxdepth 1 -name 'vcsim-*' ! -name "vcsim-$hash" -type f -atime +7 -delete 2>/dev/null || true
echo "vcsim build: done in $(( $(date +%s) - start )) s" >&2
echo "$bin"
