#!/usr/bin/env bash
# Builds OCI image archives of real applications for the checkpoint tests
# (tests/apps.rs) and the demo, from the Debian packages hack/setup.sh
# installs on this machine, without a registry or a download: each rootfs is
# busybox-static, the program and its files copied from the host's packages,
# and the shared libraries `ldd` names (the host's own, so no other libc6 can
# come in). Output in DIR (default $CKPT_SHIM_IMAGES, else
# /var/cache/ckpt-shim/images):
#   redis-oci.tar     docker.io/library/ckpt-redis:latest     redis-server 7.0 (redis-tools) on 127.0.0.1:6379, in memory (hack/apps/redis.conf)
#   postgres-oci.tar  docker.io/library/ckpt-postgres:latest  PostgreSQL 15 on 127.0.0.1:5432 (trust, user postgres, data checksums), with psql
#   nginx-oci.tar     docker.io/library/ckpt-nginx:latest     nginx 1.22, a master and 2 workers on 127.0.0.1:8080 (hack/apps/nginx.conf)
#   jvm-oci.tar       docker.io/library/ckpt-jvm:latest       OpenJDK 17 JRE running hack/apps/Counters.java on 127.0.0.1:9000
#   pykv-oci.tar      docker.io/library/ckpt-pykv:latest      Python 3.11 running hack/apps/kv.py (asyncio) on 127.0.0.1:7379
# They are rebuilt when this script, a file of hack/apps they hold or a
# package's version changes (the stamp .apps-<key> names them all). Run as root.
set -euo pipefail
out=${1:-${CKPT_SHIM_IMAGES:-/var/cache/ckpt-shim/images}}
here=$(cd "$(dirname "$0")" && pwd)
apps=(redis postgres nginx jvm pykv)
pkgs=(busybox-static libc6 redis-tools postgresql-15 postgresql-client-15 nginx
  openjdk-17-jre-headless openjdk-17-jdk-headless python3.11-minimal libpython3.11-stdlib)

versions=$(dpkg-query -W -f='${Package} ${Version}\n' "${pkgs[@]}" 2>/dev/null) || {
  echo "build-app-images.sh: missing Debian packages (run hack/setup.sh): ${pkgs[*]}" >&2
  exit 1
}
inputs=(build-app-images.sh apps/redis.conf apps/postgresql.conf apps/as-postgres.c apps/nginx.conf apps/Counters.java apps/kv.py)
key=$({ printf '%s\n' "$versions"; for f in "${inputs[@]}"; do cat "$here/$f"; done; } | sha256sum | cut -c1-16)
stamp="$out/.apps-$key"
built() {
  [ -f "$stamp" ] || return 1
  for a in "${apps[@]}"; do [ -f "$out/$a-oci.tar" ] || return 1; done
}
built && exit 0
mkdir -p "$out"
# Tests build lazily, two at a time: one builds, the other waits for it.
exec 9>"$out/.apps.lock"
flock 9
built && exit 0
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
log() { printf '[build-app-images] %s\n' "$*" >&2; }

# A rootfs with busybox-static's applets, root and /tmp.
base() {
  local r=$1
  mkdir -p "$r"/{bin,proc,sys,dev,tmp,etc,root,run,data}
  chmod 1777 "$r/tmp"
  cp /bin/busybox "$r/bin/busybox"
  chroot "$r" /bin/busybox --install -s /bin
  printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' > "$r/etc/passwd"
  printf 'root:x:0:\nnogroup:x:65534:\n' > "$r/etc/group"
}

# The shared libraries an ELF file needs, copied to the same paths in rootfs
# $1. `not found` fails the build, but for $3 (a library the program's own
# loader finds, e.g. the JVM's libjvm.so from its RUNPATH).
libs() {
  local r=$1 f=$2 allow=${3:-} out lib
  head -c 4 "$f" 2>/dev/null | grep -q ELF || return 0
  out=$(ldd "$f" 2>&1) || return 0 # static, or not an executable
  if printf '%s\n' "$out" | grep "not found" | grep -qv "${allow:-^$}"; then
    echo "build-app-images.sh: $f: $(printf '%s\n' "$out" | grep 'not found' | head -1)" >&2
    exit 1
  fi
  for lib in $(printf '%s\n' "$out" | grep -o '/[^ ]*'); do
    [ -e "$r$lib" ] || cp -L --parents "$lib" "$r/"
  done
}

