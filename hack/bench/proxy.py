#!/usr/bin/env python3
"""Proxy benchmark: what ckpt-shim adds to calls it forwards. Not a test.

A private containerd with one counter pod, and ckpt-shim in front of it. The
same unary calls (Version, Status, ListContainers, ListImages, ContainerStatus)
go straight to containerd and through the shim, interleaved call by call, from
three clients that differ where it matters:
  go      grpc-go as the kubelet uses it (bare socket path as :authority)
  python  gRPC C-core (grpcio), percent-encoded path as :authority
  rust    tonic (h2), whose encoder never indexes :path
Then throughput: 32 clients (one connection each) calling in a loop, direct and
through the shim in alternating slices (go and rust; Python's GIL would be the
bottleneck, not the runtime). Prints markdown tables.

The shim's own CPU time (utime + stime of all its threads) is read between the
clients' phases and divided by the calls it relayed: one call at a time
(latency) and under the 32 clients (throughput). On a noisy machine that is the
steadier figure. `--shim PATH` (repeatable) runs every client against each
build in turn, each in front of the same containerd, to compare builds in one run.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

from common import CRICTL, PROXY_BENCH, ROOT, SHIM, TARGET, sh

PYTHON = "/var/cache/ckpt-shim/venv/bin/python3"


def cpu_seconds(pid):
    """utime + stime of every thread of `pid`, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_client(cmd, shim_pid, calls_per_run=None):
    """Runs a bench client; returns its result and the shim's CPU µs per
    call in each phase the client marks (see mark() in the clients). A client
    that marks nothing (Python) is one latency phase of `calls_per_run` calls."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    phases, last, result = {}, cpu_seconds(shim_pid), None
    for line in p.stdout:
        msg = json.loads(line)
        if "mark" not in msg:
            result = msg
            continue
        now = cpu_seconds(shim_pid)
        cpu, calls = phases.get(msg["mark"], (0.0, 0))
        phases[msg["mark"]] = (cpu + now - last, calls + msg["shim_calls"])
        last = now
    if p.wait() != 0 or result is None:
        raise RuntimeError(f"{cmd}: failed")
    if calls_per_run is not None:
        phases["latency"] = (cpu_seconds(shim_pid) - last, calls_per_run)
    result["shim_cpu_us_per_call"] = {k: cpu / calls * 1e6 for k, (cpu, calls) in phases.items() if calls}
    return result


def go_client(work):
    out = f"{work}/go-cri"
    # The build cache the tests use too (tests/common: go_client), kept between runs.
    env = dict(os.environ, GO111MODULE="off", GOPATH="/usr/share/gocode", GOCACHE=f"{TARGET}/tmp/go-cache")
    sh(["go", "build", "-o", out, "."], cwd=f"{ROOT}/tests/fixtures/go-cri", env=env)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=2000, help="calls per method and path")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=3, help="per throughput slice")
    ap.add_argument("--work", default="/var/tmp/ckpt-shim-bench-proxy")
    ap.add_argument("--only", default="go,python,rust", help="clients to run, comma-separated")
    ap.add_argument("--shim", action="append", help="ckpt-shim build(s) to measure [default: this tree's release build]")
    a = ap.parse_args()
    w = a.work
    builds = a.shim or [SHIM]
    os.makedirs(w, exist_ok=True)
    shims = []
    results = []
    try:
        sh(["bash", f"{ROOT}/hack/containerd.sh", "start", f"{w}/ctrd"])
        direct = f"{w}/ctrd/containerd.sock"
        for i, build in enumerate(builds):
            via = f"{w}/shim{i}/ckpt-shim.sock"
            shims.append((build, via, subprocess.Popen(
                [build, "serve", "--listen", via, "--upstream", f"unix://{direct}"],
                stdout=subprocess.DEVNULL, stderr=open(f"{w}/shim{i}.log", "w"))))
            while not os.path.exists(via):
                time.sleep(0.05)
        pod, cid = sh([CRICTL, shims[0][1], "run-counter", "proxy-bench", "1"]).split()
        go = go_client(w)
        n = str(a.calls)
        for name in a.only.split(","):
            for build, via, proc in shims:
                cmd, per_run = {
                    "go": ([go, "bench", direct, via, "-calls", n, "-clients", str(a.clients), "-seconds", str(a.seconds)], None),
                    "python": ([PYTHON, f"{ROOT}/tests/py/cri_client.py", "--bench", direct, via, cid, n], 5 * (a.calls + 50)),
                    "rust": ([PROXY_BENCH, direct, via, "--calls", n, "--clients", str(a.clients), "--seconds", str(a.seconds)], None),
                }[name]
                print(f"  {name} via {build} ...", file=sys.stderr, flush=True)
                r = run_client(cmd, proc.pid, per_run)
                r["client"] = name if len(shims) == 1 else f"{name} ({build})"
                results.append(r)
        sh([CRICTL, shims[0][1], "rm-pod", pod])
    finally:
        for _, _, proc in shims:
            proc.terminate()
            proc.wait()
        subprocess.run(["bash", f"{ROOT}/hack/containerd.sh", "stop", f"{w}/ctrd"], capture_output=True)
        shutil.rmtree(w, ignore_errors=True)
    print(tables(results, a.clients))


def tables(results, clients):
    lines = ["| client | method | direct p50 / p99 µs | through the shim p50 / p99 µs | added p50 µs | shim / direct p50 |",
             "|---|---|---|---|---|---|"]
    for r in results:
        for m in r["latency"]:
            lines.append(f"| {r['client']} | {m['method']} | {m['direct_p50_us']:.0f} / {m['direct_p99_us']:.0f} | "
                         f"{m['shim_p50_us']:.0f} / {m['shim_p99_us']:.0f} | {m['added_p50_us']:+.0f} | "
                         f"{m['shim_p50_us'] / m['direct_p50_us']:.2f} |")
    lines += ["", f"| client | {clients} clients, direct calls/s | through the shim calls/s | fraction of direct "
                  f"| shim CPU µs/call, one at a time | shim CPU µs/call, {clients} clients |", "|---|---|---|---|---|---|"]
    for r in results:
        cpu = r["shim_cpu_us_per_call"]
        cols = [f"{cpu[k]:.0f}" if k in cpu else "–" for k in ("latency", "throughput")]
        if "direct_calls_per_s" in r:
            lines.append(f"| {r['client']} | {r['direct_calls_per_s']:.0f} | {r['shim_calls_per_s']:.0f} | "
                         f"{r['shim_fraction_of_direct']:.2f} | {cols[0]} | {cols[1]} |")
        else:
            lines.append(f"| {r['client']} | – | – | – | {cols[0]} | – |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
