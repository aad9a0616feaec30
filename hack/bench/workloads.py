#!/usr/bin/env python3
"""Workloads benchmark: the pause that a real client sees. Not a test.

Issue 26's question: while a serving container is checkpointed (left running),
how long does a client working on it wait, through the shim against the peers?
Two workloads, each from the images of hack/build-app-images.sh:
  redis   redis-server holding --mib MiB of incompressible values (64000-byte
          values of a seeded PRNG, written with pipelined SETs), and a client
          on 2 connections doing SET then GET of a small key of its own, and
          every 10th time a GET of a stored value, each answer checked (the GET
          returns what was SET; the stored value is the PRNG's)
  nginx   nginx (a master, 2 workers) and a client on 4 kept-alive connections
          fetching its page, each answer checked (status 200, the page's
          bytes, the connection kept: a reconnect counts as an error)
The clients are this file run as `workloads.py client …` in the container's
network namespace (nsenter), outside the container: raw RESP over a socket for
redis, http.client for nginx, nothing of the shim's.

Each workload runs twice: in a pod through CRI (the image as it is, in front of
containerd whose runc is ckpt-runc), and as a runc container of the same image
(its command and environment, its root an overlay of the image's files), in a
network namespace of its own made beforehand and joined by path, as a pod's is.
Each round runs, in an order that rotates from round to round:
  SHIM    CheckpointContainer through CRI, on a `ckpt-shim serve` with the default
          config (empty: pages held, durable, established TCP dumped)
  RUNC    `runc checkpoint --leave-running --tcp-established` into a fresh dir,
          then `tar cf` of its images (what a user exporting it does)
  CRIU    `criu dump --leave-running --tcp-established` of the runc container:
          frozen through its freezer cgroup, its netns external, as runc has
          CRIU do it (`--freeze-cgroup --manage-cgroups=soft --file-locks
          --external net[INODE]:extRootNetNS`, the masked paths and cgroup
          mounts mapped with --ext-mount-map)
--tcp-established is needed for the peers: the client's connections are open,
and CRIU refuses an established connection without it. Every variant takes
CRIU's network lock (the shim because it dumps established connections by
default), so a request sent while it holds is dropped and sent again after
TCP's retransmission timeout (200 ms at least, then doubling).

For each run a fresh client connects, works for a second, then the checkpoint
runs (timed: its total, and for RUNC the dump alone), then the client works on
until every connection has been answered after it. The client reports its
longest gap between consecutive completed requests (over all its connections)
that overlaps the checkpoint, its longest gap in the second before (the noise
floor), its requests and errors. Each variant's frozen time is also split by
the timestamps of CRIU's dump.log (until the first pages, the pages, the rest,
the network unlock until the thaw): where the pause goes. Outputs go to a
fresh directory, and are
deleted and synced after each run, outside the timing. Not a test: it asserts
nothing (but an error a client counts is reported).
"""
import argparse
import http.client
import json
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import threading
import time

from checkpoint import Bench, frozen_ms, last_logged, stats_in_tar
from common import CRICTL, ROOT, SHIM, crictl_pod, criu_mount_maps, read, run_bench, sh, text

HERE = os.path.abspath(__file__)
APPS = ("redis", "nginx")
PORT = {"redis": 6379, "nginx": 8080}
CONNS = {"redis": 2, "nginx": 4}
VALUE = 64000  # bytes of a stored value: with its header, in jemalloc's 64 KiB class
PAGE = "/srv/www/index.html"
VARIANTS = [("SHIM", "ckpt-shim via CRI, default config"),
            ("RUNC", "`runc checkpoint --leave-running --tcp-established` + tar"),
            ("CRIU", "`criu dump --leave-running --tcp-established`")]


# --- the client, run in the container's network namespace ---
def value(seed, i):
    """Stored value i: VALUE bytes of a PRNG seeded by (seed, i), incompressible."""
    return random.Random(seed * 1_000_003 + i).randbytes(VALUE)


