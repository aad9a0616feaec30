#!/usr/bin/env bash
# Builds two OCI image archives from hack/build-image.sh's rootfs, without a
# registry: docker.io/library/ckpt-counter:latest (the counter workload) and
# docker.io/library/pause:local (a pause stand-in: sleep). Output in DIR.
set -euo pipefail
out=${1:?usage: build-oci-images.sh DIR}
here=$(cd "$(dirname "$0")" && pwd)
# The stamp names what the images hold; a new one rebuilds them.
stamp="$out/.with-pauseprobe"
[ -f "$out/counter-oci.tar" ] && [ -f "$out/pause-oci.tar" ] && [ -f "$stamp" ] && exit 0
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
bash "$here/build-image.sh" "$work/rootfs"
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
mv "$work/counter-oci.tar" "$work/pause-oci.tar" "$out/"
touch "$stamp"
