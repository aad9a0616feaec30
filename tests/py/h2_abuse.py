#!/usr/bin/env python3
"""Malformed and adversarial HTTP/2 against a CRI socket, one fresh connection
per case, with a gRPC C-core client on its own channel calling Version after
each case to show that everyone else is still served.

    h2_abuse.py SOCK

Frames are built with h2's own layers (hyperframe for framing, hpack for header
blocks): h2's connection state machine refuses to send most of these. One JSON
line per case: {"case", "goaway": code|null, "last_stream", "reset": code|null,
"status": grpc-status|null, "after": grpc-status of a Version on the same
connection afterwards (reset cases) |null, "closed": bool, "version": the
parallel client's Version code}.
"""
import json
import socket
import struct
import sys

import grpc
import hpack
from hyperframe import frame as hf

RT = "/runtime.v1.RuntimeService/"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
VERSION_REQ = b"\x00\x00\x00\x00\x04\x0a\x02v1"  # gRPC-framed VersionRequest{version: "v1"}


def raw(kind, flags, stream, payload, length=None):
    """A frame with any type, flags and length field, whatever the payload."""
    n = len(payload) if length is None else length
    return struct.pack(">I", n)[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def request_fields(path=RT + "Version", extra=()):
    return [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "localhost"),
            ("content-type", "application/grpc"), ("te", "trailers")] + list(extra)


class Peer:
    def __init__(self, sock_path):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(2)
        self.s.connect(sock_path)
        self.enc = hpack.Encoder()
        self.dec = hpack.Decoder()
        self.dec.max_header_list_size = 1 << 24
        self.buf = b""
        self.closed = False

    def send(self, data):
        try:
            self.s.sendall(data)
        except OSError:
            self.closed = True

    def start(self):
        self.send(PREFACE + hf.SettingsFrame(0).serialize())

    def block(self, fields, huffman=True):
        return self.enc.encode(fields, huffman=huffman)

    def headers(self, stream, fields, end_stream=False):
        f = hf.HeadersFrame(stream, self.block(fields))
        f.flags.add("END_HEADERS")
        if end_stream:
            f.flags.add("END_STREAM")
        self.send(f.serialize())

    def data(self, stream, payload, end_stream=True):
        f = hf.DataFrame(stream, payload)
        if end_stream:
            f.flags.add("END_STREAM")
        self.send(f.serialize())

    def version(self, stream):
        self.headers(stream, request_fields())
        self.data(stream, VERSION_REQ)

    def frames(self):
        """Frames as they come, until the connection ends or goes quiet."""
        while True:
            while len(self.buf) >= 9:
                n = int.from_bytes(self.buf[:3], "big")
                if len(self.buf) < 9 + n:
                    break
                h, p = self.buf[:9], self.buf[9:9 + n]
                self.buf = self.buf[9 + n:]
                kind, flags, stream = h[3], h[4], int.from_bytes(h[5:9], "big") & 0x7FFFFFFF
                if kind == 0x4 and not flags & 1:
                    self.send(raw(0x4, 1, 0, b""))
                yield kind, flags, stream, p
            try:
                chunk = self.s.recv(65536)
            except (socket.timeout, OSError):
                return
            if not chunk:
                self.closed = True
                return
            self.buf += chunk

    def outcome(self, stream):
        """What became of `stream` (or of the connection): status, reset, goaway."""
        out = {"goaway": None, "last_stream": None, "reset": None, "status": None}
        block, block_flags, block_stream = b"", 0, 0
        for kind, flags, s, p in self.frames():
            if kind in (0x1, 0x9):
                # A header block, maybe in CONTINUATION frames: decoded whole.
                if kind == 0x1:
                    block, block_flags, block_stream = b"", flags, s
                block += p
                if not flags & 0x4:
                    continue
                fields = {k.decode(): v.decode() for k, v in self.dec.decode(block, raw=True)}
                if block_stream != stream:
                    continue
                if "grpc-status" in fields:
                    out["status"] = int(fields["grpc-status"])
                if block_flags & 1:
                    return out
            elif kind == 0x7:
                out["last_stream"], out["goaway"] = struct.unpack(">II", p[:8])
            elif kind == 0x3 and s == stream:
                out["reset"] = struct.unpack(">I", p[:4])[0]
                return out
        return out


