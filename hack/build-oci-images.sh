#!/usr/bin/env bash
# Builds OCI image archives from hack/build-image.sh's rootfs, without a
# registry: docker.io/library/ckpt-counter:latest (the counter workload),
# docker.io/library/pause:local (a pause stand-in: sleep), and
# registry.k8s.io/e2e-test-images/busybox:1.29-2 (busybox as critest expects it:
# `sh` by default, the usual PATH, a `nobody` user, applets as hard links, and
# ipcs). Output in DIR.
set -euo pipefail
out=${1:?usage: build-oci-images.sh DIR}
here=$(cd "$(dirname "$0")" && pwd)
# The stamp names what the images hold; a new one rebuilds them.
stamp="$out/.with-pauseprobe"
busybox="$out/busybox-oci.tar"
busybox_stamp="$out/.busybox-with-ipcs"
[ -f "$out/counter-oci.tar" ] && [ -f "$out/pause-oci.tar" ] && [ -f "$stamp" ] && [ -f "$busybox_stamp" ] && exit 0
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
bash "$here/build-image.sh" "$work/rootfs"

build_busybox() {
  umoci new --image "$work/oci:busybox"
  umoci unpack --image "$work/oci:busybox" "$work/bb" >/dev/null
  cp -a "$work/rootfs/." "$work/bb/rootfs/"
  rm -f "$work/bb/rootfs/bin/counter" "$work/bb/rootfs/bin/pauseprobe"
  # Applets as hard links, as in the real image: critest masks /bin/ls, and a
  # mask on a symlink lands on busybox itself, taking sh with it.
  find "$work/bb/rootfs/bin" -type l -lname '*busybox' -exec ln -f "$work/bb/rootfs/bin/busybox" {} \;
  # critest's HostIpc specs run ipcs, which busybox-static lacks: util-linux's,
  # with the libraries it loads.
  mkdir -p "$work/bb/rootfs/usr/bin"
  cp /usr/bin/ipcs "$work/bb/rootfs/usr/bin/ipcs"
  for lib in $(ldd /usr/bin/ipcs | grep -o '/[^ ]*'); do cp -L --parents "$lib" "$work/bb/rootfs/"; done
  printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/home:/bin/false\n' > "$work/bb/rootfs/etc/passwd"
  printf 'root:x:0:\nnobody:x:65534:\n' > "$work/bb/rootfs/etc/group"
  umoci repack --image "$work/oci:busybox" "$work/bb" >/dev/null
  umoci config --image "$work/oci:busybox" --config.cmd sh --config.workingdir / --architecture amd64 --os linux \
    --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
  skopeo copy -q "oci:$work/oci:busybox" "oci-archive:$work/busybox-oci.tar:registry.k8s.io/e2e-test-images/busybox:1.29-2"
  mv "$work/busybox-oci.tar" "$busybox"
  touch "$busybox_stamp"
}

if [ -f "$out/counter-oci.tar" ] && [ -f "$out/pause-oci.tar" ] && [ -f "$stamp" ]; then
  umoci init --layout "$work/oci"
  build_busybox
  exit 0
fi
umoci init --layout "$work/oci"
umoci new --image "$work/oci:counter"
umoci unpack --image "$work/oci:counter" "$work/bundle" >/dev/null
cp -a "$work/rootfs/." "$work/bundle/rootfs/"
umoci repack --image "$work/oci:counter" "$work/bundle" >/dev/null
umoci config --image "$work/oci:counter" --config.cmd /bin/counter --config.cmd /tmp/count \
  --config.workingdir / --config.env PATH=/bin --architecture amd64 --os linux
umoci config --image "$work/oci:counter" --tag pause --clear=config.cmd --config.cmd /bin/sleep --config.cmd 2147483647
skopeo copy -q "oci:$work/oci:counter" "oci-archive:$work/counter-oci.tar:docker.io/library/ckpt-counter:latest"
skopeo copy -q "oci:$work/oci:pause" "oci-archive:$work/pause-oci.tar:docker.io/library/pause:local"
build_busybox
mv "$work/counter-oci.tar" "$work/pause-oci.tar" "$out/"
touch "$stamp"
