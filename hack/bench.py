#!/usr/bin/env python3
"""Checkpoint benchmark: ckpt-shim against the peers, measured in the same run.

For containers touching N MiB of incompressible memory (hack/workloads/counter.c),
each round runs, in an order that rotates from round to round:
  A      ckpt-shim CheckpointContainer through its CRI socket, in front of containerd,
         with `durable = false` (no fdatasync)
  A-d    the same through a second ckpt-shim with the default `durable = true`
  A-cli  ckpt-shim checkpoint (standalone, on a runc container), archive fdatasync'd
  A-nf   the same without the fdatasync
  A-stg, A-stg-nf  the same two dumping into staging first (--no-stream)
  B      raw `criu dump --leave-running` of the same runc container into a fresh dir
  C      `runc checkpoint --leave-running` + `tar cf` (what containerd 2.x does)
  D      `podman container checkpoint --leave-running --export` (runc, no compression)
  A-hold ckpt-shim checkpoint (CLI) holding the pages in memory during the pause
  A-enc, A-enc-hold  the CLI, no fsync, encrypted to an age key (hack/bench's own,
         made with age-keygen), without and with the pages held
  A-slow, A-nf-slow, A-hold-slow  A, A-nf and A-hold with the archive (and the
         staging beside it) on a deliberately slow disk: hack/slowfs, a FUSE
         passthrough of the same file system whose writes are throttled to
         --slow-mb MB/s (reads are not)
Every run also measures the pause as the application sees it: a probe inside the
container (hack/workloads/pauseprobe.c) spins on CLOCK_MONOTONIC across the
checkpoint and reports its longest gap, beside the tool's own frozen figure.
Size 0 is a tiny container (the counter with no memory touched).
Every run writes to a fresh directory on the same file system; outputs are deleted
and synced between runs, outside the timing. Durable variants add the `sync` that
makes B, C and D's output durable; A-d and A-cli already include their one fdatasync.
Also: CRIU's frozen time, the shim's peak RSS, and on an XFS loop image how many bytes
the archive step writes itself (reflink and adoption copy no page data). Not a test: it asserts nothing.
"""
import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIM = os.path.join(ROOT, "target/release/ckpt-shim")
CRICTL = os.path.join(ROOT, "target/release/examples/cri-ctl")
SLOWFS = os.path.join(ROOT, "target/release/examples/slowfs")


def sh(cmd, check=True, **kw):
    r = subprocess.run(cmd, shell=isinstance(cmd, str), capture_output=True, text=True, **kw)
    if check and r.returncode != 0:
        raise RuntimeError(f"{cmd}: {r.stderr.strip()}")
    return r.stdout


# --- CRIU's stats-dump: two magics, a length, then a protobuf StatsEntry ---
def _varint(b, i):
    v = s = 0
    while True:
        c = b[i]
        i += 1
        v |= (c & 0x7F) << s
        s += 7
        if c < 0x80:
            return v, i


def _fields(b):
    i, out = 0, {}
    while i < len(b):
        key, i = _varint(b, i)
        num, wt = key >> 3, key & 7
        if wt == 0:
            out[num], i = _varint(b, i)
        elif wt == 2:
            n, i = _varint(b, i)
            out[num] = b[i:i + n]
            i += n
        else:
            raise ValueError("unexpected wire type")
    return out


def frozen_ms(stats_bytes):
    """CRIU's frozen_time in ms from a stats-dump image, or None."""
    if not stats_bytes or len(stats_bytes) < 12:
        return None
    n = int.from_bytes(stats_bytes[8:12], "little")
    dump = _fields(_fields(stats_bytes[12:12 + n]).get(1, b""))
    return dump.get(2, 0) / 1000.0 if dump else None


def stats_in_tar(path):
    with tarfile.open(path) as t:
        try:
            return t.extractfile("stats-dump").read()
        except KeyError:
            return None