class Resp:
    """A RESP client on one TCP connection, one request at a time."""

    def __init__(self, port):
        self.s = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.f = self.s.makefile("rb")

    def send(self, *args):
        self.s.sendall(b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args))

    def reply(self):
        line = self.f.readline()
        if not line.endswith(b"\r\n"):
            raise ConnectionError("connection closed")
        kind, rest = line[:1], line[1:-2]
        if kind == b"-":
            raise RuntimeError(rest.decode())
        if kind in (b"+", b":"):
            return rest
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self.f.read(n + 2)[:-2]
        raise RuntimeError(f"unexpected reply {line[:40]!r}")

    def call(self, *args):
        self.send(*args)
        return self.reply()

    def close(self):
        self.s.close()


def redis_fill(port, mib, seed):
    """--mib MiB of values d:0… written with pipelined SETs, 64 at a time."""
    c, n = Resp(port), mib * (1 << 20) // VALUE
    for start in range(0, n, 64):
        batch = range(start, min(n, start + 64))
        for i in batch:
            c.send(b"SET", b"d:%d" % i, value(seed, i))
        for _ in batch:
            if c.reply() != b"OK":
                raise RuntimeError("SET failed")
    print(json.dumps({"keys": n, "rss": int(re.search(rb"used_memory_rss:(\d+)", c.call(b"INFO", b"memory")).group(1))}))


class Conn(threading.Thread):
    """One connection of the client: requests one after another, each completion
    time recorded and each answer checked; a failed one is counted, and the
    connection made again."""

    def __init__(self, app, k, args):
        super().__init__(daemon=True)
        self.app, self.k, self.a = app, k, args
        self.done, self.errors, self.first_error, self.stop = [], 0, None, False
        self.keys = args.mib * (1 << 20) // VALUE if app == "redis" else 0

    def fail(self, e):
        self.errors += 1
        self.first_error = self.first_error or f"{type(e).__name__}: {e}"
        time.sleep(0.01)

    def run(self):
        while not self.stop:
            try:
                (self.redis if self.app == "redis" else self.nginx)()
            except Exception as e:  # noqa: BLE001 (every failure is counted and reported)
                self.fail(e)

    def redis(self):
        c, i, own = Resp(PORT["redis"]), 0, b"c:%d:%d" % (self.k, random.getrandbits(32))
        try:
            while not self.stop:
                v = b"%d:%d" % (i, random.getrandbits(48))
                if c.call(b"SET", own, v) != b"OK":
                    raise RuntimeError("SET did not answer OK")
                self.done.append(time.monotonic())
                if c.call(b"GET", own) != v:
                    raise RuntimeError("GET did not return what was SET")
                self.done.append(time.monotonic())
                if i % 10 == 0 and self.keys:
                    d = random.randrange(self.keys)
                    if c.call(b"GET", b"d:%d" % d) != value(self.a.seed, d):
                        raise RuntimeError(f"GET d:{d} did not return the stored value")
                    self.done.append(time.monotonic())
                i += 1
        finally:
            c.close()

    def nginx(self):
        page = open(self.a.page, "rb").read()
        c = http.client.HTTPConnection("127.0.0.1", PORT["nginx"], timeout=30)
        c.connect()
        try:
            while not self.stop:
                c.request("GET", "/index.html")
                r = c.getresponse()
                body = r.read()
                if r.status != 200 or body != page:
                    raise RuntimeError(f"status {r.status}, {len(body)} bytes")
                if r.will_close or c.sock is None:
                    raise RuntimeError("the server closed the kept-alive connection")
                self.done.append(time.monotonic())
        finally:
            c.close()


def longest_gap(done, start, end):
    """The longest time between consecutive completions that overlaps [start, end], s."""
    gaps = [b - a for a, b in zip(done, done[1:]) if b > start and a < end]
    return max(gaps, default=None)


