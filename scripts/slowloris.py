#!/usr/bin/env python3
# A slow-client flood against meshwatch's HTTP listener, to watch it keep answering:
#   scripts/slowloris.py HOST PORT N
# opens N connections that each send a request one byte every 5 s and never finish it, and
# every 5 s for 40 s prints how many are open and whether GET /healthz is answered.
import asyncio, resource, sys, time

hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
opened = failed = ended = 0


async def slow():
    global opened, failed, ended
    try:
        r, w = await asyncio.open_connection(host, port)
    except OSError:
        failed += 1
        return
    opened += 1
    try:
        for ch in b"GET /healthz HTTP/1.1\r\nHost: x\r\n":
            w.write(bytes([ch]))
            await w.drain()
            await asyncio.sleep(5)
            if r.at_eof():
                break
    except OSError:
        pass
    ended += 1


async def probe(tag):
    t = time.time()
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
        w.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        await w.drain()
        line = await asyncio.wait_for(r.readline(), 5)
        print(f"{tag}: /healthz {line.decode().strip()!r} in {time.time() - t:.3f}s", flush=True)
    except (OSError, asyncio.TimeoutError) as e:
        print(f"{tag}: /healthz failed: {type(e).__name__} after {time.time() - t:.3f}s", flush=True)


async def main():
    tasks = []
    for i in range(n):
        tasks.append(asyncio.create_task(slow()))
        if i % 1000 == 999:
            await asyncio.sleep(0.05)
    for k in range(1, 9):
        await asyncio.sleep(5)
        print(f"t+{5 * k}s opened={opened} failed={failed} ended={ended}", flush=True)
        await probe(f"t+{5 * k}s")
    for t in tasks:
        t.cancel()


asyncio.run(main())
