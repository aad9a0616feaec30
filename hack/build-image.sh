#!/usr/bin/env bash
# Builds the test/demo image rootfs into DIR: busybox-static, /etc/passwd, and the
# static counter workload (tests/fixtures/workloads/counter.c) and the pause probe
# (tests/fixtures/workloads/pauseprobe.c). No registry needed.
set -euo pipefail
dir=${1:?usage: build-image.sh DIR}
here=$(cd "$(dirname "$0")" && pwd)
# The stamp names what the counter can do; a new one rebuilds.
[ -x "$dir/bin/counter" ] && [ -x "$dir/bin/pauseprobe" ] && [ -f "$dir/.counter-verifies" ] && exit 0
rm -rf "$dir"
tmp="$dir.tmp.$$"
rm -rf "$tmp"
mkdir -p "$tmp"/{bin,proc,sys,dev,tmp,etc,root,data}
chmod 1777 "$tmp/tmp"
cp /bin/busybox "$tmp/bin/busybox"
chroot "$tmp" /bin/busybox --install -s /bin
echo 'root:x:0:0:root:/root:/bin/sh' > "$tmp/etc/passwd"
echo 'root:x:0:' > "$tmp/etc/group"
cc -O2 -static -o "$tmp/bin/counter" "$here/../tests/fixtures/workloads/counter.c"
cc -O2 -static -o "$tmp/bin/pauseprobe" "$here/../tests/fixtures/workloads/pauseprobe.c"
cc -O2 -static -pthread -o "$tmp/bin/trees" "$here/../tests/fixtures/workloads/trees.c"
touch "$tmp/.counter-verifies"
rm -rf "$dir"
mv -T "$tmp" "$dir" 2>/dev/null || rm -rf "$tmp"