def client(app, a):
    """Works until told the checkpoint's window ("T0 T1" on stdin), then until every
    connection has completed a request after it (30 s at most); prints its verdict."""
    conns = [Conn(app, k, a) for k in range(CONNS[app])]
    for c in conns:
        c.start()
    deadline = time.monotonic() + 30
    while sum(len(c.done) for c in conns) < 50 and time.monotonic() < deadline:
        time.sleep(0.01)
    print("ready", flush=True)
    t0, t1 = map(float, sys.stdin.readline().split())
    deadline = time.monotonic() + 30
    while not all(c.done and c.done[-1] > t1 for c in conns) and time.monotonic() < deadline:
        time.sleep(0.01)
    late = sum(1 for c in conns if not (c.done and c.done[-1] > t1))
    for c in conns:
        c.stop = True
    done = sorted(t for c in conns for t in c.done)
    gap = longest_gap(done, t0, t1)
    print(json.dumps({"gap": gap, "before": longest_gap(done, t0 - 1.0, t0 - 0.001), "requests": len(done),
                      "during": sum(1 for t in done if t0 <= t <= t1), "errors": sum(c.errors for c in conns) + late,
                      "first_error": next((c.first_error for c in conns if c.first_error), None)
                      or (f"{late} connections unanswered 30 s after the checkpoint" if late else None)}), flush=True)
    os._exit(0)  # a connection may still be waiting on its socket


