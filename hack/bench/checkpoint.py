#!/usr/bin/env python3
"""Checkpoint benchmark: ckpt-shim against the peers, measured in the same run.

Issue 21's question: with the pages held in memory while the container is frozen
(`hold_pages = "auto"`, the default), how long is the pause, the total time, the
shim's peak memory and the bytes written while frozen, against writing through
(`hold_pages = 0`), raw CRIU, runc and podman, on the normal disk and a slow one.

For containers touching N MiB of incompressible memory (tests/fixtures/workloads/counter.c),
each round runs, in an order that rotates from round to round:
  through CRI (CheckpointContainer on a `ckpt-shim serve` socket in front of containerd;
  one shim per variant, each with its own config, socket and log):
  A       auto (the default), `durable = false` (no fdatasync)
  A-d     auto, durable (the default config)
  A-wt, A-wt-d  the same two written through (`hold_pages = 0`)
  the CLI (`ckpt-shim checkpoint`, on a runc container):
  A-nf    auto (the default), --no-fsync
  A-cli   auto, the archive fdatasync'd
  A-nf-wt, A-cli-wt  the same two written through (`--hold-pages 0`)
  A-enc, A-enc-wt  --no-fsync, encrypted to an age key (the benchmark's own), auto and
          written through
  A-stg, A-stg-nf, A-stg-nf-wt  dumping into staging first (--no-stream): auto with
          and without fsync, and written through without
  the peers, on that same runc container:
  B       raw `criu dump --leave-running` into a fresh dir (the floor)
  C       `runc checkpoint --leave-running` + `tar cf` (what containerd 2.x does)
  D       `podman container checkpoint --leave-running --export` (runc, no compression)
  on a deliberately slow disk (hack/slowfs, a FUSE passthrough of the same file
  system whose writes are throttled to --slow-mb MB/s; reads are not), the archive
  and the staging beside it:
  A-slow, A-wt-slow        A and A-wt through CRI
  A-nf-slow, A-nf-wt-slow  A-nf and A-nf-wt, the CLI
  A-xfs   (only without --only, or when named) A-cli written through on a reflink XFS
          loop image: how many bytes the archive step writes itself (reflink and
          adoption copy no page data)

Every run records:
  - the pause as the application sees it: a probe inside the container
    (tests/fixtures/workloads/pauseprobe.c, started by the container's init, so that it is
    in the tree that is dumped) spins on CLOCK_MONOTONIC across the checkpoint
    (--probe-secs) and reports its longest gap; beside it the tool's own frozen
    figure and CRIU's;
  - the total wall time (durable variants of B, C and D add the `sync` that makes
    their output durable; A-d, A-wt-d, A-cli, A-cli-wt, A-stg include their fdatasync);
  - the shim's bytes held and written while frozen (the CLI's status line, the
    serve shim's "checkpointed" log line); the peers write everything while frozen;
  - peak RSS: for a command (the CLI and the peers) its maximum RSS as GNU time
    reports it, which covers the children it waited for (CRIU); for a serve shim its
    VmHWM, reset before each checkpoint (/proc/PID/clear_refs), and its VmRSS once
    the run has settled, to show the held memory is given back.
Size 0 is a tiny container (the counter with no memory touched). Every run writes to
a fresh directory on the same file system; outputs are deleted and synced between
runs, outside the timing. The tables are rewritten to --out after each size, so an
interrupted run leaves what it measured. Not a test: it asserts nothing.
"""
import argparse
import errno
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

from common import CRICTL, ROOT, SHIM, SLOWFS, crictl_pod, criu_mount_maps, read, sh


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
    try:
        with tarfile.open(path) as t:
            return t.extractfile("stats-dump").read()
    except (KeyError, tarfile.ReadError):  # not in it, or encrypted
        return None


