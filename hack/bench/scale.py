#!/usr/bin/env python3
"""Scale-out benchmark: N restores of ONE checkpoint image started together. Not a test.

A counter touching MIB MiB of incompressible memory is checkpointed through CRI
and imported into containerd as a checkpoint image (`ckpt-shim image --import`).
Each round then runs, in an order that rotates from round to round:
  FULL-1  one restore of the image through CRI (CreateContainer + StartContainer
          in a new pod), every page put in from the layer's blob before
          StartContainer answers
  FULL-N  N restores of it: N pods made first (untimed), then every pod's
          CreateContainer + StartContainer at once (`cri-ctl restore-n`),
          timed until the last StartContainer is answered
  LAZY-1, LAZY-N  the same through a shim with lazy_pages = true: the pages are
          served from the layer's blob in containerd's content store
Before each, the page cache is dropped (`echo 1 > /proc/sys/vm/drop_caches`), so
every restore starts cold, and after each, every restored counter is made to hash
its memory again (/tmp/verify; a mismatch fails the benchmark) and, for lazy
restores, each page source must have pushed every page and exited cleanly.

Disk: the whole work dir (containerd's root and content store, the restore dirs,
the image's rootfs) is a file system of its own on a loop device (ext4 as the
host's; --xfs for reflink XFS), so that device's /sys/block/loopN/stat counts
this benchmark's I/O only, not the other users of the machine's disk:
  read    bytes read from the device from the drop until every page is in
          (lazy) and every memory hash is done: the pages' reads from the
          layer; "read once" means about MIB MiB for N restores, as for one
  written bytes written to the device, after `sync`, from the start of the
          restores until after the memory hashes
  dirtied `write_bytes` of the ckpt-shim serve process in /proc/PID/io: what
          it wrote into the page cache (a full restore's pages copied into
          the restore dir), whether or not that reached the disk; a restore
          dir removed before writeback cancels its pages' writes (the shim's
          cancelled_write_bytes), which is why "written" can stay small
"""
import argparse
import os
import re
import statistics
import sys
import time

from common import CRICTL, SHIM, sh, text
from restore import RestoreBench

MIB = 1 << 20


