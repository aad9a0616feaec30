#!/usr/bin/env bash
# Installs a built ckpt-shim on a node, with the one set-up step restores need:
# containerd's runc runtime runs ckpt-runc (a link to ckpt-shim), which restores
# the containers ckpt-shim prepared and hands every other call to runc unchanged.
#   hack/deploy/install.sh [--binary target/release/ckpt-shim] [--prefix /usr/local]
#                          [--containerd-config /etc/containerd/config.toml]
# Restart containerd afterwards. Idempotent.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
binary="$here/../../target/release/ckpt-shim"
prefix=/usr/local
config=/etc/containerd/config.toml
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary=$2; shift 2 ;;
    --prefix) prefix=$2; shift 2 ;;
    --containerd-config) config=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
[ -x "$binary" ] || { echo "no ckpt-shim at $binary: cargo build --release first" >&2; exit 1; }
install -D -m 0755 "$binary" "$prefix/bin/ckpt-shim"
ln -sfn ckpt-shim "$prefix/bin/ckpt-runc"
install -d -m 0700 /var/lib/ckpt-shim
runc_line="BinaryName = \"$prefix/bin/ckpt-runc\""
section='[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]'
touch "$config"
if grep -qF "$section" "$config"; then
  # Replace the section's BinaryName, or add one right under its header.
  awk -v sec="$section" -v line="  $runc_line" '
    $0 == sec || index($0, sec) { print; insec = 1; if (!done) { print line; done = 1 } ; next }
    /^[[:space:]]*\[/ { insec = 0 }
    insec && $1 == "BinaryName" { next }
    { print }' "$config" > "$config.ckpt-shim.tmp"
  mv "$config.ckpt-shim.tmp" "$config"
else
  printf '\n%s\n  %s\n' "$section" "$runc_line" >> "$config"
fi
echo "installed $prefix/bin/ckpt-shim and $prefix/bin/ckpt-runc; $config: $runc_line (restart containerd)"
