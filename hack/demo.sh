#!/usr/bin/env bash
# The main job, end to end on a fresh machine: set up, start a private containerd
# (its runc runtime is ckpt-runc) and ckpt-shim in front of it, run a counter pod
# through the shim's CRI socket, checkpoint it with CheckpointContainer while it
# keeps running, inspect the archive, then restore it through CRI into a new pod
# and watch the count continue (hack/cri-demo.rs). Then what an operator sees:
# the CheckpointReady condition, the metrics, and a clean stop on SIGTERM.
# crictl (cri-tools 1.34) is ../shared/bin/crictl beside the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
crictl_bin="$(cd .. && pwd)/shared/bin/crictl"
[ -x "$crictl_bin" ] || { echo "demo.sh: $crictl_bin is missing: cri-tools' crictl belongs in ../shared/bin beside the repository" >&2; exit 1; }
bash hack/setup.sh
export PATH="/usr/local/sbin:$PATH"
cargo build --release --locked -q --bin ckpt-shim --example cri-demo

work=$(mktemp -d /var/tmp/ckpt-shim-demo.XXXXXX)
shim_pid=
cleanup() {
  [ -n "$shim_pid" ] && kill "$shim_pid" 2>/dev/null || true
  bash hack/containerd.sh stop "$work/containerd" || true
  find /sys/fs/cgroup/*/ckpt-shim-demo -depth -type d -exec rmdir {} \; 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# The node set-up step for restores: containerd's runc runtime runs ckpt-runc.
mkdir -p "$work/bin"
ln -s "$PWD/target/release/ckpt-shim" "$work/bin/ckpt-runc"
export CKPT_RUNC="$work/bin/ckpt-runc" CKPT_SHIM_RESTORE_DIR="$work/restore"
bash hack/containerd.sh start "$work/containerd"
echo "== containerd $(containerd --version | awk '{print $3}') on $work/containerd/containerd.sock (its CheckpointContainer: UNIMPLEMENTED)"
echo "== its runc runtime: $(grep BinaryName "$work/containerd/config.toml" | xargs)"
target/release/ckpt-shim serve --listen "$work/shim/ckpt-shim.sock" --restore-dir "$CKPT_SHIM_RESTORE_DIR" \
  --upstream "unix://$work/containerd/containerd.sock" --metrics-listen 127.0.0.1:9464 2> "$work/shim.log" &
shim_pid=$!
until [ -S "$work/shim/ckpt-shim.sock" ]; do sleep 0.05; done
target/release/examples/cri-demo "$work/shim/ckpt-shim.sock" "$PWD/target/release/ckpt-shim" "$work"
echo "== the shim's log lines for the checkpoint and the restore:"
grep -E "checkpointed|restore|restored" "$work/shim.log"
crictl() { "$crictl_bin" --config /dev/null --runtime-endpoint "unix://$work/shim/ckpt-shim.sock" "$@"; }
echo "== crictl inspect of the restored container: CRI-O's info.restored and info.checkpointedAt, beside containerd's info.pid:"
crictl inspect --latest -o go-template \
  --template '{{.status.metadata.name}} {{.status.state}} restored={{.info.restored}} checkpointedAt={{.info.checkpointedAt}} restoredFrom={{.info.restoredFrom}} pid={{.info.pid}}'
echo
echo "== crictl info -q: the runtime's conditions through the shim, CheckpointReady last:"
crictl info -q
echo "== its metrics (curl http://127.0.0.1:9464/metrics), in part:"
python3 -c 'import urllib.request as u; print(u.urlopen("http://127.0.0.1:9464/metrics").read().decode())' | grep -E '^ckpt_shim_(checkpoints_total|restores_total|checkpoint_pause_seconds_(sum|count)|checkpoint_written_bytes_total|forwarded_calls_total\{method="(Version|ListContainers)")'
echo "== SIGTERM: the shim stops taking calls, waits for checkpoints in flight, exits"
kill -TERM "$shim_pid"
wait "$shim_pid" && echo "exit status 0"
shim_pid=
grep -E "stopping|stopped" "$work/shim.log"
