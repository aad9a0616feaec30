#!/usr/bin/env python3
"""Restore benchmark: how long until a checkpointed counter runs again. Not a test.

For counters touching N MiB of incompressible memory, each round runs, in an
order that rotates from round to round:
  CRI     ckpt-shim through CRI: CreateContainer (the archive as the image) and
          StartContainer in a new pod, in front of containerd (its runc is
          ckpt-runc); timed from CreateContainer to StartContainer's answer.
          A full restore: its pages are put in from the archive before
          StartContainer answers. Also reported: CreateContainer's share, the
          page source's own times, what the shim wrote, and the memory check
  LAZY    the same as CRI, restored lazily (a shim with lazy_pages = true): the
          process runs before its memory is in; its pages are served from the
          archive. Also reported: until every page was pushed (lazy-serve's own
          time, from before the restore), and the memory check (the counter
          hashes its memory again; a mismatch fails the benchmark)
  IMG     the same through a checkpoint image: the CRI archive imported into
          containerd by `ckpt-shim image --import`, named by tag as the image;
          CreateContainer reads its layer back through containerd's content API
  R       `runc restore -d` of `runc checkpoint` images of a runc container,
          into a fresh overlay, until runc returns (the process runs)
  S       `ckpt-shim restore` of a `ckpt-shim checkpoint` archive of that runc
          container into a fresh overlay bundle
  P       `podman container restore --import` of a podman export (uncompressed)
Every restore starts from a checkpoint taken beforehand, read into the page cache
just before (CRI and LAZY: the archive; R: its images), and the restored container
is removed (untimed) before the next run.
With --xfs the whole work dir (archives, images, restore dir) is on a reflink XFS
loop image, where a restore shares the archive's extents instead of copying pages.
"""
import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

from checkpoint import Bench
from common import CRICTL, SHIM, run_bench, sh, text


def detached(cmd, stdout=None):
    """Runs `cmd` to its exit without holding pipes a restored process inherits."""
    with open(stdout or os.devnull, "w") as f:
        r = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        raise RuntimeError(f"{cmd}: exit status {r.returncode}: {text(stdout).strip() if stdout else ''}")


