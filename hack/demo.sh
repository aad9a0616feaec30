#!/usr/bin/env bash
# The main job, end to end on a fresh machine: set up, build, start a real runc
# container (overlay rootfs, like containerd's), checkpoint it into one archive
# while it keeps running, inspect the archive, then restore it into a fresh rootfs
# and watch the count continue from where it was.
set -euo pipefail
cd "$(dirname "$0")/.."
bash hack/setup.sh
export PATH="/usr/local/sbin:$PATH"
cargo build --release --locked -q
shim=$PWD/target/release/ckpt-shim

work=$(mktemp -d /var/tmp/ckpt-shim-demo.XXXXXX)
id=demo-$$
restored_pid=
cleanup() {
  [ -n "$restored_pid" ] && kill -9 "$restored_pid" 2>/dev/null || true
  runc --root "$work/state" kill "$id" KILL 2>/dev/null || true
  sleep 0.2
  runc --root "$work/state" delete -f "$id" 2>/dev/null || true
  umount "$work/one/rootfs" "$work/two/rootfs" 2>/dev/null || true
  for h in /sys/fs/cgroup/*/ckpt-shim-demo/"$id"; do rmdir "$h" "$(dirname "$h")" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

bash hack/build-image.sh "$work/image"
overlay() { mkdir -p "$1"/{upper,work,rootfs}; mount -t overlay overlay -o "lowerdir=$work/image,upperdir=$1/upper,workdir=$1/work" "$1/rootfs"; }
count() { cat "$1/rootfs/tmp/count" 2>/dev/null || echo -; }

overlay "$work/one"
(cd "$work/one" && runc spec && python3 - "$id" <<'PY'
import json, sys
c = json.load(open('config.json'))
c['process'].update(terminal=False, args=['/bin/counter', '/tmp/count', '64', '200'])
c['root']['readonly'] = False
c['linux']['cgroupsPath'] = '/ckpt-shim-demo/' + sys.argv[1]
json.dump(c, open('config.json', 'w'))
PY
)
# stdio must be a pipe: CRIU cannot dump an fd to a host file outside the container.
(cd "$work/one" && setsid sh -c "runc --root '$work/state' run -d $id </dev/null 2>&1 | cat > '$work/one.log'" &)
until [ "$(count "$work/one")" != - ] && [ "$(count "$work/one")" -ge 5 ]; do sleep 0.2; done
echo "== container $id is counting (64 MiB touched): $(count "$work/one")"
echo "== inside it: write /root/note, delete /bin/vi"
runc --root "$work/state" exec "$id" sh -c 'echo written-before-checkpoint > /root/note; rm /bin/vi'

mkdir -m 0700 "$work/out"
echo "== ckpt-shim checkpoint --runtime-root $work/state $id --output $work/out/checkpoint.tar"
"$shim" checkpoint --runtime-root "$work/state" "$id" --output "$work/out/checkpoint.tar"
ls -l "$work/out/checkpoint.tar"
echo "== the container kept running: $(count "$work/one"), then $(sleep 0.5; count "$work/one")"
echo "== ckpt-shim inspect"
"$shim" inspect "$work/out/checkpoint.tar"

at_kill=$(count "$work/one")
runc --root "$work/state" kill "$id" KILL; sleep 0.3; runc --root "$work/state" delete -f "$id"
echo "== original stopped at $at_kill; restoring into a fresh rootfs of the same image"
overlay "$work/two"
(setsid sh -c "'$shim' restore '$work/out/checkpoint.tar' --bundle '$work/two' --id $id-restored </dev/null > '$work/two.log' 2>&1" &)
until grep -q "restored" "$work/two.log" 2>/dev/null; do
  sleep 0.1
  if grep -q "ckpt-shim:" "$work/two.log" 2>/dev/null; then cat "$work/two.log"; exit 1; fi
done
restored_pid=$(sed -n 's/.*as pid \([0-9]*\).*/\1/p' "$work/two.log" | head -n1)
echo "== $(grep restored "$work/two.log")"
first=$(count "$work/two"); sleep 1; then=$(count "$work/two")
echo "== restored counter: $first, a second later $then (it resumed from its memory, not from 1)"
echo "== /root/note in the restored rootfs: $(cat "$work/two/rootfs/root/note"); /bin/vi present: $([ -e "$work/two/rootfs/bin/vi" ] && echo yes || echo no)"
[ "$then" -gt "$first" ] && [ "$first" -gt 5 ]
echo "== demo OK"