# cp -a --parents FILE DIR, from / : coreutils 9.1 reads the ACL of each
# parent it makes by the path relative to the working directory.
cpa() { (cd / && cp -a --parents "${1#/}" "$2/"); }

# Files (and what their symlinks point to) at the same paths, with their libraries.
add() {
  local r=$1 f t
  shift
  for f in "$@"; do
    [ -d "$f" ] && [ ! -L "$f" ] && { mkdir -p "$r$f"; continue; }
    [ -e "$r$f" ] || [ -L "$r$f" ] || cpa "$f" "$r"
    if [ -L "$f" ]; then
      t=$(readlink -f "$f")
      [ -e "$t" ] && add "$r" "$t"
    else
      libs "$r" "$f"
    fi
  done
}

# Packs rootfs $2 as image $1 (docker.io/library/ckpt-$1:latest) with the
# command and environment given as umoci config arguments after it.
pack() {
  local name=$1 rootfs=$2
  shift 2
  umoci new --image "$work/oci:$name"
  umoci unpack --image "$work/oci:$name" "$work/b-$name" >/dev/null
  cp -a "$rootfs/." "$work/b-$name/rootfs/"
  umoci repack --image "$work/oci:$name" "$work/b-$name" >/dev/null
  umoci config --image "$work/oci:$name" --architecture amd64 --os linux --config.workingdir / "$@"
  skopeo copy -q "oci:$work/oci:$name" "oci-archive:$work/$name-oci.tar:docker.io/library/ckpt-$name:latest"
  rm -rf "$work/b-$name" "$rootfs"
}

umoci init --layout "$work/oci"

log "redis"
r=$work/redis
base "$r"
# redis-tools ships the server as redis-check-rdb (redis-server's package only
# adds a link and a system service): the binary picks its role by its name.
mkdir -p "$r/usr/bin"
cp /usr/bin/redis-check-rdb "$r/usr/bin/redis-server"
libs "$r" /usr/bin/redis-check-rdb
mkdir -p "$r/etc/redis"
cp "$here/apps/redis.conf" "$r/etc/redis/redis.conf"
pack redis "$r" --config.env PATH=/usr/bin:/bin --config.cmd /usr/bin/redis-server --config.cmd /etc/redis/redis.conf

log "postgres"
r=$work/postgres
base "$r"
pg=/usr/lib/postgresql/15
add "$r" $pg/bin/postgres $pg/bin/psql
for so in $pg/lib/*.so; do
  case $so in */llvmjit*) continue ;; esac # jit = off: no LLVM
  add "$r" "$so"
done
for f in /usr/share/postgresql/15 /usr/share/zoneinfo/UTC /usr/share/zoneinfo/Etc/UTC; do cpa "$f" "$r"; done
mkdir -p "$r/usr/local/lib"
cc -O2 -shared -fPIC -o "$r/usr/local/lib/as-postgres.so" "$here/apps/as-postgres.c"
echo 'postgres:x:999:999:PostgreSQL:/var/lib/postgresql:/bin/sh' >> "$r/etc/passwd"
echo 'postgres:x:999:' >> "$r/etc/group"
# initdb with the same binaries, on the host as nobody (it refuses root),
# then owned by the image's postgres user.
initdb=$work/pgdata
chmod 0711 "$work"
install -d -o nobody "$initdb"
(cd / && runuser -u nobody -- $pg/bin/initdb -D "$initdb/data" --username=postgres --auth=trust \
  --encoding=UTF8 --locale=C --data-checksums --no-sync >"$work/initdb.log" 2>&1) || { cat "$work/initdb.log" >&2; exit 1; }
