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
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIM = f"{ROOT}/target/release/ckpt-shim"
CRICTL = f"{ROOT}/target/release/examples/cri-ctl"
PROXY_BENCH = f"{ROOT}/target/release/examples/proxy-bench"
PYTHON = "/var/cache/ckpt-shim/venv/bin/python3"


def sh(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise RuntimeError(f"{cmd}: {r.stderr.strip()}")
    return r.stdout


def go_client(work):
    out = f"{work}/go-cri"
    env = dict(os.environ, GO111MODULE="off", GOPATH="/usr/share/gocode", GOCACHE=f"{work}/go-cache")
    sh(["go", "build", "-o", out, "."], cwd=f"{ROOT}/hack/go-cri", env=env)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=2000, help="calls per method and path")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=3, help="per throughput slice")
    ap.add_argument("--work", default="/var/tmp/ckpt-shim-bench-proxy")
    a = ap.parse_args()
    w = a.work
    os.makedirs(w, exist_ok=True)
    shim = None
    try:
        sh(["bash", f"{ROOT}/hack/containerd.sh", "start", f"{w}/ctrd"])
        direct, via = f"{w}/ctrd/containerd.sock", f"{w}/shim/ckpt-shim.sock"
        shim = subprocess.Popen([SHIM, "serve", "--listen", via, "--upstream", f"unix://{direct}"],
                                stdout=subprocess.DEVNULL, stderr=open(f"{w}/shim.log", "w"))
        while not os.path.exists(via):
            time.sleep(0.05)
        pod, cid = sh([CRICTL, via, "run-counter", "proxy-bench", "1"]).split()
        go = go_client(w)
        results = []
        for name, cmd in [
            ("go", [go, "bench", direct, via, "-calls", str(a.calls), "-clients", str(a.clients), "-seconds", str(a.seconds)]),
            ("python", [PYTHON, f"{ROOT}/tests/py/cri_client.py", "--bench", direct, via, cid, str(a.calls)]),
            ("rust", [PROXY_BENCH, direct, via, "--calls", str(a.calls), "--clients", str(a.clients), "--seconds", str(a.seconds)]),
        ]:
            print(f"  {name} ...", file=sys.stderr, flush=True)
            r = json.loads(sh(cmd).strip().splitlines()[-1])
            r["client"] = name
            results.append(r)
        sh([CRICTL, via, "rm-pod", pod])
    finally:
        if shim:
            shim.terminate()
            shim.wait()
        subprocess.run(["bash", f"{ROOT}/hack/containerd.sh", "stop", f"{w}/ctrd"], capture_output=True)
        shutil.rmtree(w, ignore_errors=True)
    lines = ["| client | method | direct p50 / p99 µs | through the shim p50 / p99 µs | added p50 µs |", "|---|---|---|---|---|"]
    for r in results:
        for m in r["latency"]:
            lines.append(f"| {r['client']} | {m['method']} | {m['direct_p50_us']:.0f} / {m['direct_p99_us']:.0f} | "
                         f"{m['shim_p50_us']:.0f} / {m['shim_p99_us']:.0f} | {m['added_p50_us']:+.0f} |")
    lines += ["", f"| client | {a.clients} clients, direct calls/s | through the shim calls/s | fraction of direct |", "|---|---|---|---|"]
    for r in results:
        if "direct_calls_per_s" in r:
            lines.append(f"| {r['client']} | {r['direct_calls_per_s']:.0f} | {r['shim_calls_per_s']:.0f} | {r['shim_fraction_of_direct']:.2f} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
