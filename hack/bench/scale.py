#!/usr/bin/env python3
"""Scale-out benchmark: N restores of ONE checkpoint image started together. Not a test.

For each size (--mib, default 512 and 2048 MiB), a counter touching that much
incompressible memory is checkpointed through CRI and imported into containerd
as a checkpoint image (`ckpt-shim image --import`). Each round then runs, in an
order that rotates from round to round, for every N in 1 and --scale (16 only up
to --wide-max-mib):
  FULL-N  N restores of the image through CRI (CreateContainer + StartContainer
          in new pods): N pods made first (untimed), then every pod's
          CreateContainer + StartContainer at once (`cri-ctl restore-n`), timed
          until the last StartContainer is answered; every page is put in from
          the layer's blob before StartContainer answers
  LAZY-N  the same through a shim with lazy_pages = true: the pages are served
          from the layer's blob in containerd's content store as the process
          touches them, the rest pushed in the background (bounded per node)
  BESIDE  (LAZY-1 beside N-1 pushing) N-1 lazy restores at once (untimed), and
          once they all run, their pages still being pushed, one more, timed
Before each, the page cache is dropped (`echo 1 > /proc/sys/vm/drop_caches`), so
every restore starts cold, and after each, every restored counter is made to hash
its memory again (/tmp/verify; a mismatch fails the benchmark) and each page
source must have put every page in and exited cleanly.

Measured, per restore, from the moment the N CreateContainers are sent:
  created   its CreateContainer answered (the shim staged the restore, the
            runtime made the container; nothing runs yet)
  running   its StartContainer answered
  first     its first response: the counter's first line after the restore, as
            containerd's log timestamps it (CRIU's restore interrupts the
            counter's sleep, so it answers at once, touching its stack, heap and
            stdout's buffer)
  all in    its page source's last line ("every page in"), by the log's mtime
  CPU       the page sources' own CPU seconds (getrusage, in their logs), and
            the whole node's busy CPU seconds from the restores' start until
            every page is in (other users of the machine count in this one)
Disk: the whole work dir is a file system of its own on a loop device, so that
device's /sys/block/loopN/stat counts this benchmark's I/O only:
  read    bytes read from the device from the drop until every page is in and
          every memory hash is done: "read once" means about MIB MiB for N
          restores, as for one
"""
import argparse
import os
import re
import shutil
import statistics
import sys
import time
from datetime import datetime

from common import CRICTL, SHIM, run_bench, sh, text
from restore import RestoreBench

MIB = 1 << 20


ALL_IN = re.compile(r"every page in after (\d+) ms \(([\d.]+) s CPU\)")
RUNC = re.compile(r"page source ready after (\d+) ms, runc restore done after (\d+) ms")


