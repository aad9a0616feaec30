#!/usr/bin/env python3
"""Pod checkpoint benchmark (not a test: it asserts nothing). Every variant in the same run.

For a pod of N containers (N = 2 and 4 by default), each touching M MiB of
incompressible memory (tests/fixtures/workloads/counter.c, 64 MiB by default), each round
runs, in an order that rotates from round to round:
  POD      CheckpointPod of every container (the cut: all frozen, dumped in parallel, all thawed)
  POD-1    CheckpointPod with parallel-dumps=1 (the same cut, one dump at a time)
  POD-2    (pods of more than 2) parallel-dumps=2, one dump a vCPU here
  POD-h    CheckpointPod with hold-pages-mib (each container's pages held in memory
           during the pause, written after the thaw)
  SEQ      CheckpointContainer of each container, one after the other
and after them RestorePod of that round's POD checkpoint into a new pod, then
StartContainer of each (each is restored then), timed to all running.
The pause is seen from inside: every container also runs tests/fixtures/workloads/ticker.c,
which wakes every millisecond and logs each gap over 5 ms with its CLOCK_MONOTONIC
start and end. A variant's pod pause is the longest gap any container saw during
the call; `one` is the median of the containers' own gaps in SEQ (one container
checkpointed alone). Totals are the wall time of the call(s). One shim, default
settings, in front of a private containerd whose runc is ckpt-runc.
Prints a markdown table.
  sudo hack/bench/run pods [--pods 2,4] [--mib 64] [--rounds 3]
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time

from common import CRICTL as CTL
from common import ROOT, SHIM, crictl_path, sh


class Bench:
    def __init__(self, work, mib):
        self.w, self.mib, self.crictl = work, mib, crictl_path()
        self.sock = f"{work}/shim/ckpt-shim.sock"
        self.n = 0

    def setup(self):
        os.makedirs(f"{self.w}/bin")
        os.symlink(SHIM, f"{self.w}/bin/ckpt-runc")
        env = dict(os.environ, CKPT_RUNC=f"{self.w}/bin/ckpt-runc", CKPT_SHIM_RESTORE_DIR=f"{self.w}/restore")
        sh(["bash", f"{ROOT}/hack/containerd.sh", "start", f"{self.w}/ctrd"], env=env)
        self.shim = subprocess.Popen([SHIM, "serve", "--listen", self.sock, "--upstream", f"unix://{self.w}/ctrd/containerd.sock",
                                      "--restore-dir", f"{self.w}/restore"],
                                     stdout=subprocess.DEVNULL, stderr=open(f"{self.w}/shim.log", "w"))
        while not os.path.exists(self.sock):
            time.sleep(0.05)
        for d in ("probe", "probe-restored"):
            os.makedirs(f"{self.w}/{d}")
            sh(["cc", "-O2", "-static", "-o", f"{self.w}/{d}/ticker", f"{ROOT}/tests/fixtures/workloads/ticker.c"])

    def teardown(self):
        self.shim.terminate()
        self.shim.wait()
        sh(["bash", f"{ROOT}/hack/containerd.sh", "stop", f"{self.w}/ctrd"], check=False)
        sh(["sh", "-c", "find /sys/fs/cgroup/*/ckpt-shim-bench-pods -depth -type d -exec rmdir {} \\; 2>/dev/null"], check=False)

    def cri(self, *args):
        return sh([self.crictl, "--runtime-endpoint", f"unix://{self.sock}", "--timeout", "600s", *args]).strip()

    def ctl(self, *args):
        return sh([CTL, self.sock, *args])

    def write(self, name, obj):
        path = f"{self.w}/{name}.json"
        json.dump(obj, open(path, "w"))
        return path

    def pod_config(self, name):
        os.makedirs(f"{self.w}/logs/{name}", exist_ok=True)
        return self.write(f"pod-{name}", {
            "metadata": {"name": name, "uid": f"uid-{name}", "namespace": "bench"}, "hostname": name,
            "log_directory": f"{self.w}/logs/{name}",
            "linux": {"cgroup_parent": f"/ckpt-shim-bench-pods/{name}",
                      "security_context": {"namespace_options": {"pid": 1}}}})

    def container_config(self, name, probe):
        script = f"/probe/ticker /probe/{name}.gaps & exec /bin/counter /tmp/count {self.mib} 1000"
        return self.write(f"c-{name}-{os.path.basename(probe)}", {
            "metadata": {"name": name}, "image": {"image": "docker.io/library/ckpt-counter:latest"},
            "command": ["/bin/sh", "-c", script], "log_path": f"{name}.log",
            "mounts": [{"container_path": "/probe", "host_path": probe}],
            "linux": {"security_context": {"namespace_options": {"pid": 1}}}})

    def make_pod(self, n):
        name = f"pod{n}"
        pod_json = self.pod_config(name)
        pod = self.cri("runp", pod_json)
        ids, names = [], [f"c{n}-{i}" for i in range(n)]
        for c in names:
            cid = self.cri("create", pod, self.container_config(c, f"{self.w}/probe"), pod_json)
            self.cri("start", cid)
            ids.append(cid)
        rootfs = f"{self.w}/ctrd/state/io.containerd.runtime.v2.task/k8s.io"
        for cid in ids:  # memory touched once the first count is written
            while not os.path.exists(f"{rootfs}/{cid}/rootfs/tmp/count"):
                time.sleep(0.1)
        time.sleep(0.5)
        return pod, ids, names

    def gaps(self, names, window, probe="probe"):
        # (A container that saw no gap over 5 ms has no file yet.)
        """Each container's longest gap within `window` (ns, CLOCK_MONOTONIC), in ms."""
        out = []
        for n in names:
            best = 0
            path = f"{self.w}/{probe}/{n}.gaps"
            for line in (open(path).read() if os.path.exists(path) else "").split("\n"):
                if not line.strip():
                    continue
                s, e = map(int, line.split())
                if s >= window[0] and e <= window[1]:
                    best = max(best, e - s)
            out.append(best / 1e6)
        return out

    def fresh(self):
        self.n += 1
        d = f"{self.w}/out/run-{self.n}"
        os.makedirs(d, mode=0o700)
        return d

    def timed(self, fn):
        sh(["sync"])
        t0 = time.monotonic_ns()
        fn()
        t1 = time.monotonic_ns()
        time.sleep(0.2)  # the probes log the gap's end as they wake
        return t0, t1

    def run_pod(self, pod, names, parallel=None, hold=False):
        d = self.fresh()
        opts = [] if parallel is None else ["--option", f"parallel-dumps={parallel}"]
        opts += ["--option", f"hold-pages-mib={self.mib + 16}"] if hold else []
        t0, t1 = self.timed(lambda: self.ctl("checkpointp", pod, "--export", d, *opts))
        g = self.gaps(names, (t0, t1))
        return dict(pause=max(g), total=(t1 - t0) / 1e6, dir=d)

    def run_seq(self, ids, names):
        d = self.fresh()
        t0, t1 = self.timed(lambda: [self.ctl("checkpoint", cid, f"{d}/{cid}.tar", "600") for cid in ids])
        g = self.gaps(names, (t0, t1))
        return dict(pause=max(g), one=statistics.median(g), total=(t1 - t0) / 1e6, dir=d)

    def run_restore(self, ckpt, names, k):
        pod_json = self.pod_config(f"restored-{k}")
        configs = []
        for n in names:
            configs += ["--container-config", self.container_config(n, f"{self.w}/probe-restored")]
        t0 = time.monotonic()
        lines = self.ctl("restorep", ckpt, "--config", pod_json, *configs).split("\n")
        for line in lines[1:]:
            if line.strip():
                self.ctl("start", line.split()[1])
        total = (time.monotonic() - t0) * 1e3
        self.ctl("rm-pod", lines[0].strip())
        return total

    def clean(self, r):
        shutil.rmtree(r["dir"], ignore_errors=True)
        sh(["sync"])


