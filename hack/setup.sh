#!/usr/bin/env bash
# Installs everything ckpt-shim needs to build and test on a fresh Debian 12 machine.
# Idempotent: every step checks whether it is already done. Run as root.
#   hack/setup.sh                      the build and test machine
#   hack/setup.sh --node [CONFIG]      also builds ckpt-shim and installs it on this
#                                      node, with containerd's runc runtime set to
#                                      ckpt-runc in CONFIG (/etc/containerd/config.toml)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=hack/apt-source.sh
source "$here/apt-source.sh"
node=
if [ "${1:-}" = --node ]; then node=${2:-/etc/containerd/config.toml}; fi

CRIU_VERSION=4.2.1
CRIU_TARBALL=criu_${CRIU_VERSION}.orig.tar.xz
CRIU_SHA256=29ec0ee09e296479fe7048c80980e8ef1d0684d0b0204c2b101dfea19f6725b9
CACHE=${CKPT_SHIM_CACHE:-/var/cache/ckpt-shim}
installed=()

log() { printf '[setup] %s\n' "$*" >&2; }
[ "$(id -u)" = 0 ] || { echo "hack/setup.sh must run as root" >&2; exit 1; }
export DEBIAN_FRONTEND=noninteractive

PKGS=(
  # build and protocol compilers
  build-essential pkg-config protobuf-compiler libprotobuf-dev
  # the container stack the tests drive
  runc containerd containernetworking-plugins busybox-static umoci skopeo iproute2 xz-utils procps util-linux
  # CRIU build dependencies
  libprotobuf-c-dev protobuf-c-compiler libnl-3-dev libnl-route-3-dev libcap-dev libaio-dev
  libnet1-dev libgnutls28-dev libbsd-dev uuid-dev python3-protobuf iptables
  # a restore installs the new spec's seccomp filter, compiled by libseccomp (src/restore/policy)
  libseccomp-dev
  # the reflink test (XFS on a loop device)
  xfsprogs
  # the benchmarks' peer (podman), which tests/bench_smoke.rs runs in CI
  podman conmon golang-github-containers-common uidmap
  # checkpoint images: a registry the tests start on 127.0.0.1, and buildah,
  # which builds them the way the Kubernetes docs do
  docker-registry buildah
  # encrypted checkpoints: the reference age tool, which decrypts every part
  age
  # CRI clients unlike ours, for the tests: grpc-go as the kubelet uses it, and
  # Python for gRPC C-core (grpcio, from PyPI below)
  golang-go golang-google-grpc-dev golang-google-protobuf-dev python3-venv
  # real applications checkpointed under load (tests/apps.rs, hack/build-app-images.sh
  # copies them into images from here): redis-tools holds redis-server's binary and
  # redis-cli without a system service; PostgreSQL 15 with psql; nginx; a JRE, and the
  # JDK's javac for the service it runs; Python; curl as nginx's client
  redis-tools postgresql-15 postgresql-client-15 nginx openjdk-17-jdk-headless python3 curl
)

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  installed+=("${missing[@]}")
fi

# Debian 12's criu 3.17 fails on this kernel (vdso bounds); never let it be the criu in PATH.
if dpkg-query -W -f='${Status}' criu 2>/dev/null | grep -q "install ok installed"; then
  log "removing Debian 12's criu 3.17"
  apt-get remove -y -qq criu >/dev/null
fi

# CRIU probes the kernel for ~25 ms at every call unless it can keep what it found
# in RUNDIR/criu.kdat, which it does only on tmpfs. A node's /run is tmpfs; this
# VM's is ext4, so CRIU here keeps it on a root-only tmpfs of its own. (On a
# non-tmpfs /run, CRIU 4.2.1 also leaves criu.kdat.tmp behind, which stops every
# later save: it goes.)
KDAT_DIR=/run
if [ "$(findmnt -no FSTYPE -T /run)" != tmpfs ]; then
  KDAT_DIR=/run/criu-kdat
  mkdir -p -m 0700 "$KDAT_DIR"
  mountpoint -q "$KDAT_DIR" || mount -t tmpfs -o size=1m,mode=0700,nosuid,nodev,noexec criu-kdat "$KDAT_DIR"
  rm -f /run/criu.kdat.tmp