class RestoreBench(Bench):
    # Two serve shims in front of the same containerd: A restores in full (the
    # default), L lazily. A also takes the checkpoints and runs the counters.
    shim_configs = {"A": "durable = false\n", "L": "durable = false\nlazy_pages = true\n"}
    probed = False  # the counter alone: no pause is measured here

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.extra = {}

    def wants_slowfs(self):
        return False

    @property
    def sock(self):
        return self.shims["A"]["sock"]

    @property
    def sock_lazy(self):
        return self.shims["L"]["sock"]

    def prepare(self, mib):
        """Checkpoints of the kinds the variants run restore, taken once per size."""
        os.makedirs(f"{self.w}/ck-{mib}", mode=0o700, exist_ok=True)
        ck = f"{self.w}/ck-{mib}"
        want = lambda v: not self.only or v in self.only
        sh([CRICTL, self.sock, "checkpoint", self.cri_id, f"{ck}/cri.tar", "600"])
        if want("IMG"):
            sh([SHIM, "image", f"{ck}/cri.tar", f"ckpt-bench-{mib}:1", "--import", f"{self.w}/ctrd/containerd.sock"])
        if want("R"):
            sh(["runc", "--root", f"{self.w}/runc-state", "checkpoint", "--leave-running", "--image-path", f"{ck}/runc-img",
                "--work-path", f"{ck}/runc-work", f"runc-{mib}"])
        if want("S"):
            sh([SHIM, "checkpoint", "--runtime-root", f"{self.w}/runc-state", f"runc-{mib}", "--output", f"{ck}/shim.tar"])
        if want("P"):
            sh(self.podman + ["container", "checkpoint", "--leave-running", "--compress", "none", f"--export={ck}/podman.tar", f"pm-{mib}"])
        self.spec = f"{self.w}/runc-{mib}/config.json"

    def warm(self, v, paths):
        """Reads the checkpoint into the page cache, as every variant's is when it starts:
        on this VM a 2 GiB archive written a minute before was found half evicted."""
        files = []
        for p in paths:
            files += [os.path.join(d, f) for d, _, fs in os.walk(p) for f in fs] if os.path.isdir(p) else [p]
        for f in files:
            with open(f, "rb") as r:
                while r.read(8 << 20):
                    pass
        res = sh(["fincore", "-nb", "-o", "RES"] + files, check=False).split()
        size = sum(os.path.getsize(f) for f in files)
        print(f"    {v}: checkpoint {sum(int(r) for r in res) / max(size, 1):.0%} in the page cache", file=sys.stderr)

    def written(self, proc):
        """What a shim process has written (`write_bytes`: put into the page cache for the disk)."""
        io = dict(l.split(": ") for l in open(f"/proc/{proc.pid}/io").read().splitlines())
        return int(io["write_bytes"])

    def note(self, mib, key, value):
        self.extra.setdefault((mib, key), []).append(value)

    def verify(self, cid, deadline):
        """The restored counter hashes its memory again; a mismatch fails the benchmark."""
        root = f"{self.w}/ctrd/state/io.containerd.runtime.v2.task/k8s.io/{cid}/rootfs"
        open(f"{root}/tmp/verify", "w").close()
        while time.time() < deadline and not os.path.exists(f"{root}/tmp/verified"):
            time.sleep(0.05)
        verdict = text(f"{root}/tmp/verified").strip()
        if not verdict.startswith("ok"):
            raise RuntimeError(f"restored memory differs ({cid}): {verdict!r}")

    def breakdown(self, mib, v, log_path, cid):
        """CreateContainer's share (the shim's log) and, for a served restore, the page source's
        own times (its log), kept beside the variant's wall time."""
        m = re.findall(r"ms=(\d+) created a container to restore", text(log_path)) or \
            re.findall(r"created a container to restore.*?ms=(\d+)", text(log_path))
        if m:
            self.note(mib, f"{v}-create", int(m[-1]) / 1000)
        ls = text(f"{self.restore_dir}/{cid}/work/lazy-serve.log")
        m = re.search(r"page source ready after (\d+) ms, runc restore done after (\d+) ms", ls)
        if m:
            self.note(mib, f"{v}-ready", int(m.group(1)) / 1000)
            self.note(mib, f"{v}-runc", int(m.group(2)) / 1000)
        for line in re.findall(r"lazy-serve: pushed .*", ls):
            print(f"    {v}: {line}", file=sys.stderr)
        m = re.search(r"every page in after (\d+) ms", ls)
        if m:
            self.note(mib, f"{v}-all", int(m.group(1)) / 1000)

    def overlay(self, name):
        b = f"{self.w}/{name}"
        for d in ("upper", "work", "rootfs"):
            os.makedirs(f"{b}/{d}", exist_ok=True)
        sh(f"mount -t overlay overlay -o lowerdir={self.w}/image,upperdir={b}/upper,workdir={b}/work {b}/rootfs")
        return b

    def run_CRI(self, mib, image=None, sock=None, v="CRI"):
        image = image or f"{self.w}/ck-{mib}/cri.tar"
        s = self.shims["L" if sock == self.sock_lazy else "A"]
        shim = s["proc"]
        if os.path.exists(image):
            self.warm(v, [image])
        before = self.written(shim)
        pod, cid, ms = sh([CRICTL, sock or self.sock, "restore", f"r-{self.n}", image]).split()
        self.n += 1
        self.cleanups.append(lambda: sh([CRICTL, self.sock, "rm-pod", pod], check=False))
        self.last_cid = cid
        self.breakdown(mib, v, s["log"], cid)
        if v in ("CRI", "IMG"):
            self.verify(cid, time.time() + 120)
        # Pages still being pushed (lazy) are no part of the restore's own writes; the
        # page source writes nothing but its logs.
        self.note(mib, f"{v}-written", (self.written(shim) - before) / 2**20)
        return float(ms) / 1000

    def run_LAZY(self, mib):
        wall = self.run_CRI(mib, sock=self.sock_lazy, v="LAZY")
        cid = self.last_cid
        log = f"{self.restore_dir}/{cid}/work/lazy-serve.log"
        deadline = time.time() + 120
        while time.time() < deadline and "every page in after" not in text(log):
            time.sleep(0.05)
        m = re.search(r"every page in after (\d+) ms", text(log))
        if not m:
            raise RuntimeError(f"lazy restore did not serve its pages: {text(log)!r}")
        self.note(mib, "LAZY-all", int(m.group(1)) / 1000)
        self.verify(cid, deadline)
        return wall

    def run_IMG(self, mib):
        return self.run_CRI(mib, f"localhost/ckpt-bench-{mib}:1", v="IMG")

    def bundle(self, prefix, mib):
        """A fresh bundle for one restore: an overlay of the image and the runc
        container's spec, in a cgroup of its own. (name, bundle dir)."""
        name = f"{prefix}-{mib}-{self.n}"
        self.n += 1
        b = self.overlay(name)
        cfg = open(self.spec).read().replace(f"/ckpt-shim-bench/runc-{mib}", f"/ckpt-shim-bench/{name}")
        open(f"{b}/config.json", "w").write(cfg)
        return name, b

    def run_R(self, mib):
        name, b = self.bundle("rr", mib)
        # stdio on a pipe, as at checkpoint time; runc returns once the process runs.
        self.warm("R", [f"{self.w}/ck-{mib}/runc-img"])
        cmd = (f"cd {b} && exec runc --root {self.w}/runc-state restore -d --image-path {self.w}/ck-{mib}/runc-img "
               f"--work-path {b}/restore-work {name} </dev/null > >(exec cat >/dev/null 2>&1) 2>&1")
        # Before the restore: a failed one leaves its overlay too.
        self.cleanups.append(lambda: sh(f"runc --root {self.w}/runc-state kill {name} KILL; sleep 0.3; runc --root {self.w}/runc-state delete -f {name}; umount {b}/rootfs; rm -rf {b}", check=False))
        t = time.monotonic()
        detached(["setsid", "bash", "-c", cmd])
        return time.monotonic() - t

    def run_S(self, mib):
        # The runc container's own spec: the restore is held to it.
        name, b = self.bundle("rs", mib)
        # The restored process keeps the command's stdio: a file, not a pipe we wait on.
        out = f"{b}.out"

        def clean():  # registered before the restore: a failed one leaves its overlay too
            pid = re.search(r"as pid (\d+)", text(out))
            kill = f"kill -9 {pid.group(1)}; sleep 0.3; " if pid else ""
            sh(f"{kill}umount {b}/rootfs; rm -rf {b} {out}; find /sys/fs/cgroup/*/ckpt-shim-bench/{name} -depth -type d -exec rmdir {{}} \\; 2>/dev/null", check=False)
        self.cleanups.append(clean)
        t = time.monotonic()
        detached([SHIM, "restore", f"{self.w}/ck-{mib}/shim.tar", "--bundle", b, "--id", name], stdout=out)
        wall = time.monotonic() - t
        if not re.search(r"as pid (\d+)", text(out)):
            raise RuntimeError(f"ckpt-shim restore did not say which pid it restored: {text(out)!r}")
        return wall

    def run_P(self, mib):
        name = f"pr-{mib}-{self.n}"
        self.n += 1
        self.cleanups.append(lambda: sh(self.podman + ["rm", "-f", "-t", "0", name], check=False))
        t = time.monotonic()
        sh(self.podman + ["container", "restore", "--import", f"{self.w}/ck-{mib}/podman.tar", "--name", name])
        return time.monotonic() - t

    def run(self):
        self.cleanups = []
        self.times = {}
        for mib in self.sizes:
            self.start_containers(mib)
            self.prepare(mib)
            variants = [("CRI", self.run_CRI), ("LAZY", self.run_LAZY), ("IMG", self.run_IMG), ("R", self.run_R), ("S", self.run_S), ("P", self.run_P)]
            if self.only:
                variants = [v for v in variants if v[0] in self.only]
            for rnd in range(self.rounds):
                k = rnd % len(variants)
                for name, fn in variants[k:] + variants[:k]:
                    self.settle()
                    wall = fn(mib)
                    for c in self.cleanups:
                        c()
                    self.cleanups = []
                    self.times.setdefault((mib, name), []).append(wall)
                    print(f"  {mib} MiB round {rnd + 1} {name}: {wall:.3f}s", file=sys.stderr, flush=True)
            self.stop_containers(mib)
            shutil.rmtree(f"{self.w}/ck-{mib}", ignore_errors=True)

    def report(self):
        labels = {"CRI": "ckpt-shim via CRI (Create+Start)", "CRI-create": "… of it CreateContainer",
                  "CRI-ready": "… page source ready, from ckpt-runc's start", "CRI-runc": "… runc restore done, from ckpt-runc's start",
                  "CRI-all": "… every page in, from ckpt-runc's start",
                  "CRI-written": "… MiB written by the shim", "LAZY": "ckpt-shim via CRI, lazy (Create+Start)",
                  "LAZY-all": "… lazy: until every page was in", "LAZY-written": "… lazy: MiB written by the shim",
                  "IMG": "ckpt-shim via CRI, from a checkpoint image", "R": "runc restore -d", "S": "ckpt-shim restore (CLI)", "P": "podman restore --import"}
        self.times.update(self.extra)
        med = lambda mib, v: statistics.median(self.times[(mib, v)]) if (mib, v) in self.times else float("nan")
        rng = lambda mib, v: f"{min(self.times[(mib, v)]):.3f}–{max(self.times[(mib, v)]):.3f}" if (mib, v) in self.times else "-"
        lines = ["| MiB | variant | s (or MiB), median (min–max) |", "|---|---|---|"]
        for mib in self.sizes:
            for v, label in labels.items():
                if (mib, v) in self.times:
                    lines.append(f"| {mib} | {label} | {med(mib, v):.3f} ({rng(mib, v)}) |")
        lines += ["", "| MiB | CRI / runc restore | lazy / runc restore | runc restore / lazy | image / archive (CRI) | CLI / runc restore | podman / CRI |", "|---|---|---|---|---|---|---|"]
        for mib in self.sizes:
            r = lambda a, b: med(mib, a) / med(mib, b)
            lines.append(f"| {mib} | {r('CRI', 'R'):.2f} | {r('LAZY', 'R'):.2f} | {r('R', 'LAZY'):.1f}× | {r('IMG', 'CRI'):.2f} | {r('S', 'R'):.2f} | {r('P', 'CRI'):.2f} |")
        return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="64,512,2048")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", default="/var/tmp/ckpt-shim-bench-restore")
    ap.add_argument("--only", help="run just these variants, comma-separated (CRI,LAZY,IMG,R,S,P)")
    ap.add_argument("--xfs", action="store_true", help="put the work dir on a reflink XFS loop image")
    a = ap.parse_args()
    if a.xfs:
        img = f"{a.work}.xfs.img"
        os.makedirs(a.work, exist_ok=True)
        sh(f"truncate -s {max(8, 4 * max(int(x) for x in a.sizes.split(',')) // 1024 + 6)}G {img} && "
           f"mkfs.xfs -q -f -m reflink=1 {img} && mount -o loop {img} {a.work}")
    b = RestoreBench(a.work, [int(s) for s in a.sizes.split(",")], a.rounds, a.only.split(",") if a.only else None)
    def unmount():
        if a.xfs:
            sh(f"umount -l {a.work}; rm -f {a.work}.xfs.img; rmdir {a.work}", check=False)
    print(run_bench(b, after=unmount))


if __name__ == "__main__":
    main()
