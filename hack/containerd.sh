#!/usr/bin/env bash
# A private containerd for tests and the demo: its own root, state and socket,
# the CRI plugin with runc (cgroupfs), our loopback-only CNI plugin, and the
# locally built images imported. No systemd is needed.
#   hack/containerd.sh start DIR   # prints nothing; socket at DIR/containerd.sock
#   hack/containerd.sh stop DIR    # stops containerd, its shims and containers, unmounts, removes DIR
# The node set-up step for restores through CRI: the runc runtime's BinaryName is
# ckpt-runc (a link to ckpt-shim), from $CKPT_RUNC or PATH, else plain runc; and
# containerd gets $CKPT_SHIM_RESTORE_DIR, the shim's --restore-dir, if set.
# Registries: DIR/certs.d/HOST/hosts.toml, read at each pull; $CKPT_REGISTRY
# (HOST:PORT) is written there as a plain-HTTP registry (a local one).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cmd=${1:?usage: containerd.sh start|stop DIR}
dir=${2:?usage: containerd.sh start|stop DIR}

start() {
  runc_bin=${CKPT_RUNC:-$(command -v ckpt-runc || echo /usr/sbin/runc)}
  mkdir -p "$dir/cni" "$dir/cni-bin"
  ln -sf /usr/lib/cni/loopback "$dir/cni-bin/loopback"
  install -m 0755 "$here/../tests/fixtures/cni/ckpt-loopback" "$dir/cni-bin/ckpt-loopback"
  cat > "$dir/cni/10-ckpt-loopback.conflist" <<JSON
{"cniVersion": "1.0.0", "name": "ckpt-loopback", "plugins": [{"type": "ckpt-loopback"}]}
JSON
  cat > "$dir/config.toml" <<TOML
version = 2
root = "$dir/root"
state = "$dir/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "$dir/containerd.sock"
[ttrpc]
  address = "$dir/containerd.sock.ttrpc"
[debug]
  level = "info"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "docker.io/library/pause:local"
  # Without CAP_SYS_RESOURCE the sandbox's oom_score_adj of -998 cannot be set.
  restrict_oom_score_adj = true
  disable_apparmor = true
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        BinaryName = "$runc_bin"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "$dir/certs.d"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$dir/cni-bin"
    conf_dir = "$dir/cni"
    max_conf_num = 1
TOML
  if [ -n "${CKPT_REGISTRY:-}" ]; then plain_http_registry "$CKPT_REGISTRY"; fi
  bash "$here/build-oci-images.sh" "${CKPT_SHIM_IMAGES:-/var/cache/ckpt-shim/images}"
  # The runc shim finds criu and runc through PATH.
  PATH="/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin" setsid containerd --config "$dir/config.toml" >"$dir/containerd.log" 2>&1 < /dev/null &
  echo $! > "$dir/containerd.pid"
  for _ in $(seq 200); do
    ctr --address "$dir/containerd.sock" version >/dev/null 2>&1 && break
    sleep 0.05
  done
  ctr --address "$dir/containerd.sock" version >/dev/null || { tail -20 "$dir/containerd.log" >&2; exit 1; }
  for img in pause counter; do
    ctr --address "$dir/containerd.sock" -n k8s.io images import "${CKPT_SHIM_IMAGES:-/var/cache/ckpt-shim/images}/$img-oci.tar" >/dev/null
  done
}

# A registry reached over plain HTTP, for pulls through CRI.
plain_http_registry() {
  mkdir -p "$dir/certs.d/$1"
  cat > "$dir/certs.d/$1/hosts.toml" <<TOML
server = "http://$1"
[host."http://$1"]
  capabilities = ["pull", "resolve"]
TOML
}

stop() {
  [ -d "$dir" ] || exit 0
  # Containers whose bundles live under DIR, then their shims, then containerd.
  for s in /run/containerd/runc/k8s.io/*/state.json; do
    [ -f "$s" ] || continue
    grep -q "bundle=$dir/" "$s" || continue
    id=$(basename "$(dirname "$s")")
    runc --root /run/containerd/runc/k8s.io kill "$id" KILL 2>/dev/null || true
    runc --root /run/containerd/runc/k8s.io delete -f "$id" 2>/dev/null || true
  done
  pkill -f -- "-address $dir/containerd.sock" 2>/dev/null || true
  [ -f "$dir/containerd.pid" ] && kill "$(cat "$dir/containerd.pid")" 2>/dev/null || true
  sleep 0.3
  awk -v d="$dir/" 'index($5, d) == 1 {print $5}' /proc/self/mountinfo | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
  rm -rf "$dir"
}

"$cmd"
