#!/usr/bin/env bash
# A pod checkpoint's round trip as a user runs it: a private containerd (its runc
# runtime is ckpt-runc) with ckpt-shim in front, a pod of two counters made with
# crictl, CheckpointPod and RestorePod with cri-ctl (hack/cri-client; crictl 1.34 has no pod
# commands), then crictl start of each restored container. Needs hack/setup.sh run.
#   hack/pod-roundtrip.sh [CRICTL [SOCKET WORKDIR]]   # CRICTL: default crictl on PATH, else ../shared/bin/crictl;
#   with SOCKET, against a shim that runs already (hack/demo.sh), its files in WORKDIR
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="/usr/local/sbin:$PATH"
source hack/node.sh
crictl=$(find_crictl pod-roundtrip.sh "${1:-}")
build=${BUILD:-debug}
if [ -n "${2:-}" ]; then # a node that runs already (hack/demo.sh)
  sock=$2 work=$3 node_tag=ckpt-shim-demo
  mkdir -p "$work"
else
  flag=$([ "$build" = release ] && echo --release || true)
  cargo build --locked -q $flag -p ckpt-shim -p cri-client --bins
  node_start ckpt-shim-pods "$build"
  shim_log=$work/shim.log
fi
mkdir -p "$work/logs/src" "$work/logs/dst" "$work/out"
# (crictl warns of a missing /etc/crictl.yaml on each call: not shown.)
cri() { "$crictl" --runtime-endpoint "unix://$sock" --timeout 60s "$@" 2> >(grep -v 'crictl.yaml' >&2); }
ctl() { "target/$build/cri-ctl" "$sock" "$@"; }

pod_json() { # NAME: a pod in its own cgroup, with its own network and UTS namespace
  cat > "$work/$1.json" <<JSON
{"metadata": {"name": "$1", "uid": "uid-$1", "namespace": "default"}, "hostname": "$1",
 "log_directory": "$work/logs/$1", "labels": {"app": "counter"},
 "linux": {"cgroup_parent": "/$node_tag/$1", "security_context": {"namespace_options": {"pid": 1}}}}
JSON
}
ctr_json() { # NAME: the counter, counting every 100 ms into /tmp/count
  cat > "$work/$1.json" <<JSON
{"metadata": {"name": "$1"}, "image": {"image": "docker.io/library/ckpt-counter:latest"},
 "command": ["/bin/counter"], "args": ["/tmp/count", "8", "100"], "log_path": "$1.log",
 "linux": {"security_context": {"namespace_options": {"pid": 1}}}}
JSON
}
pod_json src; pod_json dst; ctr_json web; ctr_json sidecar
echo "== a pod of two counters"
pod=$(cri runp "$work/src.json")
web=$(cri create "$pod" "$work/web.json" "$work/src.json"); cri start "$web" >/dev/null
side=$(cri create "$pod" "$work/sidecar.json" "$work/src.json"); cri start "$side" >/dev/null
sleep 1
echo "== just before the cut: web at $(cri exec "$web" cat /tmp/count), sidecar at $(cri exec "$side" cat /tmp/count)"
echo "== checkpointp: one cut of both, into $work/out"
(set -x; ctl checkpointp "$pod" --export "$work/out")
ls -l "$work/out/pod"
cat "$work/out/pod/manifest.json"
echo "== restorep into a new pod: its containers are CREATED"
(set -x; ctl restorep "$work/out" --config "$work/dst.json" --container-config "$work/web.json" --container-config "$work/sidecar.json") | tee "$work/restored"
new=$(head -1 "$work/restored")
cri ps -a --pod "$new"
echo "== start each: it goes on counting from its checkpointed value"
tail -n +2 "$work/restored" | while read -r name id; do cri start "$id" >/dev/null; done
sleep 1
for name in web sidecar; do
  echo "$name's first line in the new pod: $(grep -m1 -o 'counter [0-9]*' "$work/logs/dst/$name.log")"
done
cri pods
[ -z "${shim_log:-}" ] || grep -E "pod checkpointed|pod restored" "$shim_log"