fi
criu_ok() {
  [ -x /usr/local/sbin/criu ] && /usr/local/sbin/criu --version 2>/dev/null | grep -q "Version: ${CRIU_VERSION}" &&
    grep -qa "$KDAT_DIR/criu.kdat" /usr/local/sbin/criu
}
if ! criu_ok; then
  mkdir -p "$CACHE" && chmod 0700 "$CACHE"
  if [ ! -f "$CACHE/$CRIU_TARBALL" ] || ! echo "$CRIU_SHA256  $CACHE/$CRIU_TARBALL" | sha256sum -c --quiet; then
    log "fetching $CRIU_TARBALL from Debian forky's source archive"
    # A deb-src entry only: it can never upgrade a binary package (libc6 stays bookworm's).
    # From the archive apt already uses here (a mirror, say), found in its own configuration.
    archive=$(debian_archive_uri) || exit 1
    echo "deb-src $archive forky main" > /etc/apt/sources.list.d/ckpt-shim-criu-src.list
    apt-get update -qq -o Dir::Etc::sourcelist=/etc/apt/sources.list.d/ckpt-shim-criu-src.list \
      -o Dir::Etc::sourceparts=- -o APT::Get::List-Cleanup=0
    # The .dsc and debian.tar may 404; the orig tarball is what we need, so tolerate failure and check it.
    (cd "$CACHE" && apt-get source --download-only -qq "criu/forky" >/dev/null 2>&1 || true)
    [ -f "$CACHE/$CRIU_TARBALL" ] || { echo "could not download $CRIU_TARBALL" >&2; exit 1; }
    echo "$CRIU_SHA256  $CACHE/$CRIU_TARBALL" | sha256sum -c --quiet || { echo "bad sha256 for $CRIU_TARBALL" >&2; exit 1; }
  fi
  log "building CRIU $CRIU_VERSION"
  build=$(mktemp -d)
  tar -xf "$CACHE/$CRIU_TARBALL" -C "$build"
  src=$(find "$build" -maxdepth 1 -mindepth 1 -type d | head -n1)
  make -C "$src" -j"$(nproc)" RUNDIR="$KDAT_DIR" criu >"$build/build.log" 2>&1 || { tail -n 40 "$build/build.log" >&2; exit 1; }
  install -D -m 0755 "$src/criu/criu" /usr/local/sbin/criu
  rm -rf "$build"
  installed+=("criu-$CRIU_VERSION")
fi
hash -r
[ "$(command -v criu)" = /usr/local/sbin/criu ] || { echo "criu in PATH is $(command -v criu), expected /usr/local/sbin/criu" >&2; exit 1; }

# Rust toolchain: the machine ships one; a fresh generic machine gets it from Debian if missing.
command -v cargo >/dev/null || { echo "cargo not found: install the Rust toolchain" >&2; exit 1; }

# gRPC C-core ≥ 1.57 percent-encodes the socket path as :authority; Debian's
# python3-grpcio is older, so the tests use a pinned grpcio from PyPI.
# The relay's malformed-input tests write adversarial frames with Python's h2.
GRPCIO=1.85.1
H2=4.4.1
venv="$CACHE/venv"
if ! "$venv/bin/python3" -c "import grpc, grpc_tools, h2; assert grpc.__version__ == '$GRPCIO' and h2.__version__ == '$H2'" 2>/dev/null; then
  log "installing grpcio $GRPCIO and h2 $H2 into $venv"
  mkdir -p "$CACHE" && chmod 0700 "$CACHE"
  [ -x "$venv/bin/pip" ] || /usr/bin/python3 -m venv "$venv"
  "$venv/bin/pip" install -q "grpcio==$GRPCIO" "grpcio-tools==$GRPCIO" "h2==$H2"
  installed+=("grpcio-$GRPCIO" "h2-$H2")
fi

# Images of those applications, for tests/apps.rs and the demo (rebuilt only when they change).
bash "$here/build-app-images.sh"

criu check >/dev/null 2>&1 || { criu check >&2; echo "criu check failed" >&2; exit 1; }
log "criu check passed ($(criu --version | head -n1))"
if [ ${#installed[@]} -gt 0 ]; then log "installed: ${installed[*]}"; else log "nothing to install"; fi

if [ -n "$node" ]; then
  (cd "$here/.." && cargo build --release --locked -q --bin ckpt-shim)
  bash "$here/deploy/install.sh" --binary "$here/../target/release/ckpt-shim" --containerd-config "$node"
fi