def parallel_of(variant):
    """POD-k: parallel-dumps=k; other variants take the default."""
    k = variant.removeprefix("POD-")
    return int(k) if k.isdigit() else None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pods", default="2,4")
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="ckpt-shim-bench-pods.", dir="/var/tmp")
    b = Bench(work, a.mib)
    rows = []
    try:
        b.setup()
        for n in map(int, a.pods.split(",")):
            pod, ids, names = b.make_pod(n)
            order = ["POD", "POD-1"] + (["POD-2"] if n > 2 else []) + ["POD-h", "SEQ"]
            res = {v: [] for v in order + ["restore"]}
            for k in range(a.rounds):
                rot = order[k % len(order):] + order[:k % len(order)]
                for v in rot:
                    r = (b.run_seq(ids, names) if v == "SEQ" else
                         b.run_pod(pod, names, parallel_of(v), hold=v == "POD-h"))
                    if v == "POD":
                        res["restore"].append(b.run_restore(r["dir"], names, f"{n}-{k}"))
                    res[v].append(r)
                    b.clean(r)
            one = statistics.median(r["one"] for r in res["SEQ"])
            for v in order:
                med = lambda key: statistics.median(r[key] for r in res[v])
                rows.append((n, v, med("pause"), med("pause") / one, med("total"),
                             statistics.median(res["restore"]) if v == "POD" else None))
            rows.append((n, "one", one, 1.0, None, None))
            b.cri("stopp", pod)
            b.cri("rmp", pod)
    finally:
        b.teardown()
        shutil.rmtree(work, ignore_errors=True)
    print(f"{a.mib} MiB per container, {a.rounds} rounds, medians; pause: the longest gap any container saw, from inside\n")
    print("| pod | variant | pause ms | × one | total ms | restore → running ms |")
    print("|---|---|---|---|---|---|")
    fmt = lambda x: "" if x is None else f"{x:.0f}"
    for n, v, pause, ratio, total, restore in rows:
        print(f"| {n} | {v} | {fmt(pause)} | {ratio:.2f} | {fmt(total)} | {fmt(restore)} |")


if __name__ == "__main__":
    main()
