#!/usr/bin/env python3
"""Calls in flight for a test to break the runtime under, on gRPC C-core:

    hold.py SOCK CONTAINER_ID

On one channel, an ExecSync that sleeps 30 s and a GetContainerEvents stream;
one JSON line each as they end ({"call", "code", "message", "events"}). Then,
once a line comes on stdin, a Version call on the same channel, and its line.
Messages are encoded by hand (no schema needed).
"""
import json
import sys
import threading

import grpc


def field(num, value):
    return bytes([num << 3 | 2, len(value)]) + value


# Both calls end at once when the runtime goes: print writes the text and the
# newline separately, so without the lock two threads' lines can interleave.
PRINT = threading.Lock()


def report(call, err=None, **extra):
    extra.update(call=call, code="OK" if err is None else err.code().name,
                 message="" if err is None else err.details())
    with PRINT:
        print(json.dumps(extra), flush=True)


def main():
    sock, cid = sys.argv[1:3]
    ch = grpc.insecure_channel("unix://" + sock)
    rt = "/runtime.v1.RuntimeService/"
    exec_sync = ch.unary_unary(rt + "ExecSync", request_serializer=None, response_deserializer=None)
    events = ch.unary_stream(rt + "GetContainerEvents", request_serializer=None, response_deserializer=None)

    def slow():
        req = field(1, cid.encode()) + field(2, b"sleep") + field(2, b"37") + bytes([3 << 3, 60])
        try:
            exec_sync(req, timeout=90)
            report("ExecSync")
        except grpc.RpcError as e:
            report("ExecSync", e)

    def stream():
        n = 0
        try:
            for _ in events(b"", timeout=90):
                n += 1
            report("GetContainerEvents", events=n)
        except grpc.RpcError as e:
            report("GetContainerEvents", e, events=n)

    threads = [threading.Thread(target=f) for f in (slow, stream)]
    for t in threads:
        t.start()
    print(json.dumps({"call": "started"}), flush=True)
    for t in threads:
        t.join()
    sys.stdin.readline()
    version = ch.unary_unary(rt + "Version", request_serializer=None, response_deserializer=None)
    try:
        version(field(1, b"v1"), timeout=30, wait_for_ready=True)
        report("Version")
    except grpc.RpcError as e:
        report("Version", e)


if __name__ == "__main__":
    main()
