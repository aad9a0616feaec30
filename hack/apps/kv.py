"""A key/value service on asyncio, for checkpoint tests (hack/build-app-images.sh
builds it into docker.io/library/ckpt-pykv). One request per line, one
answer per line, on TCP 127.0.0.1:PORT (argv[1], default 7379):

  SET key value   -> OK
  GET key         -> the value, or (nil)
  INCR key        -> the new integer value
  DBSIZE          -> how many keys
  DIGEST          -> sha256 over every key and value, sorted
  RUN             -> a 64-bit id drawn at start: the same id is the same process

Everything lives in this process's memory only.
"""
import asyncio
import hashlib
import secrets
import sys

RUN = secrets.randbits(63)
DATA = {}


def answer(words):
    cmd = words[0].upper() if words else ""
    if cmd == "SET" and len(words) >= 3:
        DATA[words[1]] = " ".join(words[2:])
        return "OK"
    if cmd == "GET" and len(words) == 2:
        return DATA.get(words[1], "(nil)")
    if cmd == "INCR" and len(words) == 2:
        n = int(DATA.get(words[1], "0")) + 1
        DATA[words[1]] = str(n)
        return str(n)
    if cmd == "DBSIZE":
        return str(len(DATA))
    if cmd == "DIGEST":
        h = hashlib.sha256()
        for k in sorted(DATA):
            h.update(f"{k}\0{DATA[k]}\n".encode())
        return h.hexdigest()
    if cmd == "RUN":
        return str(RUN)
    return "ERR unknown request"


async def client(reader, writer):
    try:
        while line := await reader.readline():
            writer.write((answer(line.decode().split()) + "\n").encode())
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def main(port):
    server = await asyncio.start_server(client, "127.0.0.1", port)
    print(f"listening on 127.0.0.1:{port} run={RUN}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 7379))