cat "$here/apps/postgresql.conf" >> "$initdb/data/postgresql.conf"
mkdir -p "$r/var/lib/postgresql"
cp -a "$initdb/data" "$r/var/lib/postgresql/data"
chown -R 999:999 "$r/var/lib/postgresql"
chmod 0700 "$r/var/lib/postgresql/data"
pack postgres "$r" --config.env PATH=$pg/bin:/usr/bin:/bin --config.env PGDATA=/var/lib/postgresql/data \
  --config.env LD_PRELOAD=/usr/local/lib/as-postgres.so \
  --config.cmd $pg/bin/postgres --config.cmd -D --config.cmd /var/lib/postgresql/data

log "nginx"
r=$work/nginx
base "$r"
add "$r" /usr/sbin/nginx /etc/nginx/mime.types
cp "$here/apps/nginx.conf" "$r/etc/nginx/nginx.conf"
mkdir -p "$r/var/lib/nginx" "$r/var/log/nginx" "$r/srv/www"
echo '<html><body>ckpt-nginx</body></html>' > "$r/srv/www/index.html"
pack nginx "$r" --config.env PATH=/usr/sbin:/bin \
  --config.cmd /usr/sbin/nginx --config.cmd -e --config.cmd stderr --config.cmd -c --config.cmd /etc/nginx/nginx.conf

log "jvm"
r=$work/jvm
base "$r"
jre=/usr/lib/jvm/java-17-openjdk-amd64
while read -r f; do
  case $f in /usr/share/doc/* | /usr/share/man/* | /usr/share/lintian/* | /usr/lib/debug/* | /usr/share/bug/*) continue ;; esac
  [ -d "$f" ] && [ ! -L "$f" ] && continue
  [ -e "$f" ] || [ -L "$f" ] || continue
  [ -e "$r$f" ] || [ -L "$r$f" ] || cpa "$f" "$r"
  [ -L "$f" ] || libs "$r" "$f" 'libjvm.so => not found'
done < <(dpkg -L openjdk-17-jre-headless)
mkdir -p "$r/app"
javac -nowarn --release 17 -d "$r/app" "$here/apps/Counters.java"
pack jvm "$r" --config.env PATH=$jre/bin:/bin \
  --config.cmd $jre/bin/java --config.cmd -XX:-UsePerfData --config.cmd -XX:+UseSerialGC --config.cmd -Xms16m \
  --config.cmd -Xmx64m --config.cmd -XX:TieredStopAtLevel=1 --config.cmd -Xss512k --config.cmd -cp --config.cmd /app \
  --config.cmd Counters --config.cmd 4 --config.cmd 9000

log "pykv"
r=$work/pykv
base "$r"
add "$r" /usr/bin/python3.11
py=/usr/lib/python3.11
tar -C / -cf - --exclude="${py#/}/test" --exclude="${py#/}/idlelib" --exclude="${py#/}/tkinter" \
  --exclude="${py#/}/turtledemo" --exclude="${py#/}/ensurepip" --exclude="${py#/}/lib2to3" \
  --exclude="${py#/}/pydoc_data" --exclude="${py#/}/distutils" --exclude="${py#/}/config-3.11-*" \
  --exclude="${py#/}/site-packages" --exclude="${py#/}/dist-packages" "${py#/}" | tar -C "$r" -xf -
for so in "$r$py"/lib-dynload/*.so; do libs "$r" "${so#"$r"}"; done
mkdir -p "$r/app"
cp "$here/apps/kv.py" "$r/app/kv.py"
pack pykv "$r" --config.env PATH=/usr/bin:/bin \
  --config.cmd /usr/bin/python3.11 --config.cmd -I --config.cmd -S --config.cmd /app/kv.py --config.cmd 7379

for a in "${apps[@]}"; do mv "$work/$a-oci.tar" "$out/"; done
rm -f "$out"/.apps-*
touch "$stamp"
log "built ${apps[*]} in $out"
