"""What every benchmark of hack/bench/ shares: where the repository and the
binaries are, and running a command.

The binaries are the release build (`hack/bench/run` builds them) unless
CKPT_BENCH_PROFILE names another cargo profile (`dev`: target/debug, as
tests/bench_smoke.rs runs them); CARGO_TARGET_DIR is honoured as cargo does.
"""
import json
import os
import re
import shutil
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROFILE = os.environ.get("CKPT_BENCH_PROFILE") or "release"
TARGET = os.path.join(ROOT, os.environ.get("CARGO_TARGET_DIR") or "target")
OUT = os.path.join(TARGET, "debug" if PROFILE == "dev" else PROFILE)
SHIM = os.path.join(OUT, "ckpt-shim")
CRICTL = os.path.join(OUT, "cri-ctl")  # hack/cri-client's cri-ctl, not cri-tools' crictl
SLOWFS = os.path.join(OUT, "slowfs")
PROXY_BENCH = os.path.join(OUT, "proxy-bench")


def sh(cmd, check=True, **kw):
    """Runs `cmd` (a list, or a string for the shell); its stdout. Raises with its
    stderr if it fails and `check`."""
    r = subprocess.run(cmd, shell=isinstance(cmd, str), capture_output=True, text=True, **kw)
    if check and r.returncode != 0:
        raise RuntimeError(f"{cmd}: {r.stderr.strip()}")
    return r.stdout


def read(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def text(path):
    """A log's text, without the colours a tracing log may carry."""
    return re.sub(r"\x1b\[[0-9;]*m", "", (read(path) or b"").decode(errors="replace"))


def crictl_path():
    """cri-tools' crictl: on PATH, else ../shared/bin/crictl beside the repository."""
    for p in (shutil.which("crictl"), os.path.join(ROOT, "../shared/bin/crictl")):
        if p and os.access(p, os.X_OK):
            return p
    raise SystemExit("crictl (cri-tools 1.34) is needed: put it on PATH or in ../shared/bin beside the repository "
                     "(https://github.com/kubernetes-sigs/cri-tools/releases)")


def run_bench(bench, after=lambda: None):
    """Sets `bench` up, runs it and returns its report. Whatever happens (a failure,
    Ctrl-C), then runs the clean-ups it registered (`bench.cleanups`), tears it
    down, and calls `after`."""
    try:
        bench.setup()
        bench.run()
        return bench.report()
    finally:
        try:
            for c in getattr(bench, "cleanups", []):
                c()
            bench.teardown()
        finally:
            after()


def crictl_pod(work, sock, name, ctr, tag):
    """A pod NAME (cgroup /ckpt-shim-bench/NAME, its own PID namespace per
    container) running the container CTR (a CRI config), made and started
    with crictl on the shim's socket SOCK; its JSON files in WORK, named by
    TAG. Returns (pod id, container id)."""
    pod = {"metadata": {"name": name, "uid": f"uid-{name}", "namespace": "default"}, "hostname": name,
           "log_directory": f"{work}/logs/{name}",
           "linux": {"cgroup_parent": f"/ckpt-shim-bench/{name}", "security_context": {"namespace_options": {"pid": 1}}}}
    ctr = dict(ctr, linux={"security_context": {"namespace_options": {"pid": 1}}})
    os.makedirs(pod["log_directory"], exist_ok=True)
    for what, obj in (("pod", pod), ("ctr", ctr)):
        with open(f"{work}/{what}-{tag}.json", "w") as f:
            json.dump(obj, f)
    cri = lambda *a: sh([crictl_path(), "--runtime-endpoint", f"unix://{sock}", "--timeout", "60s", *a]).strip()
    pod_id = cri("runp", f"{work}/pod-{tag}.json")
    cid = cri("create", pod_id, f"{work}/ctr-{tag}.json", f"{work}/pod-{tag}.json")
    cri("start", cid)
    return pod_id, cid


def criu_mount_maps(config, pid):
    """`criu dump`'s --ext-mount-map for what runc bind-mounts from the host
    into the container of init PID, whose OCI config is CONFIG (a dict): the
    masked paths (/dev/null over a file; a masked directory is a tmpfs CRIU
    dumps itself) and the cgroup mounts."""
    masked = set(config["linux"].get("maskedPaths", []))
    ext = []
    for line in open(f"/proc/{pid}/mountinfo"):
        pre, post = line.split(" - ")
        mp, fstype = pre.split()[4], post.split()[0]
        if mp in masked and not (fstype == "tmpfs" and pre.split()[3] == "/"):
            ext += ["--ext-mount-map", f"{mp}:/dev/null"]
        elif fstype == "cgroup":
            ext += ["--ext-mount-map", f"{mp}:{mp}"]
    return ext
