#!/usr/bin/env bash
# The main job, end to end on a fresh machine: set up, start a private containerd
# (its runc runtime is ckpt-runc) and ckpt-shim in front of it, run a counter pod
# through the shim's CRI socket, checkpoint it with CheckpointContainer while it
# keeps running, inspect the archive, then restore it through CRI into a new pod
# and watch the count continue (hack/cri-client/src/bin/cri-demo.rs). Then what an operator sees:
# the CheckpointReady condition, the metrics, and a clean stop on SIGTERM.
# crictl (cri-tools 1.34): the one on PATH, else ../shared/bin/crictl beside the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
source hack/node.sh
crictl_bin=$(find_crictl demo.sh)
bash hack/setup.sh
export PATH="/usr/local/sbin:$PATH"
cargo build --release --locked -q -p ckpt-shim -p cri-client --bins

node_start ckpt-shim-demo release --metrics-listen 127.0.0.1:9464
echo "== containerd $(containerd --version | awk '{print $3}') on $work/containerd/containerd.sock (its CheckpointContainer: UNIMPLEMENTED)"
echo "== its runc runtime: $(grep BinaryName "$work/containerd/config.toml" | xargs)"
target/release/cri-demo "$sock" "$PWD/target/release/ckpt-shim" "$work"
echo "== the shim's log lines for the checkpoint and the restore:"
grep -E "checkpointed|restore|restored" "$work/shim.log"
crictl() { "$crictl_bin" --config /dev/null --runtime-endpoint "unix://$sock" "$@"; }
echo "== crictl inspect of the restored container: CRI-O's info.restored and info.checkpointedAt, beside containerd's info.pid:"
crictl inspect --latest -o go-template \
  --template '{{.status.metadata.name}} {{.status.state}} restored={{.info.restored}} checkpointedAt={{.info.checkpointedAt}} restoredFrom={{.info.restoredFrom}} pid={{.info.pid}}'
echo
echo "== crictl info -q: the runtime's conditions through the shim, CheckpointReady last:"
crictl info -q
echo "== its metrics (curl http://127.0.0.1:9464/metrics), in part:"
python3 -c 'import urllib.request as u; print(u.urlopen("http://127.0.0.1:9464/metrics").read().decode())' | grep -E '^ckpt_shim_(checkpoints_total|restores_total|checkpoint_pause_seconds_(sum|count)|checkpoint_written_bytes_total|checkpoint_held_bytes_total|checkpoint_frozen_written_bytes_total|hold_budget_bytes|forwarded_calls_total\{method="(Version|ListContainers)")'
echo "== a lazy restore of the same archive with crictl (annotation io.ckpt-shim.lazy-pages=true): it runs before its memory is in place"
archive="$work/checkpoints/checkpoint-demo_default-counter.tar"
cat > "$work/lazy-pod.json" <<JSON
{"metadata": {"name": "demo-lazy", "uid": "uid-demo-lazy", "namespace": "default"}, "hostname": "demo-lazy",
 "log_directory": "$work/logs-lazy", "linux": {"cgroup_parent": "/ckpt-shim-demo/lazy", "security_context": {"namespace_options": {"pid": 1}}}}
JSON
cat > "$work/lazy-ctr.json" <<JSON
{"metadata": {"name": "counter"}, "image": {"image": "$archive"}, "annotations": {"io.ckpt-shim.lazy-pages": "true"},
 "log_path": "counter.log", "linux": {"security_context": {"namespace_options": {"pid": 1}}}}
JSON
lazy_pod=$(crictl runp "$work/lazy-pod.json")
started=$(date +%s%N)
lazy=$(crictl create "$lazy_pod" "$work/lazy-ctr.json" "$work/lazy-pod.json")
crictl start "$lazy" >/dev/null
echo "crictl create + start: $(( ($(date +%s%N) - started) / 1000000 )) ms; its first line: $(sleep 0.5; grep -m1 -o 'counter [0-9]*' "$work/logs-lazy/counter.log")"
until grep -q . "$CKPT_SHIM_RESTORE_DIR/$lazy/work/lazy-serve.log" 2>/dev/null; do sleep 0.1; done
sleep 1
echo "its page source (lazy-serve.log), last line: $(tail -1 "$CKPT_SHIM_RESTORE_DIR/$lazy/work/lazy-serve.log")"
echo "== a whole pod: CheckpointPod and RestorePod (KEP-5823) with cri-ctl (hack/cri-client), started with crictl"
BUILD=release bash hack/pod-roundtrip.sh "$crictl_bin" "$sock" "$work/pods"
grep -E "pod checkpointed|pod restored" "$work/shim.log"
echo "== an application with a client connected: redis checkpointed with crictl while redis-cli INCRs on one connection, restored into a new pod serving its keys (hack/apps/redis-demo.sh)"
bash hack/apps/redis-demo.sh "$crictl_bin" "$sock" "$work/containerd/containerd.sock" "$work/apps" /ckpt-shim-demo
echo "== SIGTERM: the shim stops taking calls, waits for checkpoints in flight, exits"
kill -TERM "$shim_pid"
wait "$shim_pid" && echo "exit status 0"
shim_pid=
grep -E "stopping|stopped" "$work/shim.log"
