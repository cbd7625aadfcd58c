"""Benchmark peer: the bench stream served by FastAPI on uvicorn (one worker).

    BENCH_RATE=1000 bench/.venv/bin/python bench/peers/fastapi/server.py [PORT]

serves ws://127.0.0.1:PORT/bench (PORT defaults to BENCH_PORT, then 9902).

A background producer task emits {"seq":n,"ts":<ns since the UNIX epoch>,
"pad":"x"*100} at BENCH_RATE messages per second (fractions allowed; default
1000) and broadcasts each to every connected client. Pacing is the gateway
ticker's: message n is due (n - 1) / rate seconds after the start and every
due message is sent (late ones in a burst, yielding to the event loop every
5 ms so accepts and handshakes still run), so the average rate does not
drift. `ts` is when the message was due, not when it was built: a producer
that falls behind shows in the latency measured from it (no coordinated
omission). Each message is serialized
once and the same string goes to every client with `send_text`, one client
after the other (the broadcast of FastAPI's WebSocket documentation); a client
whose send fails is dropped.

Environment: BENCH_RATE, BENCH_PORT, BENCH_HOST (default 127.0.0.1),
BENCH_PAD (default 100).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI, WebSocket


def env_number(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    if raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        sys.exit(f"{name}={raw!r} is not a number")


RATE = env_number("BENCH_RATE", 1000)
PAD = "x" * int(env_number("BENCH_PAD", 100))
if not RATE > 0:
    sys.exit(f"BENCH_RATE must be > 0, got {RATE}")

clients: set[WebSocket] = set()


async def broadcast(message: str) -> None:
    dead = []
    # A copy: clients join and leave while a send is awaited.
    for ws in list(clients):
        try:
            await ws.send_text(message)
        except Exception:  # closed, reset, ...: drop the client
            dead.append(ws)
    for ws in dead:
        clients.discard(ws)


# When behind, emit for at most this long before letting the event loop run
# other tasks (accepts, handshakes, reads): `send_text` on a socket whose
# buffer has room does not yield.
BURST_SECS = 0.005


async def producer() -> None:
    start = time.monotonic()
    start_ns = time.time_ns()
    seq = 0
    while True:
        turn = time.monotonic()
        due = int((turn - start) * RATE) + 1
        while seq < due:
            seq += 1
            message = json.dumps(
                {"seq": seq, "ts": start_ns + int((seq - 1) * 1e9 / RATE), "pad": PAD},
                separators=(",", ":"),
            )
            await broadcast(message)
            if seq < due and time.monotonic() - turn > BURST_SECS:
                await asyncio.sleep(0)
                turn = time.monotonic()
        wait = seq / RATE - (time.monotonic() - start)
        await asyncio.sleep(min(max(wait, 0.0), 0.05))


@asynccontextmanager
async def lifespan(_app: FastAPI):
    task = asyncio.create_task(producer())
    try:
        yield
    finally:
        task.cancel()


app = FastAPI(lifespan=lifespan)


@app.websocket("/bench")
async def bench(ws: WebSocket) -> None:
    await ws.accept()
    clients.add(ws)
    try:
        # Read (and ignore) whatever the client sends until it goes away.
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                break
    except Exception:
        pass
    finally:
        clients.discard(ws)


if __name__ == "__main__":
    port = int(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("BENCH_PORT", "9902"))
    host = os.environ.get("BENCH_HOST", "127.0.0.1")
    print(f"fastapi: ws://{host}:{port}/bench, {RATE} msg/s", file=sys.stderr)
    uvicorn.run(
        app,
        host=host,
        port=port,
        workers=1,
        backlog=8192,  # as the gateway (the kernel caps it at somaxconn)
        log_level="warning",
        access_log=False,
    )
