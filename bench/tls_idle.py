#!/usr/bin/env python3
"""RSS per idle connection, plain WebSocket against WebSocket over TLS.

    python3 bench/tls_idle.py [--clients 10000] [--sample-after 5] [--tag T]

Runs the release gateway on a copy of examples/bench (the ticker at one
message per 1000 s, so the clients stay idle) twice: once on a plain
listener, once on a TLS listener with a self-signed P-256 certificate made
by `openssl` for the run. Each time, `--clients` clients connect (asyncio,
the same code for both; TLS 1.3 from Python's ssl module), complete the
WebSocket upgrade to /bench and hold; the gateway's RSS is read before the
first client and `--sample-after` seconds after the last one, and divided
by the connections the gateway holds then (its open sockets). The gateway
pings every 30 s, which these clients do not answer (and closes them 10 s
later): a sample taken more than 30 s after the *first* connect is marked
`after_first_ping` (over TLS the connecting alone takes about 18 s here). Writes bench/results/<tag>-tls-idle.json and prints a
markdown table. Python 3 standard library only.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as dt
import json
import os
import resource
import ssl
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import (  # noqa: E402  (bench/run.py)
    IDLE_RATE, ROOT, Proc, bench_copy, fd_count, port_open, rate_env, rss_kib, wait_until)

PORT = 9906


def deployment(out: Path, tls: bool) -> Path:
    """examples/bench in `out`, on PORT, with TLS when asked."""
    config = bench_copy(out)
    bind = "    bind: 127.0.0.1:9900\n"
    yaml = config.read_text()
    if bind not in yaml:
        raise RuntimeError(f"examples/bench/gateway.yaml has no line {bind.strip()!r} to move to port {PORT}")
    listener = f"    bind: 127.0.0.1:{PORT}\n"
    if tls:
        listener += "    tls: {cert: cert.pem, key: key.pem}\n"
    config.write_text(yaml.replace(bind, listener))
    if tls and not (out / "cert.pem").exists():
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", out / "key.pem", "-out", out / "cert.pem", "-days", "2",
             "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
            check=True, capture_output=True)
    return config


async def client(ctx: ssl.SSLContext | None, gate: asyncio.Semaphore, held: list) -> None:
    async with gate:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", PORT, ssl=ctx, server_hostname="localhost" if ctx else None)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write((f"GET /bench HTTP/1.1\r\nHost: 127.0.0.1:{PORT}\r\nUpgrade: websocket\r\n"
                      f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                      "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            raise RuntimeError(f"upgrade refused: {head[:80]!r}")
        held.append(writer)


async def hold(clients: int, ctx: ssl.SSLContext | None) -> tuple[list, float]:
    gate = asyncio.Semaphore(100)
    held: list = []
    t0 = time.monotonic()
    results = await asyncio.gather(*(client(ctx, gate, held) for _ in range(clients)),
                                   return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        raise RuntimeError(f"{len(errors)} of {clients} clients failed, first: {errors[0]!r}")
    return held, time.monotonic() - t0


def measure(mode: str, clients: int, sample_after: float, scratch: Path) -> dict:
    tls = mode == "wss"
    config = deployment(scratch / mode, tls)
    gw = Proc(f"{mode}-gateway", [ROOT / "target" / "release" / "gateway", "--config", config],
              results=scratch, env={"BENCH_RATE": rate_env(IDLE_RATE)})
    try:
        if not wait_until(lambda: port_open(PORT), time.monotonic() + 30, alive=gw.alive):
            raise RuntimeError(f"the gateway did not accept on port {PORT}\n{gw.log_tail()}")
        time.sleep(1.0)
        before = rss_kib([gw.pid])
        base_fds = fd_count([gw.pid])
        ctx = None
        if tls:
            ctx = ssl.create_default_context(cafile=str(scratch / mode / "cert.pem"))
        after, fds, secs = asyncio.run(hold_and_sample(clients, ctx, sample_after, gw.pid))
        held = fds - base_fds
        return {
            "mode": mode, "clients": clients, "connect_secs": round(secs, 1),
            "sampled_after_secs": sample_after, "rss_kib_before": before, "rss_kib_held": after,
            "held_by_server": held,
            "after_first_ping": secs + sample_after >= 30,
            "kib_per_connection": round((after - before) / held, 2) if held > 0 else None,
        }
    finally:
        gw.stop()


async def hold_and_sample(clients: int, ctx, sample_after: float, pid: int) -> tuple[int, int, float]:
    """The gateway's RSS and open fds `sample_after` s after `clients` hold, and the connecting time."""
    held, secs = await hold(clients, ctx)
    await asyncio.sleep(sample_after)
    rss = rss_kib([pid])
    fds = fd_count([pid])
    for w in held:
        w.close()
    return rss, fds, secs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=10000)
    p.add_argument("--sample-after", type=float, default=5.0, help="seconds after the last client connected")
    p.add_argument("--tag", default=dt.date.today().isoformat())
    a = p.parse_args()
    if not os.access(ROOT / "target" / "release" / "gateway", os.X_OK):
        sys.exit("target/release/gateway is missing: cargo build --release -p gateway -p ticker")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, a.clients + 1000)), hard))
    scratch = ROOT / "bench" / "results" / "tls-idle.tmp"
    rows = [measure(mode, a.clients, a.sample_after, scratch) for mode in ("ws", "wss")]
    out = ROOT / "bench" / "results" / f"{a.tag}-tls-idle.json"
    out.write_text(json.dumps({"tag": a.tag, "runs": rows}, indent=2) + "\n")
    print("| listener | idle connections (held) | connecting took | RSS before | RSS held | KiB per connection | sampled after |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        late = " (after the first ping)" if r["after_first_ping"] else ""
        print(f"| {r['mode']} | {r['clients']:,} ({r['held_by_server']:,}) | {r['connect_secs']} s "
              f"| {r['rss_kib_before']:,} KiB | {r['rss_kib_held']:,} KiB "
              f"| {r['kib_per_connection']} | {r['sampled_after_secs']} s{late} |")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
