#!/usr/bin/env python3
"""A dumb TCP relay: a stand-in "proxy" for checking the test runners themselves.

    tcp_relay.py LISTEN_PORT TARGET_HOST:TARGET_PORT [--close-after-bytes N]

Relaying byte for byte, run_suites.py and celery_e2e.py must report no difference from a
direct run; with --close-after-bytes N every connection is cut after N client->server bytes
(a deliberately broken "proxy"), and they must report the tests that then fail.
Prints "listening 127.0.0.1:PORT" once it accepts (PORT 0 = pick one). Stops on SIGTERM/SIGINT.
"""
import argparse
import asyncio
import signal


async def pipe(reader, writer, limit=None):
    sent = 0
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            if limit is not None and sent + len(data) >= limit:
                writer.write(data[: max(0, limit - sent)])
                break
            sent += len(data)
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        try:
            writer.close()
        except Exception:  # noqa: BLE001
            pass


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("listen_port", type=int)
    ap.add_argument("target")
    ap.add_argument("--close-after-bytes", type=int, default=None)
    a = ap.parse_args()
    thost, _, tport = a.target.rpartition(":")

    async def handle(cr, cw):
        try:
            ur, uw = await asyncio.open_connection(thost, int(tport))
        except OSError:
            cw.close()
            return
        t1 = asyncio.create_task(pipe(cr, uw, a.close_after_bytes))
        t2 = asyncio.create_task(pipe(ur, cw))
        done, pending = await asyncio.wait({t1, t2}, return_when=asyncio.FIRST_COMPLETED)
        for t in pending:
            t.cancel()
        for w in (cw, uw):
            try:
                w.close()
            except Exception:  # noqa: BLE001
                pass

    server = await asyncio.start_server(handle, "127.0.0.1", a.listen_port)
    port = server.sockets[0].getsockname()[1]
    print(f"listening 127.0.0.1:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for s in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(s, stop.set)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main())