# The serve shims, one per CRI variant: name -> its config file.
SHIMS = {
    "A": "durable = false\n",
    "A-d": "",
    "A-wt": "durable = false\nhold_pages = 0\n",
    "A-wt-d": "hold_pages = 0\n",
}
# Held against written through, the same otherwise: (auto, written through, what).
PAIRS = [("A", "A-wt", "CRI, no fsync"), ("A-d", "A-wt-d", "CRI, durable"),
         ("A-nf", "A-nf-wt", "CLI, no fsync"), ("A-cli", "A-cli-wt", "CLI, fsync"),
         ("A-enc", "A-enc-wt", "CLI, encrypted, no fsync"), ("A-stg-nf", "A-stg-nf-wt", "CLI staged, no fsync")]
# On the slow disk against its twin on the normal disk: (slow, normal, what).
SLOW_PAIRS = [("A-slow", "A", "CRI, auto"), ("A-wt-slow", "A-wt", "CRI, written through"),
              ("A-nf-slow", "A-nf", "CLI, auto"), ("A-nf-wt-slow", "A-nf-wt", "CLI, written through")]
MiB = 1 << 20


def proc_status(pid, key):
    """A /proc/PID/status figure in bytes (VmHWM, VmRSS)."""
    return int(re.search(rf"{key}:\s+(\d+)", open(f"/proc/{pid}/status").read()).group(1)) * 1024


def last_logged(log, key):
    """`key=` in the last "checkpointed" line of a serve shim's log."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", open(log).read())
    line = [l for l in text.splitlines() if "checkpointed" in l and f"{key}=" in l][-1]
    return float(re.search(rf"\b{key}=([0-9.]+)", line).group(1))


def start_probe(fifo, secs, timeout=30):
    """Has the container's init start the pause probe for `secs` (see Bench.command)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError as e:  # ENXIO: its reader is between two probes; ENOENT: not made yet
            if e.errno not in (errno.ENXIO, errno.ENOENT) or time.monotonic() > deadline:
                raise RuntimeError(f"{fifo}: nobody starts the probe: {e}") from e
            time.sleep(0.01)
    try:
        os.write(fd, f"{secs}\n".encode())
    finally:
        os.close(fd)