def settings(*pairs):
    return b"".join(struct.pack(">HI", k, v) for k, v in pairs)


def huge_block(p, size):
    """HEADERS and CONTINUATION frames carrying a header list of `size` bytes."""
    block = p.block(request_fields(extra=[("x-big", "v" * size)]), huffman=False)
    chunks = [block[i:i + 16384] for i in range(0, len(block), 16384)]
    out = raw(0x1, 0, 1, chunks[0])
    for i, c in enumerate(chunks[1:], 1):
        out += raw(0x9, 0x4 if i == len(chunks) - 1 else 0, 1, c)
    return out


# Each case: (name, what it sends after the preface and SETTINGS, the stream to watch).
def case_list():
    def v(p, s):
        p.version(s)

    def padded_ok(p):
        block = p.block(request_fields())
        p.send(raw(0x1, 0x4 | 0x8, 1, bytes([10]) + block + b"\0" * 10))
        p.send(raw(0x0, 0x1 | 0x8, 1, bytes([20]) + VERSION_REQ + b"\0" * 20))

    def split_ok(p):
        block = p.block(request_fields())
        a, b, c = block[:5], block[5:12], block[12:]
        p.send(raw(0x1, 0, 1, a) + raw(0x9, 0, 1, b) + raw(0x9, 0x4, 1, c))
        p.data(1, VERSION_REQ)

    def unknown(p):
        p.send(raw(0x20, 0xff, 0, b"hello") + raw(0xfa, 0, 1, b"x"))
        p.version(1)

    def closed_then(kind):
        def f(p):
            p.version(1)
            p.outcome(1)
            if kind == "data":
                p.data(1, VERSION_REQ)
            else:
                p.headers(1, request_fields(), end_stream=True)
        return f

    def open_stream_then(extra):
        def f(p):
            p.headers(1, request_fields())
            p.send(extra)
        return f

    def send(b):
        return lambda p: p.send(b)

    def after_headers(b):
        """A stream opened (no END_STREAM), then `b`."""
        return open_stream_then(b)

    return [
        ("bad_preface", None, 1),
        ("settings_length_not_6n", send(raw(0x4, 0, 0, b"\0" * 5)), 1),
        ("settings_ack_with_payload", send(raw(0x4, 1, 0, b"\0" * 6)), 1),
        ("settings_on_a_stream", send(raw(0x4, 0, 1, b"")), 1),
        ("settings_enable_push_2", send(raw(0x4, 0, 0, settings((2, 2)))), 1),
        ("settings_max_frame_too_small", send(raw(0x4, 0, 0, settings((5, 100)))), 1),
        ("settings_window_too_large", send(raw(0x4, 0, 0, settings((4, 1 << 31)))), 1),
        ("settings_header_table_0", lambda p: (p.send(raw(0x4, 0, 0, settings((1, 0))))
                                                 , p.version(1)), 1),
        ("ping_7_bytes", send(raw(0x6, 0, 0, b"\0" * 7)), 1),
        ("ping_on_a_stream", send(raw(0x6, 0, 1, b"\0" * 8)), 1),
        ("goaway_4_bytes", send(raw(0x7, 0, 0, b"\0" * 4)), 1),
        ("rst_stream_3_bytes", after_headers(raw(0x3, 0, 1, b"\0" * 3)), 1),
        ("rst_stream_on_idle", send(raw(0x3, 0, 7, struct.pack(">I", 8))), 1),
        ("window_update_0_on_connection", send(raw(0x8, 0, 0, struct.pack(">I", 0))), 1),
        ("window_update_overflow", send(raw(0x8, 0, 0, struct.pack(">I", 0x7FFFFFFF)) * 2), 1),
        ("window_update_5_bytes", send(raw(0x8, 0, 0, b"\0" * 5)), 1),
        ("window_update_0_on_stream", after_headers(raw(0x8, 0, 1, struct.pack(">I", 0))), 1),
        ("priority_4_bytes", after_headers(raw(0x2, 0, 1, b"\0" * 4)), 1),
        ("data_on_stream_0", send(raw(0x0, 0x1, 0, b"x")), 1),
        ("data_on_idle_stream", send(raw(0x0, 0x1, 5, VERSION_REQ)), 5),
        ("data_on_closed_stream", closed_then("data"), 1),
        ("headers_on_closed_stream", closed_then("headers"), 1),
        ("headers_on_stream_0", send(raw(0x1, 0x5, 0, b"\x82")), 1),
        ("even_stream_id", lambda p: p.headers(2, request_fields(), end_stream=True), 2),
        ("push_promise_from_client", send(raw(0x5, 0x4, 1, struct.pack(">I", 2) + b"\x82")), 1),
        ("frame_over_max_frame_size", after_headers(raw(0x0, 0, 1, b"\0" * 20000)), 1),
        ("length_field_past_the_payload", after_headers(raw(0x0, 0x1, 1, VERSION_REQ, length=100) + b"\xff" * 200), 1),
        ("data_padding_too_long", after_headers(raw(0x0, 0x9, 1, bytes([40]) + b"x" * 10)), 1),
        ("headers_padding_too_long", lambda p: p.send(raw(0x1, 0xC, 1, bytes([200]) + p.block(request_fields()))), 1),
        ("padded_headers_and_data", padded_ok, 1),
        ("unknown_frame_types", unknown, 1),
        ("header_block_in_continuations", split_ok, 1),
        ("headers_then_data_inside_block", lambda p: p.send(raw(0x1, 0, 1, p.block(request_fields())) + raw(0x0, 1, 1, b"x")), 1),
        ("headers_then_ping_inside_block", lambda p: p.send(raw(0x1, 0, 1, p.block(request_fields())) + raw(0x6, 0, 0, b"\0" * 8)), 1),
        ("continuation_on_other_stream", lambda p: p.send(raw(0x1, 0, 1, p.block(request_fields())) + raw(0x9, 4, 3, b"\x82")), 1),
        ("continuation_alone", send(raw(0x9, 0x4, 1, b"\x82")), 1),
        ("bad_hpack_index", send(raw(0x1, 0x5, 1, b"\xff\xff\xff\xff\x0f")), 1),
        ("bad_hpack_table_update", send(raw(0x1, 0x5, 1, b"\x3f\xff\xff\xff\x0f")), 1),
        ("header_list_200_kib", lambda p: (p.send(huge_block(p, 200 << 10)), p.data(1, VERSION_REQ)), 1),
        ("header_list_2_mib", lambda p: p.send(huge_block(p, 2 << 20)), 1),
    ]


def run_case(sock_path, name, act, stream):
    p = Peer(sock_path)
    if act is None:
        p.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\0" * 24)
    else:
        p.start()
        act(p)
    out = p.outcome(stream)
    out["after"] = None
    if out["reset"] is not None and out["goaway"] is None:
        p.version(stream + 2)
        out["after"] = p.outcome(stream + 2)["status"]
    if out["goaway"] is not None:
        # Once a GOAWAY comes, the connection ends.
        for _ in p.frames():
            pass
    out["closed"] = p.closed
    out["case"] = name
    p.s.close()
    return out


def main():
    sock_path = sys.argv[1]
    ch = grpc.insecure_channel("unix://" + sock_path)
    version = ch.unary_unary(RT + "Version", request_serializer=None, response_deserializer=None)
    for name, act, stream in case_list():
        out = run_case(sock_path, name, act, stream)
        try:
            version(VERSION_REQ[5:], timeout=10)
            out["version"] = "OK"
        except grpc.RpcError as e:
            out["version"] = e.code().name
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
