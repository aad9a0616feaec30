#!/usr/bin/env bash
# hack/demo.sh's application step, as a user runs it with crictl: redis-server
# (docker.io/library/ckpt-redis, hack/build-app-images.sh) in a pod, keys written,
# and a redis-cli INCR-ing on one connection while `crictl checkpoint --export`
# runs (the shim dumps established connections: `tcp_established`, on by
# default); then `crictl create` with the archive as the image in a new pod: the
# same server (INFO's run_id) with its keys, and a client connecting there anew.
#   hack/apps/redis-demo.sh CRICTL SHIM_SOCKET CONTAINERD_SOCKET WORKDIR CGROUP_PARENT
# (a containerd whose runc runtime is ckpt-runc, with the shim in front: hack/node.sh)
set -euo pipefail
crictl=$1 sock=$2 containerd_sock=$3 work=$4 cgroup=$5
mkdir -p "$work"
cri() { "$crictl" --runtime-endpoint "unix://$sock" --timeout 2m "$@" 2> >(grep -v 'crictl.yaml' >&2); }
ctr --address "$containerd_sock" -n k8s.io images import "${CKPT_SHIM_IMAGES:-/var/cache/ckpt-shim/images}/redis-oci.tar" >/dev/null

json() { # POD IMAGE: a pod in its own cgroup and network namespace, and redis in it
  mkdir -p "$work/logs/$1"
  cat > "$work/$1.json" <<JSON
{"metadata": {"name": "$1", "uid": "uid-$1", "namespace": "default"}, "hostname": "$1", "log_directory": "$work/logs/$1",
 "linux": {"cgroup_parent": "$cgroup/$1", "security_context": {"namespace_options": {"pid": 1}}}}
JSON
  cat > "$work/$1-redis.json" <<JSON
{"metadata": {"name": "redis"}, "image": {"image": "$2"}, "log_path": "redis.log",
 "linux": {"security_context": {"namespace_options": {"pid": 1}}}}
JSON
}
run() { # POD IMAGE: the pod's id and the container's
  json "$1" "$2"
  local pod ctr
  pod=$(cri runp "$work/$1.json")
  ctr=$(cri create "$pod" "$work/$1-redis.json" "$work/$1.json")
  cri start "$ctr" >/dev/null
  echo "$pod $ctr"
}
netns() { # POD: its network namespace, where its loopback is
  cri inspectp -o go-template --template \
    '{{range .info.runtimeSpec.linux.namespaces}}{{if eq .type "network"}}{{.path}}{{end}}{{end}}' "$1"
}
rcli() { local net=$1; shift; nsenter --net="$net" redis-cli -h 127.0.0.1 "$@"; }

read -r pod ctr < <(run redis docker.io/library/ckpt-redis:latest)
net=$(netns "$pod")
until [ "$(rcli "$net" PING 2>/dev/null)" = PONG ]; do sleep 0.1; done
for i in $(seq 1000); do echo "SET key:$i value-$i"; done | rcli "$net" --pipe | tail -1
run_id=$(rcli "$net" INFO server | tr -d '\r' | sed -n 's/^run_id://p')
echo "redis in pod redis (container ${ctr:0:12}): run_id $run_id, $(rcli "$net" DBSIZE) keys"
nsenter --net="$net" redis-cli -h 127.0.0.1 -r -1 -i 0.01 INCR ticks >/dev/null &
client=$!
sleep 1
echo "a client INCRs ticks every 10 ms on one connection: $(rcli "$net" CLIENT LIST | grep -o 'addr=[^ ]* .*cmd=incr' | cut -d' ' -f1); ticks $(rcli "$net" GET ticks)"
echo "\$ crictl checkpoint --export=$work/redis.tar ${ctr:0:12}"
cri checkpoint --export="$work/redis.tar" "$ctr" >/dev/null
echo "checkpointed ($(du -h "$work/redis.tar" | cut -f1)); ticks just after: $(rcli "$net" GET ticks)"
kill "$client"
cri stopp "$pod" >/dev/null && cri rmp "$pod" >/dev/null
echo "\$ crictl create POD redis.json pod.json   # \"image\": {\"image\": \"$work/redis.tar\"}, in a new pod"
read -r pod2 ctr2 < <(run redis-restored "$work/redis.tar")
net2=$(netns "$pod2")
echo "restored (container ${ctr2:0:12}): run_id $(rcli "$net2" INFO server | tr -d '\r' | sed -n 's/^run_id://p'), $(rcli "$net2" DBSIZE) keys, key:500 = $(rcli "$net2" GET key:500), ticks $(rcli "$net2" GET ticks)"
echo "a client connecting to the new pod: INCR ticks -> $(rcli "$net2" INCR ticks)"
cri stopp "$pod2" >/dev/null && cri rmp "$pod2" >/dev/null