class Bench:
    shim_configs = SHIMS  # the serve shims setup() starts: name -> config

    def __init__(self, work, sizes, rounds, only=None, slow_mb=50, skip=(), probe_secs=None):
        self.w, self.sizes, self.rounds, self.only, self.skip = work, sizes, rounds, only, set(skip)
        self.probe_time = probe_secs
        self.slow_mb, self.slowfs = slow_mb, None
        self.results = {}  # (size, variant) -> list of dicts
        self.n = 0
        self.podman = ["podman", "--root", f"{work}/podman/root", "--runroot", f"{work}/podman/run",
                       "--storage-driver", "overlay", "--cgroup-manager", "cgroupfs", "--events-backend", "file",
                       "--runtime", "runc", "--tmpdir", f"{work}/podman/tmp"]
        self.shims = {}  # name -> dict(proc, sock, log, idle: VmRSS before any checkpoint, peak)

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
        for name, toml in self.shim_configs.items():
            self.start_shim(name, toml)
        sh(self.podman + ["load", "-q", "-i", f"{self.w}/images/counter-oci.tar"])
        if self.wants_slowfs():
            self.mount_slowfs()
        sh(["age-keygen", "-o", f"{self.w}/bench.key"])
        self.recipient = re.search(r"public key: (age1\w+)", open(f"{self.w}/bench.key").read()).group(1)

    def wants_slowfs(self):
        return not self.only or any(v.endswith("-slow") for v in self.only)

    def start_shim(self, name, toml):
        """A `ckpt-shim serve` in front of the same containerd, with its own config,
        socket and log."""
        d = f"{self.w}/shim-{name}"
        os.makedirs(d, exist_ok=True)
        open(f"{d}/config.toml", "w").write(toml)
        s = dict(sock=f"{d}/ckpt-shim.sock", log=f"{d}/shim.log", peak=0)
        s["proc"] = subprocess.Popen([SHIM, "serve", "--listen", s["sock"], "--upstream", f"unix://{self.w}/ctrd/containerd.sock",
                                      "--config", f"{d}/config.toml", "--restore-dir", self.restore_dir],
                                     stdout=subprocess.DEVNULL, stderr=open(s["log"], "w"))
        for _ in range(200):
            if os.path.exists(s["sock"]):
                break
            time.sleep(0.05)
        else:
            raise RuntimeError(f"shim {name} did not start: {open(s['log']).read()}")
        s["idle"] = proc_status(s["proc"].pid, "VmRSS")
        self.shims[name] = s

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
        for p in [s["proc"] for s in self.shims.values()] + [self.slowfs]:
            if p:
                p.terminate()
                p.wait()
        sh(self.podman + ["rm", "-f", "-t", "0", "--all"], check=False)
        for s in self.sizes:
            sh(f"runc --root {self.w}/runc-state kill runc-{s} KILL; sleep 0.3; runc --root {self.w}/runc-state delete -f runc-{s}", check=False)
        sh(["bash", f"{ROOT}/hack/containerd.sh", "stop", f"{self.w}/ctrd"], check=False)
        sh(f"umount -l {self.w}/runc-*/rootfs {self.w}/xfs {self.w}/slow 2>/dev/null; find /sys/fs/cgroup/*/ckpt-shim-bench -depth -type d -exec rmdir {{}} \\; 2>/dev/null", check=False)
        shutil.rmtree(self.w, ignore_errors=True)

    # Every container the checkpoints run on is the counter; with `probed`, its
    # init starts the pause probe as its own child each time a number of seconds
    # is written into /dev/probe.fifo. The probe must be in the init's tree: the
    # shim refuses to checkpoint a container with a process outside it (one that
    # `exec` started, say), which CRIU would leave out. The FIFO is on the
    # container's /dev, a tmpfs of its own, not in its root file system's changes.
    probed = True

    def command(self, mib):
        counter = ["/bin/counter", "/tmp/count", str(mib), "1000"]
        if not self.probed:
            return counter
        # (A checkpoint may interrupt the FIFO's open: the loop goes on.)
        launcher = ('mkfifo /dev/probe.fifo; while :; do if read secs < /dev/probe.fifo; then /bin/pauseprobe /tmp/pause "$secs" & '
                    f"else sleep 0.1; fi; done 2>/dev/null & exec {' '.join(counter)}")
        return ["/bin/sh", "-c", launcher]

    def rootfs(self, kind, mib):
        """Where the host sees the container's root file system (none for podman's: exec)."""
        return {"cri": f"{self.cri_state()}/rootfs", "runc": f"{self.w}/runc-{mib}/rootfs"}.get(kind)

    def cri_state(self):
        return f"{self.w}/ctrd/state/io.containerd.runtime.v2.task/k8s.io/{self.cri_id}"

    def init_pid(self, kind, mib):
        return self.runc_pid(mib) if kind == "runc" else int(open(f"{self.cri_state()}/init.pid").read())

    def start_cri(self, mib):
        """A pod with the counter, through the CRI of shim A, as cri-ctl's run-counter
        makes it, but with the command of `command`."""
        if not self.probed:
            return sh([CRICTL, self.shims["A"]["sock"], "run-counter", f"bench-{mib}", str(mib)]).split()
        ctr = {"metadata": {"name": "counter"}, "image": {"image": "docker.io/library/ckpt-counter:latest"},
               "command": self.command(mib), "log_path": "counter.log"}
        return crictl_pod(self.w, self.shims["A"]["sock"], f"bench-{mib}", ctr, mib)

    def start_containers(self, mib):
        # runc, on an overlay like containerd's, stdio on a pipe.
        b = f"{self.w}/runc-{mib}"
        for d in ("upper", "work", "rootfs"):
            os.makedirs(f"{b}/{d}", exist_ok=True)
        sh(f"mount -t overlay overlay -o lowerdir={self.w}/image,upperdir={b}/upper,workdir={b}/work {b}/rootfs")
        sh(["runc", "spec", "--bundle", b])
        cfg = json.load(open(f"{b}/config.json"))
        cfg["process"].update(terminal=False, args=self.command(mib))
        cfg["root"]["readonly"] = False
        cfg["linux"]["cgroupsPath"] = f"/ckpt-shim-bench/runc-{mib}"
        json.dump(cfg, open(f"{b}/config.json", "w"))
        subprocess.Popen(["setsid", "sh", "-c", f"cd {b} && runc --root {self.w}/runc-state run -d runc-{mib} </dev/null 2>&1 | cat >/dev/null"])
        self.cri_pod, self.cri_id = self.start_cri(mib)
        sh(self.podman + ["run", "-d", "--name", f"pm-{mib}", "--network", "none", "--ulimit", "nofile=1024:1024",
                          "--ulimit", "nproc=1024:1024", "docker.io/library/ckpt-counter:latest"] + self.command(mib))
        deadline = time.time() + 120
        while time.time() < deadline:  # each has counted once: its memory is touched
            ok = all(os.path.exists(f"{self.rootfs(k, mib)}/tmp/count") for k in ("cri", "runc")) and \
                sh(self.podman + ["exec", f"pm-{mib}", "cat", "/tmp/count"], check=False).strip()
            if ok:
                return
            time.sleep(0.2)
        raise RuntimeError("containers did not start")

    def stop_containers(self, mib):
        sh([CRICTL, self.shims["A"]["sock"], "rm-pod", self.cri_pod], check=False)
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

    def measure(self, cmd):
        """Runs cmd after a sync: (wall seconds, stdout, peak RSS in bytes of it and
        the children it waited for). The RSS is GNU time's %M: a child forked from
        this script would start with the script's own peak (~17 MiB), kept across
        exec; one forked from time starts with time's (~2 MiB)."""
        sh("sync")
        with tempfile.NamedTemporaryFile("r") as rss:
            t = time.monotonic()
            out = sh(["/usr/bin/time", "-f", "%M", "-o", rss.name] + cmd)
            wall = time.monotonic() - t
            return wall, out, int(rss.read().split()[-1]) * 1024

    def sync_time(self):
        t = time.monotonic()
        sh("sync")
        return time.monotonic() - t

    # --- the pause, seen from inside the container ---
    def probe_secs(self, mib):
        """How long the probe spins: it must outlast the checkpoint."""
        return self.probe_time or 3 + mib / 256

    def probe(self, kind, mib):
        """Starts the probe in the container `kind` runs; returns a function that
        waits for its verdict: the longest gap in ms."""
        secs = self.probe_secs(mib)
        root = self.rootfs(kind, mib)
        path = root and f"{root}/tmp/pause"
        if path and os.path.exists(path):
            os.remove(path)
        if kind == "podman":  # an exec that has ended before the checkpoint starts
            sh(self.podman + ["exec", f"pm-{mib}", "sh", "-c", f"rm -f /tmp/pause; echo {secs} > /dev/probe.fifo"])
        else:
            start_probe(f"/proc/{self.init_pid(kind, mib)}/root/dev/probe.fifo", secs)
        time.sleep(0.4)
        t0 = time.monotonic()

        def verdict():
            # Looked at least once: a checkpoint on the slow disk outlasts the probe.
            deadline = max(t0 + secs, time.monotonic()) + 30
            while True:
                text = open(path).read() if path and os.path.exists(path) else (
                    sh(self.podman + ["exec", f"pm-{mib}", "cat", "/tmp/pause"], check=False) if not path else "")
                if text.strip():
                    return json.loads(text)["longest_us"] / 1000.0
                if time.monotonic() > deadline:
                    return None
                time.sleep(0.2)
        return verdict

    def with_probe(self, kind, mib, fn):
        verdict = self.probe(kind, mib)
        r = fn()
        r["pause"] = verdict()
        return r

    def run_A(self, mib, shim, base=None):
        """CheckpointContainer through the serve shim `shim`."""
        d = self.fresh(base)
        s = self.shims[shim]
        pid = s["proc"].pid
        open(f"/proc/{pid}/clear_refs", "w").write("5")  # VmHWM := VmRSS, so it is this checkpoint's peak
        wall, _, _ = self.measure([CRICTL, s["sock"], "checkpoint", self.cri_id, f"{d}/a.tar", "600"])
        rss = proc_status(pid, "VmHWM")
        s["peak"] = max(s["peak"], rss)
        logged = lambda k: last_logged(s["log"], k)
        return dict(wall=wall, frozen=frozen_ms(stats_in_tar(f"{d}/a.tar")), tool=logged("frozen_ms"), held=logged("pages_held"),
                    frozen_written=logged("frozen_written"), rss=rss, shim=shim, bytes=os.path.getsize(f"{d}/a.tar"), dir=d)

    def run_A_cli(self, mib, fsync=True, base=None, stream=True, hold="auto", encrypt=False):
        d = self.fresh(base)
        cmd = [SHIM, "checkpoint", "--runtime-root", f"{self.w}/runc-state", f"runc-{mib}", "--output", f"{d}/a.tar",
               "--hold-pages", str(hold)] + ([] if fsync else ["--no-fsync"]) + ([] if stream else ["--no-stream"])
        cmd += ["--encrypt-to", self.recipient] if encrypt else []
        wall, out, rss = self.measure(cmd)
        held, frozen_written = map(int, re.search(r"(\d+) bytes of pages held; (\d+) bytes written while frozen", out).groups())
        return dict(wall=wall, frozen=frozen_ms(stats_in_tar(f"{d}/a.tar")),
                    tool=float(re.search(r"; frozen ([0-9.]+)ms", out).group(1)), held=held, frozen_written=frozen_written, rss=rss,
                    archive_wrote=int(re.search(r"archive step wrote (\d+) bytes", out).group(1)), bytes=os.path.getsize(f"{d}/a.tar"), dir=d)

    def run_B(self, mib):
        d = self.fresh()
        os.makedirs(f"{d}/img")
        os.makedirs(f"{d}/work")
        pid = self.runc_pid(mib)
        ext = criu_mount_maps(json.load(open(f"{self.w}/runc-{mib}/config.json")), pid)
        # Frozen through its cgroup, as runc and containerd have CRIU do it, so
        # the whole container stops, the probe included.
        cmd = ["criu", "dump", "-t", str(pid), "-D", f"{d}/img", "-W", f"{d}/work", "--leave-running", "--root", f"{self.w}/runc-{mib}/rootfs",
               "--freeze-cgroup", f"/sys/fs/cgroup/freezer/ckpt-shim-bench/runc-{mib}",
               "--manage-cgroups=soft", "--file-locks", "-v4", "-o", "dump.log"] + ext
        wall, _, rss = self.measure(cmd)
        return dict(wall=wall, frozen=frozen_ms(read(f"{d}/work/stats-dump")), rss=rss, bytes=int(sh(["du", "-sb", f"{d}/img"]).split()[0]), dir=d)

    def run_C(self, mib):
        d = self.fresh()
        cmd = ["runc", "--root", f"{self.w}/runc-state", "checkpoint", "--leave-running", "--image-path", f"{d}/img", "--work-path", f"{d}/work", f"runc-{mib}"]
        dump, _, rss = self.measure(cmd)
        t = time.monotonic()
        sh(["tar", "cf", f"{d}/c.tar", "-C", f"{d}/img", "."])
        wall = dump + time.monotonic() - t
        return dict(wall=wall, dump=dump, frozen=frozen_ms(read(f"{d}/work/stats-dump")), rss=rss, bytes=os.path.getsize(f"{d}/c.tar"), dir=d)

    def run_D(self, mib):
        d = self.fresh()
        cmd = self.podman + ["container", "checkpoint", "--leave-running", "--compress", "none", "--print-stats", f"--export={d}/d.tar", f"pm-{mib}"]
        wall, out, rss = self.measure(cmd)
        st = json.loads(out[out.index("{"):]) if "{" in out else {}
        fr = (st.get("container_statistics") or [{}])[0].get("criu_statistics", {}).get("frozen_time")
        return dict(wall=wall, frozen=fr / 1000.0 if fr is not None else None, rss=rss, bytes=os.path.getsize(f"{d}/d.tar"), dir=d)

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
        if "shim" in r:  # the serve shim's memory once the run is over: is the held buffer given back?
            r["rss_after"] = proc_status(self.shims[r.pop("shim")]["proc"].pid, "VmRSS")
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

    def variants(self, mib):
        """(name, label, durable_sync, run) for every variant, `run` probed."""
        p, cli, slow = self.with_probe, self.run_A_cli, f"{self.slow_mb:g} MB/s slowfs"
        cri = lambda shim, base=None: lambda: p("cri", mib, lambda: self.run_A(mib, shim, base))
        runc = lambda **kw: lambda: p("runc", mib, lambda: cli(mib, **kw))
        slow_out = lambda: f"{self.slow}/out"
        return [
            ("A", "CRI, auto, no fsync", False, cri("A")),
            ("A-d", "CRI, auto (fdatasync)", False, cri("A-d")),
            ("A-wt", "CRI, written through, no fsync", False, cri("A-wt")),
            ("A-wt-d", "CRI, written through (fdatasync)", False, cri("A-wt-d")),
            ("A-nf", "CLI, auto, no fsync", False, runc(fsync=False)),
            ("A-cli", "CLI, auto (fdatasync)", False, runc(fsync=True)),
            ("A-nf-wt", "CLI, written through, no fsync", False, runc(fsync=False, hold=0)),
            ("A-cli-wt", "CLI, written through (fdatasync)", False, runc(fsync=True, hold=0)),
            ("A-enc", "CLI, auto, encrypted, no fsync", False, runc(fsync=False, encrypt=True)),
            ("A-enc-wt", "CLI, written through, encrypted, no fsync", False, runc(fsync=False, encrypt=True, hold=0)),
            ("A-stg", "CLI staged, auto (fdatasync)", False, runc(fsync=True, stream=False)),
            ("A-stg-nf", "CLI staged, auto, no fsync", False, runc(fsync=False, stream=False)),
            ("A-stg-nf-wt", "CLI staged, written through, no fsync", False, runc(fsync=False, stream=False, hold=0)),
            ("B", "B raw criu dump", True, lambda: p("runc", mib, lambda: self.run_B(mib))),
            ("C", "C runc checkpoint + tar", True, lambda: p("runc", mib, lambda: self.run_C(mib))),
            ("D", "D podman --export", True, lambda: p("podman", mib, lambda: self.run_D(mib))),
            ("A-slow", f"CRI, auto, no fsync, {slow}", False, lambda: cri("A", slow_out())()),
            ("A-wt-slow", f"CRI, written through, no fsync, {slow}", False, lambda: cri("A-wt", slow_out())()),
            ("A-nf-slow", f"CLI, auto, no fsync, {slow}", False, lambda: runc(fsync=False, base=slow_out())()),
            ("A-nf-wt-slow", f"CLI, written through, no fsync, {slow}", False, lambda: runc(fsync=False, hold=0, base=slow_out())()),
        ]

    def run(self, progress=lambda: None):
        for mib in self.sizes:
            self.start_containers(mib)
            variants = [v for v in self.variants(mib) if (not self.only or v[0] in self.only) and f"{mib}:{v[0]}" not in self.skip]
            for rnd in range(self.rounds):
                k = rnd % len(variants)
                for name, _, durable, fn in variants[k:] + variants[:k]:
                    r = fn()
                    self.record(mib, name, r, durable)
                    fw = r.get("frozen_written")
                    print(f"  {mib} MiB round {rnd + 1} {name}: {r['wall']:.3f}s pause {r.get('pause')} ms, frozen {r.get('frozen')}, "
                          f"written while frozen {fw if fw is None else f'{fw / MiB:.1f} MiB'}, rss {r.get('rss', 0) / MiB:.0f} MiB", file=sys.stderr, flush=True)
                progress()
            if not self.only or "A-xfs" in self.only:
                self.xfs(mib)
            self.stop_containers(mib)
            progress()

    def xfs(self, mib):
        """On a reflink XFS loop image, how many bytes the archive step writes
        (written through: held pages are written by the archive step itself)."""
        if not shutil.which("mkfs.xfs"):
            return
        mnt = f"{self.w}/xfs"
        if not os.path.ismount(mnt):
            os.makedirs(mnt, exist_ok=True)
            sh(f"truncate -s {max(8, 3 * max(self.sizes) // 1024 + 4)}G {self.w}/xfs.img && mkfs.xfs -q -f -m reflink=1 {self.w}/xfs.img && mount -o loop {self.w}/xfs.img {mnt}")
            os.makedirs(f"{mnt}/out", mode=0o700, exist_ok=True)
        r = self.run_A_cli(mib, True, base=f"{mnt}/out", hold=0)
        self.record(mib, "A-xfs", r)

    # --- report ---
    def med(self, mib, name, key="wall"):
        v = [r[key] for r in self.results.get((mib, name), []) if r.get(key) is not None]
        return (statistics.median(v), min(v), max(v)) if v else None

    def m(self, mib, name, key="wall"):
        """The median, or None."""
        x = self.med(mib, name, key)
        return x[0] if x else None

    def ratio(self, mib, a, b, key="wall", key_b=None, goal=None):
        x, y = self.m(mib, a, key), self.m(mib, b, key_b or key)
        if not x or not y:
            return "-"
        met = "" if goal is None else (" ✓" if x / y <= goal else " ✗")
        return f"{x / y:.2f}{met}"

    def report(self):
        tiny = lambda mib: mib or "tiny"
        rng = lambda m, f: "-" if not m else f"{m[0]:{f}} ({m[1]:{f}}–{m[2]:{f}})"
        mb = lambda m: "-" if m is None else f"{m / MiB:.0f}" if m >= MiB or m == 0 else f"{m / MiB:.2f}"
        # A median, with the range when the rounds differ (a round that wrote while frozen must show).
        mbr = lambda m: "-" if not m else mb(m[0]) if m[1] == m[2] else f"{mb(m[0])} ({mb(m[1])}–{mb(m[2])})"
        done = ", ".join(f"{tiny(mib)} MiB: {max((len(r) for (s, _), r in self.results.items() if s == mib), default=0)}" for mib in self.sizes)
        lines = [f"Medians (min–max) of the rounds run ({done} of {self.rounds}). Pause: the probe's longest gap inside the container. "
                 "Written while frozen / held: the shim's own count (the peers write everything while frozen). "
                 "Peak RSS: the command's maximum RSS (GNU time's %M, with the CRIU it waited for); for CRI the serve shim's VmHWM "
                 "during that checkpoint, and its VmRSS once the run settled.", "",
                 "| MiB | variant | pause ms | total s | durable s (with sync) | written while frozen MiB | held MiB | peak RSS MiB | shim RSS after MiB | tool's frozen ms | CRIU frozen ms | output bytes |",
                 "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for mib in self.sizes:
            for v, label, _, _ in self.variants(mib):
                if (mib, v) not in self.results:
                    continue
                m = lambda k: self.m(mib, v, k)
                fz = lambda x: "-" if x is None else f"{x:.0f}"
                lines.append(f"| {tiny(mib)} | {v}: {label} | {rng(self.med(mib, v, 'pause'), '.0f')} | {rng(self.med(mib, v), '.3f')} | "
                             f"{rng(self.med(mib, v, 'durable'), '.3f')} | {mbr(self.med(mib, v, 'frozen_written'))} | {mbr(self.med(mib, v, 'held'))} | {mb(m('rss'))} | "
                             f"{mb(m('rss_after'))} | {fz(m('tool'))} | {fz(m('frozen'))} | {fz(m('bytes'))} |")
        lines += ["", "Held (auto) against written through, same run. Goals (issue 21): pause ≤ 0.5× raw `criu dump` (B), total ≤ 1.2× written through.", "",
                  "| MiB | auto vs written through | pause auto / B | pause wt / B | pause auto / wt | total auto / wt | written while frozen, auto MiB |",
                  "|---|---|---|---|---|---|---|"]
        for mib in self.sizes:
            for a, wt, what in PAIRS:
                if (mib, a) in self.results or (mib, wt) in self.results:
                    lines.append(f"| {tiny(mib)} | {a} / {wt} ({what}) | {self.ratio(mib, a, 'B', 'pause', goal=0.5)} | {self.ratio(mib, wt, 'B', 'pause')} | "
                                 f"{self.ratio(mib, a, wt, 'pause')} | {self.ratio(mib, a, wt, goal=1.2)} | {mbr(self.med(mib, a, 'frozen_written'))} |")
        lines += ["", f"On the slow disk ({self.slow_mb:g} MB/s slowfs) against the same variant on the normal disk. Goal (issue 21): auto's pause ≤ 1.2× the normal disk's.", "",
                  "| MiB | slow / normal | pause normal ms | pause slow ms | pause slow / normal | total slow / normal | written while frozen, slow MiB |",
                  "|---|---|---|---|---|---|---|"]
        for mib in self.sizes:
            for s, n, what in SLOW_PAIRS:
                if (mib, s) in self.results:
                    pm = lambda v: rng(self.med(mib, v, "pause"), ".0f")
                    lines.append(f"| {tiny(mib)} | {s} / {n} ({what}) | {pm(n)} | {pm(s)} | {self.ratio(mib, s, n, 'pause', goal=1.2 if 'auto' in what else None)} | "
                                 f"{self.ratio(mib, s, n)} | {mbr(self.med(mib, s, 'frozen_written'))} |")
        lines += ["", "Against the peers (total time unless it says pause):", "",
                  "| MiB | A/B | A-nf/B | A-stg-nf/B | C/A | D/A | pause C/A | pause D/A | durable: C+sync / A-d | D+sync / A-d | A-cli / B+sync | A-enc / A-nf | XFS: bytes the archive step wrote / archive |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for mib in self.sizes:
            r = lambda a, b, k="wall", kb=None: self.ratio(mib, a, b, k, kb)
            x = self.results.get((mib, "A-xfs"), [{}])[0]
            xfs = f"{x['archive_wrote'] / x['bytes'] * 100:.2f}%" if x.get("bytes") else "-"
            lines.append(f"| {tiny(mib)} | {r('A', 'B')} | {r('A-nf', 'B')} | {r('A-stg-nf', 'B')} | {r('C', 'A')} | {r('D', 'A')} | {r('C', 'A', 'pause')} | "
                         f"{r('D', 'A', 'pause')} | {r('C', 'A-d', 'durable', 'wall')} | {r('D', 'A-d', 'durable', 'wall')} | {r('A-cli', 'B', 'wall', 'durable')} | "
                         f"{r('A-enc', 'A-nf')} | {xfs} |")
        lines += ["", "| serve shim | config | VmRSS idle, before any checkpoint, MiB | peak VmHWM of any checkpoint, MiB | VmRSS after its last checkpoint, MiB |", "|---|---|---|---|---|"]
        for name, s in self.shims.items():
            now = proc_status(s["proc"].pid, "VmRSS") if s["proc"].poll() is None else None
            lines.append(f"| {name} | `{self.shim_configs[name].strip().replace(chr(10), '; ') or '(defaults)'}` | {mb(s['idle'])} | {mb(s['peak'] or None)} | {mb(now)} |")
        return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="0,64,512,2048", help="MiB of touched memory, comma-separated (0: a tiny container)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", default="/var/tmp/ckpt-shim-bench")
    ap.add_argument("--out", help="also write the tables here")
    ap.add_argument("--only", help="run just these variants, comma-separated (e.g. A,A-wt,B)")
    ap.add_argument("--skip", default="", help="leave out these runs, comma-separated SIZE:VARIANT (e.g. 2048:C,2048:D)")
    ap.add_argument("--slow-mb", type=float, default=50, help="write rate of the slow disk (the -slow variants), MB/s")
    ap.add_argument("--probe-secs", type=float, help="how long the pause probe spins around each checkpoint "
                    "[default: 3 s + 1 s per 256 MiB]; it must outlast the checkpoint")
    a = ap.parse_args()
    b = Bench(a.work, [int(s) for s in a.sizes.split(",")], a.rounds, a.only.split(",") if a.only else None, a.slow_mb,
              [s for s in a.skip.split(",") if s], a.probe_secs)
    def progress():
        if a.out:
            open(a.out, "w").write(b.report() + "\n")
    try:
        b.setup()
        b.run(progress)
    finally:
        try:  # what was measured, also when interrupted (Ctrl-C)
            text = b.report()
            print(text)
            if a.out:
                open(a.out, "w").write(text + "\n")
        finally:
            b.teardown()


if __name__ == "__main__":
    main()