def busy_seconds():
    """The node's CPU seconds spent on anything but idle and iowait, so far."""
    f = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return (sum(f) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK")


def first_line_at(log):
    """The wall-clock time containerd logged the container's first stdout line."""
    for line in text(log).splitlines():
        ts, stream, _tag, msg = (line.split(" ", 3) + ["", "", ""])[:4]
        if stream == "stdout" and msg.startswith("counter"):
            whole, _, frac = ts.partition(".")
            digits = "".join(ch for ch in frac if ch.isdigit())
            zone = frac[len(digits):]
            return datetime.fromisoformat(f"{whole}.{digits[:6]:0<6}{zone.replace('Z', '+00:00')}").timestamp()
    return None


class ScaleBench(RestoreBench):
    def __init__(self, work, sizes, scale, wide, wide_max_mib, rounds, only):
        super().__init__(work, sizes, rounds, only)
        self.scale, self.wide, self.wide_max_mib = scale, wide, wide_max_mib
        self.rows = {}  # (mib, variant) -> list of dicts

    def counts(self, mib):
        return [1, self.scale] + ([self.wide] if self.wide and mib <= self.wide_max_mib else [])

    def device_stat(self):
        """(bytes read, bytes written) so far on the work dir's loop device."""
        dev = os.path.basename(sh(["findmnt", "-no", "SOURCE", self.w]).strip())
        f = open(f"/sys/block/{dev}/stat").read().split()
        return int(f[2]) * 512, int(f[6]) * 512

    def image(self, mib):
        return f"localhost/ckpt-scale-{mib}:1"

    def prepare_image(self, mib):
        pod, cid = sh([CRICTL, self.sock, "run-counter", f"bench-orig-{mib}", str(mib)]).split()
        count = f"{self.rootfs(cid)}/tmp/count"
        deadline = time.time() + 300
        while not os.path.exists(count):
            if time.time() > deadline:
                raise RuntimeError("the counter did not start")
            time.sleep(0.2)
        ck = f"{self.w}/ck"
        os.makedirs(ck, mode=0o700, exist_ok=True)
        sh([CRICTL, self.sock, "checkpoint", cid, f"{ck}/cri.tar", "600"])
        sh([SHIM, "image", f"{ck}/cri.tar", self.image(mib)[len("localhost/"):], "--import", f"{self.w}/ctrd/containerd.sock"])
        # Only the image is restored from; the original and its archive go.
        sh([CRICTL, self.sock, "rm-pod", pod])
        os.remove(f"{ck}/cri.tar")
        shutil.rmtree(f"/tmp/cri-ctl-logs-bench-orig-{mib}", ignore_errors=True)

    def rootfs(self, cid):
        return f"{self.w}/ctrd/state/io.containerd.runtime.v2.task/k8s.io/{cid}/rootfs"

    def all_in(self, cid, deadline):
        """(wall-clock time every page was in, the page source's CPU seconds,
        ckpt-runc's ms from its start until the page source was ready and until
        runc restore was done)."""
        log = f"{self.restore_dir}/{cid}/work/lazy-serve.log"
        while time.time() < deadline and not ALL_IN.search(text(log)):
            time.sleep(0.05)
        m = ALL_IN.search(text(log))
        if not m:
            raise RuntimeError(f"{cid}: the restore did not get its pages: {text(log)!r}")
        r = RUNC.search(text(log))
        return os.stat(log).st_mtime, float(m.group(2)), (int(r.group(1)), int(r.group(2))) if r else (0, 0)

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

    def restore_n(self, sock, mib, n):
        """`cri-ctl restore-n` of n new pods at once; what it timed, and where the logs are."""
        prefix = f"s{self.n}"
        self.n += 1
        logs = [f"/tmp/cri-ctl-logs-{prefix}-{i}" for i in range(n)]
        for d in logs:
            shutil.rmtree(d, ignore_errors=True)
        out = sh([CRICTL, sock, "restore-n", prefix, str(n), self.image(mib)])
        t_end = time.time()
        lines = [line.split() for line in out.splitlines()]
        self.cleanups += [lambda p=p: sh([CRICTL, self.sock, "rm-pod", p], check=False) for p, *_ in lines[:-1]]
        self.cleanups += [lambda d=d: shutil.rmtree(d, ignore_errors=True) for d in logs]
        # Each line: pod, container, ms to its StartContainer answered, ms to its CreateContainer answered.
        return {"all": float(lines[-1][1]) / 1000, "each": [float(l[2]) / 1000 for l in lines[:-1]],
                "created": [float(l[3]) / 1000 for l in lines[:-1]], "cids": [l[1] for l in lines[:-1]], "logs": logs,
                # restore-n's clock started with the first CreateContainer
                "t0": t_end - float(lines[-1][1]) / 1000}

    def firsts(self, r, deadline):
        out = []
        for d in r["logs"]:
            at = None
            while at is None and time.time() < deadline:
                at = next((first_line_at(f"{d}/{f}") for f in os.listdir(d) if f.endswith(".log")), None)
                if at is None:
                    time.sleep(0.05)
            out.append(at - r["t0"])
        return out

    def one(self, mib, variant, n):
        """FULL-n, LAZY-n, or BESIDE-n: one lazy restore started once n - 1
        others run, their pages being pushed."""
        sock = self.sock if variant == "FULL" else self.sock_lazy
        sh("sync; echo 1 > /proc/sys/vm/drop_caches")
        r0, cpu0 = self.device_stat()[0], busy_seconds()
        others = self.restore_n(sock, mib, n - 1) if variant == "BESIDE" else {"cids": []}
        r = self.restore_n(sock, mib, 1 if variant == "BESIDE" else n)
        deadline = time.time() + 600
        ins = [self.all_in(c, deadline) for c in r["cids"]]
        cpu1 = busy_seconds()
        firsts = self.firsts(r, deadline)
        for c in others["cids"]:
            self.all_in(c, deadline)
        self.verify(r["cids"] + others["cids"], deadline)
        return {"all": r["all"], "each": r["each"], "created": r["created"], "first": firsts, "in": max(t for t, _, _ in ins) - r["t0"],
                "cpu_src": sum(c for _, c, _ in ins), "runc": [x for _, _, x in ins], "cpu_node": cpu1 - cpu0, "read": self.device_stat()[0] - r0}

    def run(self):
        self.cleanups = []
        variants = [v for v in ("FULL", "LAZY") if not self.only or v in self.only]
        for mib in self.sizes:
            self.prepare_image(mib)
            todo = [(v, n) for v in variants for n in self.counts(mib)]
            if "LAZY" in variants:
                todo.append(("BESIDE", self.scale))
            for rnd in range(self.rounds):
                k = rnd % len(todo)
                for v, n in todo[k:] + todo[:k]:
                    self.settle()
                    load = os.getloadavg()[0]
                    row = self.one(mib, v, n)
                    row["load"] = load
                    for c in self.cleanups:
                        c()
                    self.cleanups = []
                    self.rows.setdefault((mib, v, n), []).append(row)
                    print(f"  {mib} MiB round {rnd + 1} {v}-{n}: running {row['all']:.3f}s, first response max "
                          f"{max(row['first']):.3f}s, all in {row['in']:.3f}s, CPU {row['cpu_src']:.2f}s sources, "
                          f"{row['cpu_node']:.2f}s node, read {row['read'] / MIB:.0f} MiB, load {load:.1f}",
                          file=sys.stderr, flush=True)

    def med(self, key, f):
        rows = self.rows.get(key)
        return statistics.median(f(r) for r in rows) if rows else float("nan")

    def report(self):
        loads = [r["load"] for rows in self.rows.values() for r in rows]
        lines = [f"{self.rounds} rounds, medians over rounds; page cache dropped before each; "
                 f"load average (1 min) at the rounds' starts {min(loads, default=0):.1f}–{max(loads, default=0):.1f}", "",
                 "| MiB | variant | s to all running | s to running, each (median, max) | s to first response, each (median, max) | "
                 "first response / running (max) | s until every page in | CPU s: page sources, node | read, MiB | "
                 "ckpt-runc (max): page source ready, runc restore done, ms | CreateContainer answered (max), s |",
                 "|---|---|---|---|---|---|---|---|---|---|---|"]
        for (mib, v, n) in sorted(self.rows):
            k = (mib, v, n)
            label = f"LAZY-1 beside {n - 1} pushing" if v == "BESIDE" else f"{v}-{n}"
            each = lambda f: self.med(k, lambda r: f(r["each"]))
            first = lambda f: self.med(k, lambda r: f(r["first"]))
            ratio = self.med(k, lambda r: max(a / b for a, b in zip(r["first"], r["each"])))
            lines.append(f"| {mib} | {label} | {self.med(k, lambda r: r['all']):.3f} | {each(statistics.median):.3f}, {each(max):.3f} | "
                         f"{first(statistics.median):.3f}, {first(max):.3f} | {ratio:.2f} | {self.med(k, lambda r: r['in']):.3f} | "
                         f"{self.med(k, lambda r: r['cpu_src']):.2f}, {self.med(k, lambda r: r['cpu_node']):.2f} | "
                         f"{self.med(k, lambda r: r['read']) / MIB:.0f} | "
                         f"{self.med(k, lambda r: max(a for a, _ in r['runc'])):.0f}, {self.med(k, lambda r: max(b for _, b in r['runc'])):.0f} | "
                         f"{self.med(k, lambda r: max(r['created'])):.3f} |")
        lines += ["", "| MiB | N | FULL: N / 1, to all running | LAZY: N / 1, to all running (goal ≤ 3×) | "
                  "LAZY: read, N / 1 | LAZY-N: slowest restore to running, s | LAZY-1 beside N - 1 pushing: s to running |",
                  "|---|---|---|---|---|---|---|"]
        for mib in self.sizes:
            for n in self.counts(mib)[1:]:
                r = lambda v: self.med((mib, v, n), lambda x: x["all"]) / self.med((mib, v, 1), lambda x: x["all"])
                rd = self.med((mib, "LAZY", n), lambda x: x["read"]) / max(self.med((mib, "LAZY", 1), lambda x: x["read"]), 1)
                lines.append(f"| {mib} | {n} | {r('FULL'):.2f}× | {r('LAZY'):.2f}× | {rd:.2f} | "
                             f"{self.med((mib, 'LAZY', n), lambda x: max(x['each'])):.3f} | "
                             f"{self.med((mib, 'BESIDE', n), lambda x: x['all']):.3f} |".replace("nan", "-"))
        return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", default="512,2048", help="sizes, comma-separated")
    ap.add_argument("--scale", type=int, default=8, help="restores started together")
    ap.add_argument("--wide", type=int, default=16, help="and this many, at sizes up to --wide-max-mib (0: not)")
    ap.add_argument("--wide-max-mib", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--work", default="/var/tmp/ckpt-shim-bench-scale")
    ap.add_argument("--only", help="run just these kinds, comma-separated (FULL,LAZY)")
    ap.add_argument("--xfs", action="store_true", help="the work dir's file system is reflink XFS, not ext4")
    a = ap.parse_args()
    sizes = [int(m) for m in a.mib.split(",")]
    img = f"{a.work}.img"
    os.makedirs(a.work, exist_ok=True)
    mkfs = "mkfs.xfs -q -f -m reflink=1" if a.xfs else "mkfs.ext4 -q -F"
    sh(f"truncate -s {(max(a.scale, a.wide) + 4) * max(sizes) // 1024 + 8}G {img} && {mkfs} {img} && mount -o loop {img} {a.work}")
    b = ScaleBench(a.work, sizes, a.scale, a.wide, a.wide_max_mib, a.rounds, a.only.split(",") if a.only else None)
    # Lazily: a process that has not let go yet must not leave the mount behind.
    print(run_bench(b, after=lambda: sh(f"umount -l {a.work}; rm -f {img}; rmdir {a.work}", check=False)))


if __name__ == "__main__":
    main()