class ScaleBench(RestoreBench):
    def __init__(self, work, mib, n, rounds, only):
        super().__init__(work, [mib], rounds, only)
        self.mib, self.scale = mib, n
        self.rows = {}  # variant -> list of dicts

    def device_stat(self):
        """(bytes read, bytes written) so far on the work dir's loop device."""
        dev = os.path.basename(sh(["findmnt", "-no", "SOURCE", self.w]).strip())
        f = open(f"/sys/block/{dev}/stat").read().split()
        return int(f[2]) * 512, int(f[6]) * 512

    def shim_written(self, proc):
        io = dict(line.split(": ") for line in open(f"/proc/{proc.pid}/io").read().splitlines())
        return int(io["write_bytes"])

    def counter_started(self):
        self.cri_pod, self.cri_id = sh([CRICTL, self.sock, "run-counter", "bench-orig", str(self.mib)]).split()
        count = f"{self.w}/ctrd/state/io.containerd.runtime.v2.task/k8s.io/{self.cri_id}/rootfs/tmp/count"
        deadline = time.time() + 120
        while not os.path.exists(count):
            if time.time() > deadline:
                raise RuntimeError("the counter did not start")
            time.sleep(0.2)

    def prepare_image(self):
        ck = f"{self.w}/ck"
        os.makedirs(ck, mode=0o700, exist_ok=True)
        sh([CRICTL, self.sock, "checkpoint", self.cri_id, f"{ck}/cri.tar", "600"])
        sh([SHIM, "image", f"{ck}/cri.tar", "ckpt-scale:1", "--import", f"{self.w}/ctrd/containerd.sock"])
        # Only the image is restored from; the original and its archive go.
        sh([CRICTL, self.sock, "rm-pod", self.cri_pod])
        os.remove(f"{ck}/cri.tar")

    def rootfs(self, cid):
        return f"{self.w}/ctrd/state/io.containerd.runtime.v2.task/k8s.io/{cid}/rootfs"

    def lazy_done(self, cid, deadline):
        """Seconds from the page source's start until every page was pushed."""
        log = f"{self.restore_dir}/{cid}/work/lazy-serve.log"
        while time.time() < deadline and "lazy pages in the checkpoint" not in text(log):
            time.sleep(0.05)
        m = re.search(r"pages: (\d+) .* after (\d+) ms; daemon exit status: 0", text(log))
        if not m:
            raise RuntimeError(f"{cid}: lazy restore did not serve its pages: {text(log)!r}")
        return int(m.group(2)) / 1000

    def verify(self, cids, deadline):
        for cid in cids:
            open(f"{self.rootfs(cid)}/tmp/verify", "w").close()
        for cid in cids:
            done = f"{self.rootfs(cid)}/tmp/verified"
            while time.time() < deadline and not os.path.exists(done):
                time.sleep(0.05)
            verdict = text(done).strip()
            if not verdict.startswith("ok"):
                raise RuntimeError(f"{cid}: memory differs after the restore: {verdict!r}")

    def one(self, variant):
        lazy, n = variant.startswith("LAZY"), (1 if variant.endswith("-1") else self.scale)
        sock, proc = (self.sock_lazy, self.shims["L"]["proc"]) if lazy else (self.sock, self.shims["A"]["proc"])
        sh("sync; echo 1 > /proc/sys/vm/drop_caches")
        r0, w0, s0 = *self.device_stat(), self.shim_written(proc)
        out = sh([CRICTL, sock, "restore-n", f"s{self.n}", str(n), "localhost/ckpt-scale:1"])
        self.n += 1
        lines = [line.split() for line in out.splitlines()]
        pods = [p for p, _, _ in lines[:-1]]
        cids = [c for _, c, _ in lines[:-1]]
        self.cleanups += [lambda p=p: sh([CRICTL, self.sock, "rm-pod", p], check=False) for p in pods]
        row = {"all": float(lines[-1][1]) / 1000, "each": [float(ms) / 1000 for _, _, ms in lines[:-1]]}
        deadline = time.time() + 300
        if lazy:
            row["pages in"] = max(self.lazy_done(c, deadline) for c in cids)
        self.verify(cids, deadline)
        r1 = self.device_stat()[0]
        sh("sync")
        w1 = self.device_stat()[1]
        row.update(read=r1 - r0, written=w1 - w0, shim_w=self.shim_written(proc) - s0)
        return row

    def run(self):
        self.cleanups = []
        self.counter_started()
        self.prepare_image()
        variants = [v for v in ("FULL-1", "FULL-N", "LAZY-1", "LAZY-N") if not self.only or v in self.only]
        for rnd in range(self.rounds):
            k = rnd % len(variants)
            for v in variants[k:] + variants[:k]:
                self.settle()
                row = self.one(v)
                for c in self.cleanups:
                    c()
                self.cleanups = []
                self.rows.setdefault(v, []).append(row)
                print(f"  round {rnd + 1} {v}: {row['all']:.3f}s, read {row['read'] / MIB:.0f} MiB, "
                      f"written {row['written'] / MIB:.0f} MiB, shim dirtied {row['shim_w'] / MIB:.0f} MiB; each: {' '.join(f'{x:.2f}' for x in sorted(row['each']))}",
                      file=sys.stderr, flush=True)

    def report(self):
        n = self.scale
        med = lambda v, k: statistics.median(r[k] for r in self.rows[v]) if v in self.rows else float("nan")
        span = lambda v: f"{min(r['all'] for r in self.rows[v]):.3f}–{max(r['all'] for r in self.rows[v]):.3f}" if v in self.rows else "-"
        mib = lambda b: f"{b / MIB:.0f}"
        lines = [f"{self.mib} MiB counter, one checkpoint image, {self.rounds} rounds, medians; page cache dropped before each",
                 "", "| variant | s to all running (min–max) | pages all in, s | read from disk, MiB | written to disk, MiB | dirtied by the shim, MiB |",
                 "|---|---|---|---|---|---|"]
        for v in ("FULL-1", "FULL-N", "LAZY-1", "LAZY-N"):
            label = v.replace("-N", f"-{n}")
            pages = f"{med(v, 'pages in'):.3f}" if v.startswith("LAZY") and v in self.rows else "-"
            lines.append(f"| {label} | {med(v, 'all'):.3f} ({span(v)}) | {pages} | {mib(med(v, 'read'))} | "
                         f"{mib(med(v, 'written'))} | {mib(med(v, 'shim_w'))} |")
        lines += ["", f"| | {n} together / one | read, {n} / one | per restore: written to disk, MiB (alone, of {n}) | per restore: dirtied by the shim, MiB (alone, of {n}) |", "|---|---|---|---|---|"]
        for kind in ("FULL", "LAZY"):
            one, many = f"{kind}-1", f"{kind}-N"
            lines.append(f"| {kind} | {med(many, 'all') / med(one, 'all'):.2f}× | {med(many, 'read') / max(med(one, 'read'), 1):.2f} | "
                         f"{mib(med(one, 'written'))}, {mib(med(many, 'written') / n)} | {mib(med(one, 'shim_w'))}, {mib(med(many, 'shim_w') / n)} |")
        return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--scale", type=int, default=8, help="restores started together")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--work", default="/var/tmp/ckpt-shim-bench-scale")
    ap.add_argument("--only", help="run just these variants, comma-separated (FULL-1,FULL-N,LAZY-1,LAZY-N)")
    ap.add_argument("--xfs", action="store_true", help="the work dir's file system is reflink XFS, not ext4")
    a = ap.parse_args()
    img = f"{a.work}.img"
    os.makedirs(a.work, exist_ok=True)
    mkfs = "mkfs.xfs -q -f -m reflink=1" if a.xfs else "mkfs.ext4 -q -F"
    sh(f"truncate -s {(a.scale + 4) * a.mib // 1024 + 8}G {img} && {mkfs} {img} && mount -o loop {img} {a.work}")
    b = ScaleBench(a.work, a.mib, a.scale, a.rounds, a.only.split(",") if a.only else None)
    try:
        b.setup()
        b.run()
        out = b.report()
    finally:
        for c in getattr(b, "cleanups", []):
            c()
        b.teardown()
        # Lazily: a process that has not let go yet must not leave the mount behind.
        sh(f"umount -l {a.work}; rm -f {img}; rmdir {a.work}", check=False)
    print(out)


if __name__ == "__main__":
    main()
