#!/usr/bin/env python3
"""A CRI client on gRPC C-core (Python grpcio), with grpcio's default channel
options: from 1.57 on it sends the socket path, percent-encoded, as :authority.

    cri_client.py SOCK CONTAINER_ID LOCATION
    cri_client.py SOCK status
    cri_client.py --bench DIRECT_SOCK SHIM_SOCK CONTAINER_ID [CALLS]

The first prints one JSON line per call: Version, ListContainers,
GetContainerEvents (a server stream, read for up to 2 s), CheckpointContainer.
The second prints the runtime's conditions and the keys of its info.
The schema is compiled from cri_min.proto (beside this file) at run time.
The third (for hack/bench, not a test) times the same unary calls straight to
the runtime and through the shim, interleaved, and prints p50/p99 in µs as JSON.
"""
import json
import os
import subprocess
import sys
import tempfile

import grpc
from grpc_tools import protoc


def load_schema():
    here = os.path.dirname(os.path.abspath(__file__))
    out = tempfile.mkdtemp(prefix="cri-py-")
    rc = protoc.main(["protoc", f"-I{here}", f"--python_out={out}", f"--grpc_python_out={out}", "cri_min.proto"])
    if rc != 0:
        sys.exit("protoc failed")
    sys.path.insert(0, out)
    import cri_min_pb2, cri_min_pb2_grpc
    return cri_min_pb2, cri_min_pb2_grpc


def report(call, err=None, **extra):
    extra["call"] = call
    extra["code"] = "OK" if err is None else err.code().name
    extra["message"] = "" if err is None else err.details()
    print(json.dumps(extra), flush=True)


def status(stub, pb):
    """`cri_client.py SOCK status`: the runtime's conditions, as crictl info shows them."""
    s = stub.Status(pb.StatusRequest(verbose=True), timeout=10)
    conditions = [{"type": c.type, "status": c.status, "reason": c.reason, "message": c.message}
                  for c in s.status.conditions]
    print(json.dumps({"conditions": conditions, "info": sorted(s.info)}), flush=True)


def main():
    sock = sys.argv[1]
    pb, pbg = load_schema()
    stub = pbg.RuntimeServiceStub(grpc.insecure_channel("unix://" + sock))
    if sys.argv[2] == "status":
        return status(stub, pb)
    cid, location = sys.argv[2:4]
    try:
        v = stub.Version(pb.VersionRequest(version="v1"), timeout=10)
        report("Version", runtime_name=v.runtime_name)
    except grpc.RpcError as e:
        report("Version", e, runtime_name="")
    try:
        lc = stub.ListContainers(pb.ListContainersRequest(), timeout=10)
        report("ListContainers", containers=len(lc.containers))
    except grpc.RpcError as e:
        report("ListContainers", e, containers=0)
    events = 0
    try:
        for _ in stub.GetContainerEvents(pb.GetEventsRequest(), timeout=2):
            events += 1
        report("GetContainerEvents", events=events)
    except grpc.RpcError as e:
        report("GetContainerEvents", e, events=events)
    try:
        stub.CheckpointContainer(pb.CheckpointContainerRequest(container_id=cid, location=location, timeout=60), timeout=120)
        report("CheckpointContainer")
    except grpc.RpcError as e:
        report("CheckpointContainer", e)


def bench(direct, shim, cid, n):
    """Latency of unary calls; requests are pre-encoded protobuf bytes."""
    import time
    enc = lambda f, v: bytes([f << 3 | 2, len(v)]) + v
    calls = [("Version", "/runtime.v1.RuntimeService/Version", enc(1, b"v1")),
             ("Status", "/runtime.v1.RuntimeService/Status", b""),
             ("ListContainers", "/runtime.v1.RuntimeService/ListContainers", b""),
             ("ListImages", "/runtime.v1.ImageService/ListImages", b""),
             ("ContainerStatus", "/runtime.v1.RuntimeService/ContainerStatus", enc(1, cid.encode()))]
    chans = [grpc.insecure_channel("unix://" + s) for s in (direct, shim)]
    rows = []
    for name, path, req in calls:
        fns = [c.unary_unary(path, request_serializer=None, response_deserializer=None) for c in chans]
        times = ([], [])
        for i in range(n + 50):
            for k, fn in enumerate(fns):
                t = time.perf_counter()
                fn(req, timeout=10)
                if i >= 50:
                    times[k].append((time.perf_counter() - t) * 1e6)
        p = lambda v, q: sorted(v)[round((len(v) - 1) * q)]
        d50, s50 = p(times[0], 0.5), p(times[1], 0.5)
        rows.append(dict(method=name, direct_p50_us=d50, direct_p99_us=p(times[0], 0.99), shim_p50_us=s50,
                         shim_p99_us=p(times[1], 0.99), added_p50_us=s50 - d50))
    print(json.dumps(dict(client="python", latency=rows)))


if __name__ == "__main__":
    if sys.argv[1] == "--bench":
        bench(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]) if len(sys.argv) > 5 else 2000)
    else:
        main()
