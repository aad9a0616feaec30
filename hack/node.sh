# Sourced by the demos: one node, a private containerd whose runc runtime is
# ckpt-runc (the node set-up step for restores), with ckpt-shim in front of it.
#   node_start TAG BUILD [serve args…]   # BUILD: debug or release (already built)
# sets $work (a fresh dir under /var/tmp), $sock (the shim's CRI socket) and
# $shim_pid, and removes everything on exit, the pods' cgroups under /TAG too.
#   find_crictl WHO [PATH]   # prints cri-tools' crictl: PATH if given, else the
#                            # one on PATH, else ../shared/bin/crictl; else says
#                            # how to get it and fails
find_crictl() {
  local who=$1 found=${2:-$(command -v crictl || true)}
  if [ -z "$found" ] && [ -x ../shared/bin/crictl ]; then found="$(cd .. && pwd)/shared/bin/crictl"; fi
  if [ -z "$found" ]; then
    echo "$who: crictl is missing: neither on PATH nor in ../shared/bin beside the repository." >&2
    echo "  Install cri-tools' crictl (1.34 is what this was tested with) from https://github.com/kubernetes-sigs/cri-tools/releases," >&2
    echo "  e.g. into /usr/local/bin, or put it in $(cd .. && pwd)/shared/bin." >&2
    return 1
  fi
  echo "$found"
}

node_start() {
  local tag=$1 build=$2
  shift 2
  work=$(mktemp -d "/var/tmp/$tag.XXXXXX")
  node_tag=$tag
  shim_pid=
  trap node_cleanup EXIT
  mkdir -p "$work/bin"
  ln -s "$PWD/target/$build/ckpt-shim" "$work/bin/ckpt-runc"
  export CKPT_RUNC="$work/bin/ckpt-runc" CKPT_SHIM_RESTORE_DIR="$work/restore"
  bash hack/containerd.sh start "$work/containerd"
  sock="$work/shim/ckpt-shim.sock"
  "target/$build/ckpt-shim" serve --listen "$sock" --restore-dir "$CKPT_SHIM_RESTORE_DIR" \
    --upstream "unix://$work/containerd/containerd.sock" "$@" 2> "$work/shim.log" &
  shim_pid=$!
  until [ -S "$sock" ]; do sleep 0.05; done
}

node_cleanup() {
  [ -n "$shim_pid" ] && kill "$shim_pid" 2>/dev/null || true
  bash hack/containerd.sh stop "$work/containerd" || true
  find /sys/fs/cgroup/*/"$node_tag" -depth -type d -exec rmdir {} \; 2>/dev/null || true
  rm -rf "$work"
}