def client_main(argv):
    ap = argparse.ArgumentParser(prog="workloads.py client")
    ap.add_argument("app", choices=APPS + ("fill",))
    ap.add_argument("--mib", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--page", help="nginx: the page's file, as the client expects it")
    a = ap.parse_args(argv)
    if a.app == "fill":
        redis_fill(PORT["redis"], a.mib, a.seed)
    else:
        client(a.app, a)


# --- the benchmark ---
def criu_profile(log):
    """Where CRIU's frozen time went, from its dump.log's timestamps (s): seizing and
    collecting until the first task's pages, dumping pages (every task's, from
    "Dumping pages" to its "Dumping core"), the network unlock until the thaw,
    and the rest."""
    at = lambda l: float(l[1:l.index(")")])  # "(SS.UUUUUU) …", seconds since CRIU started
    lines = [l for l in (log or "").splitlines() if l.startswith("(")]
    frozen = next((at(l) for l in lines if "freezing cgroup" in l or "SEIZE " in l), None)
    thaw = next((at(l) for l in lines if "Unfreezing tasks" in l), None)
    if frozen is None or thaw is None:
        return {}
    pages, first, start = 0.0, None, None
    for l in lines:
        if "Dumping pages (type" in l:
            start = at(l)
            first = first if first is not None else start
        elif "Dumping core (pid" in l and start is not None:
            pages += at(l) - start
            start = None
    unlock = next((thaw - at(l) for l in lines if "Unlock network" in l), 0.0)
    before = (first if first is not None else frozen) - frozen
    return dict(p_before=before, p_pages=pages, p_unlock=unlock, p_rest=thaw - frozen - before - pages - unlock)


class WorkloadsBench(Bench):
    shim_configs = {"S": ""}  # the defaults
    probed = False

    def __init__(self, work, mib, rounds, apps, only):
        super().__init__(work, list(apps), rounds, only)
        self.mib, self.apps, self.seed = mib, apps, random.getrandbits(31)
        self.ctr = {}  # (app, "cri" | "runc") -> dict(net, pid, pod, cid)
        self.rows = {}  # (app, variant) -> list of dicts
        self.filled = {}  # app -> what the data set took (redis)
        self.netns = []  # the runc containers' network namespaces (ip netns)

    def setup(self):
        os.makedirs(f"{self.w}/bin", exist_ok=True)
        if not os.path.exists(f"{self.w}/bin/ckpt-runc"):
            os.symlink(SHIM, f"{self.w}/bin/ckpt-runc")
        self.restore_dir = f"{self.w}/restore"
        images = os.environ.get("CKPT_SHIM_IMAGES") or "/var/cache/ckpt-shim/images"
        sh(["bash", f"{ROOT}/hack/build-app-images.sh", images])
        env = dict(os.environ, CKPT_SHIM_IMAGES=f"{self.w}/images", CKPT_RUNC=f"{self.w}/bin/ckpt-runc",
                   CKPT_SHIM_RESTORE_DIR=self.restore_dir)
        sh(["bash", f"{ROOT}/hack/containerd.sh", "start", f"{self.w}/ctrd"], env=env)
        for name, toml in self.shim_configs.items():
            self.start_shim(name, toml)
        for app in self.apps:
            sh(["ctr", "--address", f"{self.w}/ctrd/containerd.sock", "-n", "k8s.io", "images", "import", f"{images}/{app}-oci.tar"])
            # The image's files and config, for the runc container.
            sh(["skopeo", "copy", "-q", f"oci-archive:{images}/{app}-oci.tar", f"oci:{self.w}/oci-{app}:latest"])
            sh(["umoci", "unpack", "--image", f"{self.w}/oci-{app}:latest", f"{self.w}/image-{app}"])

    # --- the containers ---
    def start_cri(self, app):
        ctr = {"metadata": {"name": app}, "image": {"image": f"docker.io/library/ckpt-{app}:latest"}, "log_path": f"{app}.log"}
        pod_id, cid = crictl_pod(self.w, self.shims["S"]["sock"], f"wl-{app}", ctr, app)
        pid = int(open(f"{self.w}/ctrd/state/io.containerd.runtime.v2.task/k8s.io/{cid}/init.pid").read())
        return dict(pod=pod_id, cid=cid, pid=pid, net=f"/proc/{pid}/ns/net",
                    page=f"{self.w}/ctrd/state/io.containerd.runtime.v2.task/k8s.io/{cid}/rootfs{PAGE}")

    def start_runc(self, app):
        """The image's command in a runc container on an overlay of its files, in a
        network namespace of its own (loopback up), joined by path as a pod's is."""
        b, name = f"{self.w}/runc-{app}", f"runc-{app}"
        for d in ("upper", "work", "rootfs"):
            os.makedirs(f"{b}/{d}", exist_ok=True)
        sh(f"mount -t overlay overlay -o lowerdir={self.w}/image-{app}/rootfs,upperdir={b}/upper,workdir={b}/work {b}/rootfs")
        netns = f"ckb-{os.getpid()}-{app}"
        sh(f"ip netns add {netns} && ip -n {netns} link set lo up")
        self.netns.append(netns)
        image = json.load(open(f"{self.w}/image-{app}/config.json"))["process"]
        sh(["runc", "spec", "--bundle", b])
        cfg = json.load(open(f"{b}/config.json"))
        cfg["process"].update(terminal=False, args=image["args"], env=image["env"], cwd=image.get("cwd") or "/")
        cfg["root"]["readonly"] = False
        cfg["linux"]["cgroupsPath"] = f"/ckpt-shim-bench/{name}"
        for ns in cfg["linux"]["namespaces"]:
            if ns["type"] == "network":
                ns["path"] = f"/var/run/netns/{netns}"
        json.dump(cfg, open(f"{b}/config.json", "w"))
        # stdio on a pipe, as containerd's is (CRIU cannot dump a host file's fd).
        subprocess.Popen(["setsid", "sh", "-c", f"cd {b} && runc --root {self.w}/runc-state run -d {name} </dev/null 2>&1 | cat >/dev/null"])
        deadline = time.time() + 30
        while not os.path.exists(f"{self.w}/runc-state/{name}/state.json"):
            if time.time() > deadline:
                raise RuntimeError(f"{name} did not start")
            time.sleep(0.05)
        time.sleep(0.2)
        pid = json.load(open(f"{self.w}/runc-state/{name}/state.json"))["init_process_pid"]
        return dict(pid=pid, net=f"/var/run/netns/{netns}", netns=netns, name=name, bundle=b, page=f"{b}/rootfs{PAGE}")

    def client_cmd(self, net, *args):
        return ["nsenter", f"--net={net}", sys.executable, "-B", HERE, "client", *args]

    def wait_serving(self, app, c):
        """Until the server accepts a connection on its port."""
        probe = f"import socket; socket.create_connection(('127.0.0.1', {PORT[app]}), timeout=1).close()"
        deadline = time.time() + 60
        while subprocess.run(["nsenter", f"--net={c['net']}", sys.executable, "-c", probe], capture_output=True).returncode:
            if time.time() > deadline:
                raise RuntimeError(f"{app} did not serve in 60 s")
            time.sleep(0.2)

    def start_app(self, app):
        for kind, start in (("cri", self.start_cri), ("runc", self.start_runc)):
            c = self.ctr[(app, kind)] = start(app)
            self.wait_serving(app, c)
            if app == "redis":
                t = time.monotonic()
                r = json.loads(sh(self.client_cmd(c["net"], "fill", "--mib", str(self.mib), "--seed", str(self.seed))))
                self.filled[kind] = dict(r, secs=time.monotonic() - t)
                print(f"  redis ({kind}): {r['keys']} values written in {time.monotonic() - t:.1f} s, "
                      f"used_memory_rss {r['rss'] / 2**20:.0f} MiB", file=sys.stderr, flush=True)

    def stop_app(self, app):
        c = self.ctr.pop((app, "cri"), None)
        if c:
            sh([CRICTL, self.shims["S"]["sock"], "rm-pod", c["pod"]], check=False)
        r = self.ctr.pop((app, "runc"), None)
        if r:
            sh(f"runc --root {self.w}/runc-state kill {r['name']} KILL; sleep 0.3; runc --root {self.w}/runc-state delete -f {r['name']}; "
               f"umount {r['bundle']}/rootfs", check=False)

    def teardown(self):
        for app in self.apps:
            self.stop_app(app)
        super().teardown()
        for n in self.netns:
            sh(["ip", "netns", "delete", n], check=False)

    # --- one checkpoint of each variant ---
    def run_SHIM(self, app, d):
        s, c = self.shims["S"], self.ctr[(app, "cri")]
        t = time.monotonic()
        sh([CRICTL, s["sock"], "checkpoint", c["cid"], f"{d}/a.tar", "600"])
        total = time.monotonic() - t
        line = [l for l in text(s["log"]).splitlines() if "checkpointed" in l and c["cid"] in l][-1]
        print(f"    SHIM: {line[line.index('checkpointed'):]}", file=sys.stderr)
        with tarfile.open(f"{d}/a.tar") as t:
            log = t.extractfile("dump.log").read().decode(errors="replace")
        return dict(total=total, frozen=last_logged(s["log"], "frozen_ms"), criu=frozen_ms(stats_in_tar(f"{d}/a.tar")),
                    held=last_logged(s["log"], "pages_held"), frozen_written=last_logged(s["log"], "frozen_written"),
                    **criu_profile(log))

    def run_RUNC(self, app, d):
        r = self.ctr[(app, "runc")]
        t = time.monotonic()
        sh(["runc", "--root", f"{self.w}/runc-state", "checkpoint", "--leave-running", "--tcp-established",
            "--image-path", f"{d}/img", "--work-path", f"{d}/work", r["name"]])
        dump = time.monotonic() - t
        sh(["tar", "cf", f"{d}/c.tar", "-C", f"{d}/img", "."])
        return dict(total=time.monotonic() - t, dump=dump, criu=frozen_ms(read(f"{d}/work/stats-dump")),
                    **criu_profile(text(f"{d}/work/dump.log")))

    def run_CRIU(self, app, d):
        r = self.ctr[(app, "runc")]
        for sub in ("img", "work"):
            os.makedirs(f"{d}/{sub}")
        cmd = ["criu", "dump", "-t", str(r["pid"]), "-D", f"{d}/img", "-W", f"{d}/work", "--leave-running", "--tcp-established",
               "--root", f"{r['bundle']}/rootfs", "--freeze-cgroup", f"/sys/fs/cgroup/freezer/ckpt-shim-bench/{r['name']}",
               "--manage-cgroups=soft", "--file-locks", "--external", f"net[{os.stat(r['net']).st_ino}]:extRootNetNS",
               "-v4", "-o", "dump.log"] + criu_mount_maps(json.load(open(f"{r['bundle']}/config.json")), r["pid"])
        t = time.monotonic()
        if subprocess.run(cmd, capture_output=True).returncode:
            errors = [l for l in text(f"{d}/work/dump.log").splitlines() if "Error" in l]
            raise RuntimeError(f"criu dump failed: {' / '.join(errors[-3:])}")
        return dict(total=time.monotonic() - t, criu=frozen_ms(read(f"{d}/work/stats-dump")), **criu_profile(text(f"{d}/work/dump.log")))

    def one(self, app, v):
        """A fresh client at work across one checkpoint of variant v: the row."""
        c = self.ctr[(app, "cri" if v == "SHIM" else "runc")]
        args = ["--mib", str(self.mib), "--seed", str(self.seed)] if app == "redis" else ["--page", c["page"]]
        cl = subprocess.Popen(self.client_cmd(c["net"], app, *args), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            if cl.stdout.readline().strip() != "ready":
                raise RuntimeError(f"the {app} client did not start")
            time.sleep(1.0)  # the noise floor, before
            d = self.fresh()
            t0 = time.monotonic()
            row = getattr(self, f"run_{v}")(app, d)
            t1 = time.monotonic()
            cl.stdin.write(f"{t0} {t1}\n")
            cl.stdin.flush()
            verdict = json.loads(cl.stdout.readline())
        finally:
            cl.kill()
            cl.wait()
        row.update(verdict)
        shutil.rmtree(d, ignore_errors=True)
        return row

    def run(self):
        variants = [v for v, _ in VARIANTS if not self.only or v in self.only]
        for app in self.apps:
            self.start_app(app)
            for rnd in range(self.rounds):
                k = rnd % len(variants)
                for v in variants[k:] + variants[:k]:
                    self.settle()
                    row = self.one(app, v)
                    self.rows.setdefault((app, v), []).append(row)
                    gap = row["gap"] and f"{row['gap'] * 1e3:.0f} ms"
                    print(f"  {app} round {rnd + 1} {v}: gap {gap} (before {row['before'] and row['before'] * 1e3:.0f} ms), "
                          f"total {row['total']:.3f} s, {row['during']} requests during, {row['errors']} errors"
                          + (f" ({row['first_error']})" if row["first_error"] else ""), file=sys.stderr, flush=True)
            self.stop_app(app)

    # --- report ---
    def med(self, app, v, key):
        xs = [r[key] for r in self.rows.get((app, v), []) if r.get(key) is not None]
        return (statistics.median(xs), min(xs), max(xs)) if xs else None

    def ratio(self, app, a, b, key, goal=None):
        x, y = self.med(app, a, key), self.med(app, b, key)
        if not x or not y or not y[0]:
            return "-"
        return f"{x[0] / y[0]:.2f}" + ("" if goal is None else " ✓" if x[0] / y[0] <= goal else " ✗")

    def label(self, app):
        return f"redis, {self.mib} MiB" if app == "redis" else "nginx"

    def report(self):
        rng = lambda m, scale, f: "-" if not m else f"{m[0] * scale:{f}} ({m[1] * scale:{f}}–{m[2] * scale:{f}})"
        one = lambda m, scale, f: "-" if not m else f"{m[0] * scale:{f}}"
        done = ", ".join(f"{a}: {min((len(self.rows.get((a, v), [])) for v, _ in VARIANTS if (a, v) in self.rows), default=0)}"
                         for a in self.apps)
        lines = [f"Medians (min–max) of the rounds run ({done} of {self.rounds}). Gap: the client's longest time between two "
                 "completed requests overlapping the checkpoint; before: its longest in the second before. Total: the "
                 "checkpoint's wall time (SHIM: CheckpointContainer's answer, its archive fdatasync'd; RUNC: dump + tar, "
                 "nothing synced). Frozen: the shim's own figure for SHIM, CRIU's frozen_time for the peers. "
                 f"Connections: redis {CONNS['redis']}, nginx {CONNS['nginx']}.", "",
                 "| workload | variant | client's longest gap ms | gap before ms | total s | of it dump s | frozen ms | "
                 "requests during | errors |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for app in self.apps:
            for v, what in VARIANTS:
                if (app, v) not in self.rows:
                    continue
                m = lambda k: self.med(app, v, k)
                errors = sum(r["errors"] for r in self.rows[(app, v)])
                frozen = m("frozen") or m("criu")
                lines.append(f"| {self.label(app)} | {v}: {what} | {rng(m('gap'), 1e3, '.0f')} | {one(m('before'), 1e3, '.1f')} | "
                             f"{rng(m('total'), 1, '.3f')} | {one(m('dump'), 1, '.3f')} | "
                             f"{one(frozen, 1, '.0f')} | {one(m('during'), 1, '.0f')} | {errors} |")
        lines += ["", "Where the frozen time went, from CRIU's dump.log (medians, ms): seizing and collecting until the first "
                  "pages; dumping pages (for SHIM into the shim's held tmpfs, for the peers into the page cache); the rest "
                  "(core, files, namespaces; for SHIM also the shim's own steps at CRIU's action hooks); the network "
                  "unlock until the thaw.", "",
                  "| workload | variant | until pages | pages | rest | network unlock → thaw |", "|---|---|---|---|---|---|"]
        for app in self.apps:
            for v, _ in VARIANTS:
                if (app, v) in self.rows:
                    p = lambda k: one(self.med(app, v, k), 1e3, ".0f")
                    lines.append(f"| {self.label(app)} | {v} | {p('p_before')} | {p('p_pages')} | {p('p_rest')} | {p('p_unlock')} |")
        lines += ["", "Against the peers, same run (medians). Goal (issue 26): the client's gap through the shim ≤ 0.5× "
                  "`runc checkpoint`'s, at 1 GiB.", "",
                  "| workload | gap SHIM / RUNC | gap SHIM / CRIU | total SHIM / RUNC (dump + tar) | total SHIM / CRIU |",
                  "|---|---|---|---|---|"]
        for app in self.apps:
            if any((app, v) in self.rows for v, _ in VARIANTS):
                lines.append(f"| {self.label(app)} | {self.ratio(app, 'SHIM', 'RUNC', 'gap', goal=0.5)} | {self.ratio(app, 'SHIM', 'CRIU', 'gap')} | "
                             f"{self.ratio(app, 'SHIM', 'RUNC', 'total')} | {self.ratio(app, 'SHIM', 'CRIU', 'total')} |")
        return "\n".join(lines)


def main():
    if sys.argv[1:2] == ["client"]:
        return client_main(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=1024, help="MiB of values in redis")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--apps", default="redis,nginx", help="the workloads, comma-separated (redis,nginx)")
    ap.add_argument("--only", help="run just these variants, comma-separated (SHIM,RUNC,CRIU)")
    ap.add_argument("--work", default="/var/tmp/ckpt-shim-bench-workloads")
    a = ap.parse_args()
    apps = [x for x in a.apps.split(",") if x]
    if not set(apps) <= set(APPS):
        raise SystemExit(f"--apps: {a.apps}: the workloads are {','.join(APPS)}")
    b = WorkloadsBench(a.work, a.mib, a.rounds, apps, a.only.split(",") if a.only else None)
    print(run_bench(b))


if __name__ == "__main__":
    main()
