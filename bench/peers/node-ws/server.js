'use strict';
// Benchmark peer: the bench stream served by Node.js + `ws`.
//
//   BENCH_RATE=1000 node server.js [PORT]      # ws://127.0.0.1:PORT/bench
//
// Emits {"seq":n,"ts":<ns since the UNIX epoch>,"pad":"x"*100} at BENCH_RATE
// messages per second (fractions allowed; default 1000) and broadcasts each to
// every connected client. Pacing is the gateway ticker's: message n is due
// (n - 1) / rate seconds after the start, every due message is sent (late ones
// in a burst, yielding to the event loop every 5 ms so accepts and handshakes
// still run), so the average rate does not drift. `ts` is when the message
// was due, not when it was built: a producer that falls behind shows in the
// latency measured from it (no coordinated omission). Each message is serialized once and
// the same string is passed to every client's send(): the idiomatic broadcast.
//
// Environment: BENCH_RATE, BENCH_PORT (default 9901; argv[2] wins), BENCH_HOST
// (default 127.0.0.1), BENCH_PAD (default 100), BENCH_MAX_BUFFERED (bytes,
// default 8 MiB: a client whose unsent backlog exceeds it is terminated, so a
// consumer that cannot keep up cannot make the process grow without bound).

const { WebSocketServer, WebSocket } = require('ws');

function envNumber(name, fallback) {
  const raw = process.env[name];
  if (raw === undefined || raw === '') return fallback;
  const value = Number(raw);
  if (!Number.isFinite(value)) {
    console.error(`${name}=${JSON.stringify(raw)} is not a number`);
    process.exit(2);
  }
  return value;
}

const port = Number(process.argv[2] || process.env.BENCH_PORT || 9901);
const host = process.env.BENCH_HOST || '127.0.0.1';
const rate = envNumber('BENCH_RATE', 1000);
const pad = 'x'.repeat(envNumber('BENCH_PAD', 100));
const maxBuffered = envNumber('BENCH_MAX_BUFFERED', 8 * 1024 * 1024);
if (!(rate > 0)) {
  console.error(`BENCH_RATE must be > 0, got ${rate}`);
  process.exit(2);
}

// Wall-clock nanoseconds: the monotonic high-resolution clock anchored to the
// realtime clock at the instant Date.now() ticks to a new millisecond (a spin
// of at most 1 ms at startup), which pins the anchor to a few microseconds;
// performance.timeOrigin was seen to be off by ~0.5 ms.
const { hrAnchor, epochAnchorNs } = (() => {
  const first = Date.now();
  let ms = first;
  let hr = process.hrtime.bigint();
  while (ms === first) {
    hr = process.hrtime.bigint();
    ms = Date.now();
  }
  return { hrAnchor: hr, epochAnchorNs: BigInt(ms) * 1000000n };
})();
function nowNs() {
  return epochAnchorNs + (process.hrtime.bigint() - hrAnchor);
}

const wss = new WebSocketServer({
  host,
  port,
  path: '/bench',
  // As the gateway's listeners (the kernel caps it at net.core.somaxconn).
  backlog: 8192,
  perMessageDeflate: false,
  clientTracking: true,
});

wss.on('connection', (ws) => {
  ws.on('error', () => ws.terminate());
  // Clients send nothing we need; `ws` answers pings itself.
});
wss.on('error', (err) => {
  console.error(`server error: ${err.message}`);
  process.exit(1);
});

let seq = 0;
let start = 0n;
let startNs = 0n;

function broadcast(message) {
  for (const client of wss.clients) {
    if (client.readyState !== WebSocket.OPEN) continue;
    if (client.bufferedAmount > maxBuffered) {
      client.terminate();
      continue;
    }
    client.send(message);
  }
}

// When behind, emit for at most this long per event-loop turn, then let
// pending I/O (accepts, handshakes, reads) run before going on.
const BURST_NS = 5000000n;

function tick() {
  const turnStart = process.hrtime.bigint();
  const elapsedSecs = Number(turnStart - start) / 1e9;
  const due = Math.floor(elapsedSecs * rate) + 1;
  while (seq < due) {
    seq += 1;
    const ts = startNs + BigInt(Math.round(((seq - 1) * 1e9) / rate));
    broadcast(`{"seq":${seq},"ts":${ts},"pad":"${pad}"}`);
    if (seq < due && process.hrtime.bigint() - turnStart > BURST_NS) {
      setImmediate(tick);
      return;
    }
  }
  const nowSecs = Number(process.hrtime.bigint() - start) / 1e9;
  const waitMs = Math.min(50, Math.max(0, (seq / rate - nowSecs) * 1000));
  setTimeout(tick, waitMs);
}

wss.on('listening', () => {
  console.error(`node-ws: ws://${host}:${port}/bench, ${rate} msg/s`);
  start = process.hrtime.bigint();
  startNs = epochAnchorNs + (start - hrAnchor);
  tick();
});

for (const signal of ['SIGINT', 'SIGTERM']) {
  process.on(signal, () => {
    for (const client of wss.clients) client.terminate();
    wss.close();
    process.exit(0);
  });
}