def read(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


class Bench:
    def __init__(self, work, sizes, rounds, only=None, slow_mb=50):
        self.w, self.sizes, self.rounds, self.only = work, sizes, rounds, only
        self.slow_mb, self.slowfs = slow_mb, None
        self.results = {}  # (size, variant) -> list of dicts
        self.n = 0
        self.podman = ["podman", "--root", f"{work}/podman/root", "--runroot", f"{work}/podman/run",
                       "--storage-driver", "overlay", "--cgroup-manager", "cgroupfs", "--events-backend", "file",
                       "--runtime", "runc", "--tmpdir", f"{work}/podman/tmp"]
        self.shim = self.shim_d = None

    # --- set-up ---
    def setup(self):
        os.makedirs(self.w, exist_ok=True)
        # The node as README sets it up: containerd's runc is ckpt-runc.
        os.makedirs(f"{self.w}/bin", exist_ok=True)
        if not os.path.exists(f"{self.w}/bin/ckpt-runc"):
            os.symlink(SHIM, f"{self.w}/bin/ckpt-runc")
        self.restore_dir = f"{self.w}/restore"
        env = dict(os.environ, CKPT_SHIM_IMAGES=f"{self.w}/images", CKPT_RUNC=f"{self.w}/bin/ckpt-runc",
                   CKPT_SHIM_RESTORE_DIR=self.restore_dir)
        sh(["bash", f"{ROOT}/hack/build-image.sh", f"{self.w}/image"])
        sh(["bash", f"{ROOT}/hack/containerd.sh", "start", f"{self.w}/ctrd"], env=env)
        # Two shims in front of the same containerd: the default (durable) one, and
        # one without the fdatasync, for like-for-like ratios against B, C and D.
        self.sock, self.sock_d = f"{self.w}/shim/ckpt-shim.sock", f"{self.w}/shim-d/ckpt-shim.sock"
        open(f"{self.w}/shim-nf.toml", "w").write("durable = false\n")
        up = f"unix://{self.w}/ctrd/containerd.sock"
        self.shim = subprocess.Popen([SHIM, "serve", "--listen", self.sock, "--upstream", up, "--config", f"{self.w}/shim-nf.toml",
                                      "--restore-dir", self.restore_dir],
                                     stdout=subprocess.DEVNULL, stderr=open(f"{self.w}/shim.log", "w"))
        self.shim_d = subprocess.Popen([SHIM, "serve", "--listen", self.sock_d, "--upstream", up, "--restore-dir", self.restore_dir],
                                       stdout=subprocess.DEVNULL, stderr=open(f"{self.w}/shim-d.log", "w"))
        for _ in range(200):
            if os.path.exists(self.sock) and os.path.exists(self.sock_d):
                break
            time.sleep(0.05)
        sh(self.podman + ["load", "-q", "-i", f"{self.w}/images/counter-oci.tar"])
        if not self.only or any(v.endswith("-slow") for v in self.only):
            self.mount_slowfs()
        sh(["age-keygen", "-o", f"{self.w}/bench.key"])
        self.recipient = re.search(r"public key: (age1\w+)", open(f"{self.w}/bench.key").read()).group(1)

    def mount_slowfs(self):
        """The slow disk: {w}/slow-backing through hack/slowfs on {w}/slow."""
        self.slow = f"{self.w}/slow"
        try:
            os.stat(self.slow)
        except OSError:  # ENOTCONN: a killed slowfs's mount, left by an earlier run
            sh(["umount", "-l", self.slow], check=False)
        for d in (f"{self.w}/slow-backing", self.slow):
            os.makedirs(d, exist_ok=True)
        self.slowfs = subprocess.Popen([SLOWFS, "--rate-mb", str(self.slow_mb), f"{self.w}/slow-backing", self.slow],
                                       stdout=subprocess.DEVNULL, stderr=open(f"{self.w}/slowfs.log", "w"))
        for _ in range(400):
            if os.path.ismount(self.slow):
                break
            time.sleep(0.05)
        else:
            raise RuntimeError(f"slowfs did not mount: {open(f'{self.w}/slowfs.log').read()}")
        os.makedirs(f"{self.slow}/out", mode=0o700, exist_ok=True)

    def teardown(self):
        for p in (self.shim, self.shim_d, self.slowfs):
            if p:
                p.terminate()
                p.wait()
        sh(self.podman + ["rm", "-f", "-t", "0", "--all"], check=False)
        for s in self.sizes:
            sh(f"runc --root {self.w}/runc-state kill runc-{s} KILL; sleep 0.3; runc --root {self.w}/runc-state delete -f runc-{s}", check=False)
        sh(["bash", f"{ROOT}/hack/containerd.sh", "stop", f"{self.w}/ctrd"], check=False)
        sh(f"umount -l {self.w}/runc-*/rootfs {self.w}/xfs {self.w}/slow 2>/dev/null; find /sys/fs/cgroup/*/ckpt-shim-bench -depth -type d -exec rmdir {{}} \\; 2>/dev/null", check=False)
        shutil.rmtree(self.w, ignore_errors=True)

    def start_containers(self, mib):
        # runc, on an overlay like containerd's, stdio on a pipe.
        b = f"{self.w}/runc-{mib}"
        for d in ("upper", "work", "rootfs"):
            os.makedirs(f"{b}/{d}", exist_ok=True)
        sh(f"mount -t overlay overlay -o lowerdir={self.w}/image,upperdir={b}/upper,workdir={b}/work {b}/rootfs")
        sh(["runc", "spec", "--bundle", b])
        cfg = json.load(open(f"{b}/config.json"))
        cfg["process"].update(terminal=False, args=["/bin/counter", "/tmp/count", str(mib), "1000"])
        cfg["root"]["readonly"] = False
        cfg["linux"]["cgroupsPath"] = f"/ckpt-shim-bench/runc-{mib}"
        json.dump(cfg, open(f"{b}/config.json", "w"))
        subprocess.Popen(["setsid", "sh", "-c", f"cd {b} && runc --root {self.w}/runc-state run -d runc-{mib} </dev/null 2>&1 | cat >/dev/null"])
        self.cri_pod, self.cri_id = sh([CRICTL, self.sock, "run-counter", f"bench-{mib}", str(mib)]).split()
        sh(self.podman + ["run", "-d", "--name", f"pm-{mib}", "--network", "none", "--ulimit", "nofile=1024:1024",
                          "--ulimit", "nproc=1024:1024", "docker.io/library/ckpt-counter:latest", "/bin/counter", "/tmp/count", str(mib), "1000"])
        deadline = time.time() + 120
        while time.time() < deadline:
            ok = os.path.exists(f"{b}/rootfs/tmp/count") and sh(self.podman + ["exec", f"pm-{mib}", "cat", "/tmp/count"], check=False).strip()
            if ok:
                return
            time.sleep(0.2)
        raise RuntimeError("containers did not start")

    def stop_containers(self, mib):
        sh([CRICTL, self.sock, "rm-pod", self.cri_pod], check=False)
        sh(self.podman + ["rm", "-f", "-t", "0", f"pm-{mib}"], check=False)
        sh(f"runc --root {self.w}/runc-state kill runc-{mib} KILL; sleep 0.3; runc --root {self.w}/runc-state delete -f runc-{mib}; umount {self.w}/runc-{mib}/rootfs", check=False)

    def runc_pid(self, mib):
        return json.load(open(f"{self.w}/runc-state/runc-{mib}/state.json"))["init_process_pid"]

    # --- one run of each variant ---
    def fresh(self, base=None):
        self.n += 1
        d = f"{base or self.w + '/out'}/run-{self.n}"
        os.makedirs(d, mode=0o700)
        return d

    def timed(self, fn):
        sh("sync")
        t = time.monotonic()
        extra = fn()
        return time.monotonic() - t, extra

    def sync_time(self):
        t = time.monotonic()
        sh("sync")
        return time.monotonic() - t

    # --- the pause, seen from inside the container ---
    def probe_secs(self, mib):
        return 3 + mib / 256

    def probe(self, kind, mib):
        """Starts the probe in the container `kind` runs; returns a function that
        waits for its verdict: the longest gap in ms."""
        secs = self.probe_secs(mib)
        args = ["/bin/pauseprobe", "/tmp/pause", str(secs)]
        if kind == "cri":
            path = f"{self.w}/ctrd/state/io.containerd.runtime.v2.task/k8s.io/{self.cri_id}/rootfs/tmp/pause"
            start = ["ctr", "--address", f"{self.w}/ctrd/containerd.sock", "-n", "k8s.io", "tasks", "exec", "-d",
                     "--exec-id", f"probe-{self.n}", self.cri_id] + args
        elif kind == "runc":
            path = f"{self.w}/runc-{mib}/rootfs/tmp/pause"
            start = ["runc", "--root", f"{self.w}/runc-state", "exec", "-d", f"runc-{mib}"] + args
        else:
            path = None
            start = self.podman + ["exec", "-d", f"pm-{mib}"] + args
        if path and os.path.exists(path):
            os.remove(path)
        sh(self.podman + ["exec", f"pm-{mib}", "rm", "-f", "/tmp/pause"], check=False) if kind == "podman" else None
        # Not captured: the detached probe would hold the pipes open to its end.
        subprocess.run(start, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        time.sleep(0.4)
        t0 = time.monotonic()

        def verdict():
            while time.monotonic() < t0 + secs + 30:
                text = open(path).read() if path and os.path.exists(path) else (
                    sh(self.podman + ["exec", f"pm-{mib}", "cat", "/tmp/pause"], check=False) if not path else "")
                if text.strip():
                    return json.loads(text)["longest_us"] / 1000.0
                time.sleep(0.2)
            return None
        return verdict

    def with_probe(self, kind, mib, fn):
        verdict = self.probe(kind, mib)
        r = fn()
        r["pause"] = verdict()
        return r

    def run_A(self, mib, durable=False, base=None):
        d = self.fresh(base)
        sock = self.sock_d if durable else self.sock
        log = f"{self.w}/shim{'-d' if durable else ''}.log"
        wall, _ = self.timed(lambda: sh([CRICTL, sock, "checkpoint", self.cri_id, f"{d}/a.tar", "600"]))
        tool = float(re.findall(r"frozen_ms=([0-9.]+)", open(log).read())[-1])
        return dict(wall=wall, frozen=frozen_ms(stats_in_tar(f"{d}/a.tar")), tool=tool, bytes=os.path.getsize(f"{d}/a.tar"), dir=d)

    def run_A_cli(self, mib, fsync=True, base=None, stream=True, hold=0, encrypt=False):
        d = self.fresh(base)
        cmd = [SHIM, "checkpoint", "--runtime-root", f"{self.w}/runc-state", f"runc-{mib}", "--output", f"{d}/a.tar",
               "--hold-pages-mib", str(hold)] + ([] if fsync else ["--no-fsync"]) + ([] if stream else ["--no-stream"])
        cmd += ["--encrypt-to", self.recipient] if encrypt else []
        wall, out = self.timed(lambda: sh(cmd))
        wrote = int(re.search(r"archive step wrote (\d+) bytes", out).group(1))
        tool = float(re.search(r"; frozen ([0-9.]+)ms", out).group(1))
        return dict(wall=wall, frozen=frozen_ms(stats_in_tar(f"{d}/a.tar")), tool=tool, bytes=os.path.getsize(f"{d}/a.tar"), archive_wrote=wrote, dir=d)

    def run_B(self, mib):
        d = self.fresh()
        os.makedirs(f"{d}/img")
        os.makedirs(f"{d}/work")
        pid = self.runc_pid(mib)
        cfg = json.load(open(f"{self.w}/runc-{mib}/config.json"))
        masked = set(cfg["linux"].get("maskedPaths", []))
        ext = []
        for line in open(f"/proc/{pid}/mountinfo"):
            pre, post = line.split(" - ")
            mp, fstype = pre.split()[4], post.split()[0]
            if mp in masked and not (fstype == "tmpfs" and pre.split()[3] == "/"):
                ext += ["--ext-mount-map", f"{mp}:/dev/null"]
            elif fstype == "cgroup":
                ext += ["--ext-mount-map", f"{mp}:{mp}"]
        # Frozen through its cgroup, as runc and containerd have CRIU do it, so
        # the whole container stops, the probe included.
        cmd = ["criu", "dump", "-t", str(pid), "-D", f"{d}/img", "-W", f"{d}/work", "--leave-running", "--root", f"{self.w}/runc-{mib}/rootfs",
               "--freeze-cgroup", f"/sys/fs/cgroup/freezer/ckpt-shim-bench/runc-{mib}",
               "--manage-cgroups=soft", "--file-locks", "-v4", "-o", "dump.log"] + ext
        wall, _ = self.timed(lambda: sh(cmd))
        return dict(wall=wall, frozen=frozen_ms(read(f"{d}/work/stats-dump")), bytes=int(sh(["du", "-sb", f"{d}/img"]).split()[0]), dir=d)

    def run_C(self, mib):
        d = self.fresh()
        cmd = ["runc", "--root", f"{self.w}/runc-state", "checkpoint", "--leave-running", "--image-path", f"{d}/img", "--work-path", f"{d}/work", f"runc-{mib}"]
        wall1, _ = self.timed(lambda: sh(cmd))
        t = time.monotonic()
        sh(["tar", "cf", f"{d}/c.tar", "-C", f"{d}/img", "."])
        wall = wall1 + time.monotonic() - t
        return dict(wall=wall, dump=wall1, frozen=frozen_ms(read(f"{d}/work/stats-dump")), bytes=os.path.getsize(f"{d}/c.tar"), dir=d)

    def run_D(self, mib):
        d = self.fresh()
        cmd = self.podman + ["container", "checkpoint", "--leave-running", "--compress", "none", "--print-stats", f"--export={d}/d.tar", f"pm-{mib}"]
        wall, out = self.timed(lambda: sh(cmd))
        st = json.loads(out[out.index("{"):]) if "{" in out else {}
        fr = (st.get("container_statistics") or [{}])[0].get("criu_statistics", {}).get("frozen_time")
        return dict(wall=wall, frozen=fr / 1000.0 if fr is not None else None, bytes=os.path.getsize(f"{d}/d.tar"), dir=d)

    def record(self, mib, name, r, durable_sync=False):
        if durable_sync:
            r["durable"] = r["wall"] + self.sync_time()
        d = r.pop("dir")
        # The shim removes staging in the background after answering: let it
        # finish (untimed) so it does not slow the next run.
        deadline = time.time() + 60
        while any(n.startswith(".ckpt-shim-staging-") for n in os.listdir(d)) and time.time() < deadline:
            time.sleep(0.02)
        shutil.rmtree(d, ignore_errors=True)
        self.settle()
        self.results.setdefault((mib, name), []).append(r)

    def settle(self):
        """Let the disk go quiet (deleted outputs' discards, writeback) so one run's
        I/O does not land in the next run's frozen window."""
        sh("sync")
        deadline = time.time() + 30
        while time.time() < deadline:
            mem = dict(l.split(":", 1) for l in open("/proc/meminfo"))
            busy = int(mem["Dirty"].split()[0]) + int(mem["Writeback"].split()[0])
            stat = open("/sys/block/vda/stat").read().split() if os.path.exists("/sys/block/vda/stat") else ["0"] * 11
            if busy < 4096 and stat[8] == "0":  # < 4 MiB dirty, no I/O in flight
                break
            time.sleep(0.1)
        time.sleep(0.3)

    def run(self):
        for mib in self.sizes:
            self.start_containers(mib)
            p = self.with_probe
            variants = [
                ("A", lambda: p("cri", mib, lambda: self.run_A(mib)), False),
                ("A-d", lambda: p("cri", mib, lambda: self.run_A(mib, durable=True)), False),
                ("A-cli", lambda: p("runc", mib, lambda: self.run_A_cli(mib, True)), False),
                ("A-nf", lambda: p("runc", mib, lambda: self.run_A_cli(mib, False)), False),
                ("A-slow", lambda: p("cri", mib, lambda: self.run_A(mib, base=f"{self.slow}/out")), False),
                ("A-nf-slow", lambda: p("runc", mib, lambda: self.run_A_cli(mib, False, base=f"{self.slow}/out")), False),
                ("A-hold-slow", lambda: p("runc", mib, lambda: self.run_A_cli(mib, False, base=f"{self.slow}/out", hold=4096)), False),
                ("A-hold", lambda: p("runc", mib, lambda: self.run_A_cli(mib, False, hold=4096)), False),
                ("A-enc", lambda: p("runc", mib, lambda: self.run_A_cli(mib, False, encrypt=True)), False),
                ("A-enc-hold", lambda: p("runc", mib, lambda: self.run_A_cli(mib, False, hold=4096, encrypt=True)), False),
                ("A-stg", lambda: p("runc", mib, lambda: self.run_A_cli(mib, True, stream=False)), False),
                ("A-stg-nf", lambda: p("runc", mib, lambda: self.run_A_cli(mib, False, stream=False)), False),
                ("B", lambda: p("runc", mib, lambda: self.run_B(mib)), True),
                ("C", lambda: p("runc", mib, lambda: self.run_C(mib)), True),
                ("D", lambda: p("podman", mib, lambda: self.run_D(mib)), True),
            ]
            if self.only:
                variants = [v for v in variants if v[0] in self.only]
            for rnd in range(self.rounds):
                k = rnd % len(variants)
                for name, fn, durable in variants[k:] + variants[:k]:
                    r = fn()
                    self.record(mib, name, r, durable)
                    print(f"  {mib} MiB round {rnd + 1} {name}: {r['wall']:.3f}s frozen {r.get('frozen')} pause {r.get('pause')}", file=sys.stderr, flush=True)
            if not self.only or "A-xfs" in self.only:
                self.xfs(mib)
            self.stop_containers(mib)
        self.rss = max(int(re.search(r"VmHWM:\s+(\d+)", open(f"/proc/{p.pid}/status").read()).group(1)) // 1024 for p in (self.shim, self.shim_d))

    def xfs(self, mib):
        """On a reflink XFS loop image, how many bytes the archive step writes."""
        if not shutil.which("mkfs.xfs"):
            return
        mnt = f"{self.w}/xfs"
        if not os.path.ismount(mnt):
            os.makedirs(mnt, exist_ok=True)
            sh(f"truncate -s {max(8, 3 * max(self.sizes) // 1024 + 4)}G {self.w}/xfs.img && mkfs.xfs -q -f -m reflink=1 {self.w}/xfs.img && mount -o loop {self.w}/xfs.img {mnt}")
            os.makedirs(f"{mnt}/out", mode=0o700, exist_ok=True)
        r = self.run_A_cli(mib, True, base=f"{mnt}/out")
        self.record(mib, "A-xfs", r)

    # --- report ---
    def med(self, mib, name, key="wall"):
        v = [r[key] for r in self.results.get((mib, name), []) if r.get(key) is not None]
        return (statistics.median(v), min(v), max(v)) if v else None

    def report(self):
        fmt = lambda m: "-" if not m else f"{m[0]:.3f} ({m[1]:.3f}–{m[2]:.3f})"
        fz = lambda m: "-" if not m else f"{m[0]:.0f}"
        lines = ["| MiB | variant | wall s, median (min–max) | durable s (with sync) | pause ms, probe median (min–max) | tool's frozen ms | CRIU frozen ms | output bytes |", "|---|---|---|---|---|---|---|---|"]
        names = {"A": "A shim via CRI, no fsync", "A-d": "A shim via CRI (fdatasync)", "A-cli": "A shim CLI (fdatasync)", "A-nf": "A shim CLI, no fsync", "A-slow": f"A shim via CRI, no fsync, on slowfs at {self.slow_mb:g} MB/s", "A-nf-slow": f"A shim CLI, no fsync, on slowfs at {self.slow_mb:g} MB/s", "A-hold-slow": f"A shim CLI, pages held, no fsync, on slowfs at {self.slow_mb:g} MB/s", "A-hold": "A shim CLI, pages held, no fsync", "A-enc": "A shim CLI, encrypted, no fsync", "A-enc-hold": "A shim CLI, encrypted, pages held, no fsync", "A-stg": "A shim CLI staged (fdatasync)", "A-stg-nf": "A shim CLI staged, no fsync", "B": "B raw criu dump", "C": "C runc checkpoint + tar", "D": "D podman --export"}
        fp = lambda m: "-" if not m else f"{m[0]:.0f} ({m[1]:.0f}–{m[2]:.0f})"
        for mib in self.sizes:
            for v, label in names.items():
                by = self.med(mib, v, "bytes")
                tool = self.med(mib, v, "tool") or self.med(mib, v, "frozen")
                lines.append(f"| {mib or 'tiny'} | {label} | {fmt(self.med(mib, v))} | {fmt(self.med(mib, v, 'durable'))} | {fp(self.med(mib, v, 'pause'))} | {fz(tool)} | {fz(self.med(mib, v, 'frozen'))} | {by[0]:.0f} |" if by else f"| {mib or 'tiny'} | {label} | - | - | - | - | - | - |")
        lines += ["", "| MiB | pause: C / A (CRI) | C / A-nf (same container) | A-nf / B | A-hold / B | D / A |", "|---|---|---|---|---|---|"]
        for mib in self.sizes:
            m = lambda v: (self.med(mib, v, "pause") or [float("nan")])[0] or float("nan")
            lines.append(f"| {mib or 'tiny'} | {m('C') / m('A'):.2f} | {m('C') / m('A-nf'):.2f} | {m('A-nf') / m('B'):.2f} | {m('A-hold') / m('B'):.2f} | {m('D') / m('A'):.2f} |")
        lines += ["", "| MiB | encrypted / plain: wall A-enc / A-nf | A-enc-hold / A-hold | pause A-enc / A-nf | A-enc-hold / A-nf |", "|---|---|---|---|---|"]
        for mib in self.sizes:
            m = lambda v, k="wall": (self.med(mib, v, k) or [float("nan")])[0] or float("nan")
            lines.append(f"| {mib or 'tiny'} | {m('A-enc') / m('A-nf'):.2f} | {m('A-enc-hold') / m('A-hold'):.2f} | {m('A-enc', 'pause') / m('A-nf', 'pause'):.2f} | {m('A-enc-hold', 'pause') / m('A-nf', 'pause'):.2f} |")
        lines += ["", "| MiB | A/B | A-nf/B (CLI) | staged A-stg-nf/B | C/A | D/A | A-nf frozen − B frozen (ms, same container) | durable: C+sync / A-d | D+sync / A-d | A-cli / B+sync | XFS: bytes the archive step wrote / archive |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for mib in self.sizes:
            m = lambda v, k="wall": (self.med(mib, v, k) or [float("nan")])[0] or float("nan")
            x = self.results.get((mib, "A-xfs"), [{}])[0]
            xfs = f"{x['archive_wrote'] / x['bytes'] * 100:.2f}%" if x.get("bytes") else "-"
            lines.append(f"| {mib or 'tiny'} | {m('A') / m('B'):.2f} | {m('A-nf') / m('B'):.2f} | {m('A-stg-nf') / m('B'):.2f} | {m('C') / m('A'):.2f} | {m('D') / m('A'):.2f} | {m('A-nf', 'frozen') - m('B', 'frozen'):+.0f} | {m('C', 'durable') / m('A-d'):.2f} | {m('D', 'durable') / m('A-d'):.2f} | {m('A-cli') / m('B', 'durable'):.2f} | {xfs} |")
        lines += ["", "| MiB | slow disk / normal disk: pause A-slow / A (CRI) | A-nf-slow / A-nf (CLI) | A-hold-slow / A-hold | wall A-slow / A | A-nf-slow / A-nf | A-hold-slow / A-hold |", "|---|---|---|---|---|---|---|"]
        for mib in self.sizes:
            m = lambda v, k="wall": (self.med(mib, v, k) or [float("nan")])[0] or float("nan")
            r = lambda a, b, k="wall": f"{m(a, k) / m(b, k):.2f}"
            lines.append(f"| {mib or 'tiny'} | {r('A-slow', 'A', 'pause')} | {r('A-nf-slow', 'A-nf', 'pause')} | {r('A-hold-slow', 'A-hold', 'pause')} | {r('A-slow', 'A')} | {r('A-nf-slow', 'A-nf')} | {r('A-hold-slow', 'A-hold')} |")
        lines += ["", f"shim (`ckpt-shim serve`) peak RSS over the whole run: {self.rss} MiB"]
        return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="0,64,512,2048", help="MiB of touched memory, comma-separated (0: a tiny container)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", default="/var/tmp/ckpt-shim-bench")
    ap.add_argument("--out", help="also write the tables here")
    ap.add_argument("--only", help="run just these variants, comma-separated (e.g. A-st,B)")
    ap.add_argument("--slow-mb", type=float, default=50, help="write rate of the slow disk (A-slow, A-nf-slow), MB/s")
    a = ap.parse_args()
    b = Bench(a.work, [int(s) for s in a.sizes.split(",")], a.rounds, a.only.split(",") if a.only else None, a.slow_mb)
    try:
        b.setup()
        b.run()
        text = b.report()
    finally:
        b.teardown()
    print(text)
    if a.out:
        open(a.out, "w").write(text + "\n")


if __name__ == "__main__":
    main()
