#!/usr/bin/env python3
"""Side-by-side benchmark: the gateway against Node.js `ws`, FastAPI and NATS.

    bench/run.py setup                       # npm, venv + pip, cargo build
    bench/run.py compare [--servers gateway,node,fastapi,nats,bare] [--quick] [--linger 20ms] [--write-interval 15ms] [--schema F]
    bench/run.py summary [--tag 2026-11-23]  # rebuild the markdown from JSON
    bench/run.py scale [--totals 200000,1000000] # gateway cost vs clients and channels
    bench/run.py scale-summary [--tag 2026-11-23-scale]
    bench/run.py cluster [--quick]           # 1 gateway vs 2 over NATS JetStream
    bench/run.py cluster-summary [--tag 2026-12-02]

Every server produces the same stream ({"seq":n,"ts":<ns>,"pad":"x"*100} at
BENCH_RATE messages per second) and broadcasts it to every WebSocket client;
the clients are `loadgen` (bench/loadgen). Everything runs on 127.0.0.1 (the
load generator spreads its sockets over 127.0.0.1-127.0.0.N source addresses
with --sources). Python 3 standard library only. See bench/README.md.
"""

from __future__ import annotations

import argparse
import atexit
import datetime as dt
import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
VENV = BENCH / ".venv"
NODE_DIR = BENCH / "peers" / "node-ws"
FASTAPI_DIR = BENCH / "peers" / "fastapi"
NATS_TEMPLATE = BENCH / "peers" / "nats" / "nats-ws.conf"
DEFAULT_RESULTS = BENCH / "results"
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")

# A rate so low that no message is sent while idle connections are measured
# (the first message goes out at start-up, before any client; the next one
# would be due 1000 s later).
IDLE_RATE = 0.001

SERVER_ORDER = ["gateway", "node", "fastapi", "nats", "bare"]
PORTS = {"gateway": 9900, "node": 9901, "fastapi": 9902, "nats": 9903, "bare": 9905}
NATS_CLIENT_PORT = 9904

FULL_RATES = [100, 1000, 2000, 5000, 10000, 20000, 50000, 100000]
QUICK_RATES = [100, 1000]
FULL_CONNECT_RAMPS = [2000, 5000, 10000, 20000, 50000]
QUICK_CONNECT_RAMPS = [5000, 20000]
# These two always run: they are the "100k deliveries/s" and "1M deliveries/s"
# columns of the summary (with 1000 clients).
BASE_RATES = (100, 1000)

# Stop rules of the rate ladder.
MAX_P99_US = 1_000_000
GROWTH_MIN = 1.05
MIN_DELIVERY_RATIO = 0.9
# Above this, the window held a catch-up burst of messages that were late
# before it: the step did not run at its rate either.
MAX_DELIVERY_RATIO = 1.02
# An idle client receives one message per 1000 s; more is not idle.
MAX_IDLE_MESSAGES_PER_CLIENT = 2

# How often the runner polls /proc while waiting (kept low: the runner shares
# the two cores with the server and the generator).
POLL = 0.2


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


# --------------------------------------------------------------------------
# Processes: every child in its own process group, always stopped.

_LIVE: set["Proc"] = set()

# Whether children stay in run.py's session (--one-session). By default each
# child starts a session of its own, and with Linux's sched_autogroup (on by
# default) a session is a scheduling group: when server and load generator
# are both busy, each gets an equal share of the CPUs, whatever its number
# of threads. In one session they share one group and compete thread by
# thread. Either way each child leads its own process group, so it is
# stopped with everything it started.
ONE_SESSION = False


class Proc:
    """A child process in its own process group, stdout/stderr to files."""

    def __init__(self, name: str, argv: list[str], *, results: Path, env: dict | None = None,
                 cwd: Path = ROOT, capture_stdout: bool = False):
        self.name = name
        self.argv = [str(a) for a in argv]
        self.log_path = results / f"{name}.log.tmp"
        self.out_path = results / f"{name}.out.tmp" if capture_stdout else None
        results.mkdir(parents=True, exist_ok=True)
        full_env = dict(os.environ)
        full_env.pop("RUST_LOG", None)
        full_env.update(env or {})
        self._log = open(self.log_path, "wb")
        self._out = open(self.out_path, "wb") if self.out_path else None
        self.started = time.monotonic()
        self.popen = subprocess.Popen(
            self.argv, cwd=cwd, env=full_env, stdin=subprocess.DEVNULL,
            stdout=self._out or self._log, stderr=self._log,
            start_new_session=not ONE_SESSION, process_group=0 if ONE_SESSION else None)
        self.pid = self.popen.pid
        _LIVE.add(self)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait(self, timeout: float) -> bool:
        """True when the process exited within `timeout` seconds."""
        try:
            self.popen.wait(timeout=max(0.0, timeout))
            return True
        except subprocess.TimeoutExpired:
            return False

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM to the whole group, SIGKILL after `grace` seconds."""
        if self not in _LIVE:
            return
        self._signal_group(signal.SIGTERM)
        if not self.wait(grace):
            self._signal_group(signal.SIGKILL)
            self.wait(5.0)
        # Children that outlived their leader.
        self._signal_group(signal.SIGKILL)
        _LIVE.discard(self)
        for f in (self._log, self._out):
            if f:
                f.close()

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def stdout_text(self) -> str:
        if self._out:
            self._out.flush()
        return self.out_path.read_text(errors="replace") if self.out_path else ""


def stop_all() -> None:
    for proc in list(_LIVE):
        proc.stop(grace=2.0)


def _on_signal(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


atexit.register(stop_all)


# --------------------------------------------------------------------------
# /proc sampling.

def _ppid_map() -> dict[int, int]:
    ppids = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                rest = f.read().rsplit(b")", 1)[1].split()
            ppids[int(entry)] = int(rest[1])
        except (OSError, IndexError, ValueError):
            continue
    return ppids


def process_tree(pid: int) -> list[int]:
    """`pid` and all its live descendants."""
    children: dict[int, list[int]] = {}
    for child, parent in _ppid_map().items():
        children.setdefault(parent, []).append(child)
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


def cpu_secs(pids: list[int]) -> float:
    """utime+stime (+ reaped children's) of the processes, in seconds."""
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat", "rb") as f:
                rest = f.read().rsplit(b")", 1)[1].split()
            # Fields 14-17 of proc(5): utime stime cutime cstime.
            total += sum(int(x) for x in rest[11:15])
        except (OSError, IndexError, ValueError):
            continue
    return total / CLK_TCK


def cpu_split(pids: list[int]) -> tuple[float, float]:
    """(user, system) seconds of the processes: utime+cutime, stime+cstime."""
    user = system = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat", "rb") as f:
                rest = f.read().rsplit(b")", 1)[1].split()
            user += int(rest[11]) + int(rest[13])
            system += int(rest[12]) + int(rest[14])
        except (OSError, IndexError, ValueError):
            continue
    return user / CLK_TCK, system / CLK_TCK


def plugin_thread_cpu(pids: list[int]) -> float:
    """CPU seconds of the processes' live threads named `gw-*`: the plugin
    SDK's run threads (push plugins). From each thread's `schedstat` (ns on
    the CPU), not its `stat`: a hundred threads' utime+stime would each be
    rounded to the 10 ms tick. A thread that ended between two samples (a
    restarted plugin) drops out of the difference."""
    total_ns = 0
    for p in pids:
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                with open(f"/proc/{p}/task/{t}/comm", "rb") as f:
                    if not f.read().startswith(b"gw-"):
                        continue
                with open(f"/proc/{p}/task/{t}/schedstat", "rb") as f:
                    total_ns += int(f.read().split()[0])
            except (OSError, IndexError, ValueError):
                continue
    return total_ns / 1e9


def rss_kib(pids: list[int]) -> int:
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except (OSError, ValueError):
            continue
    return total


def fd_count(pids: list[int]) -> int:
    total = 0
    for p in pids:
        try:
            total += len(os.listdir(f"/proc/{p}/fd"))
        except OSError:
            continue
    return total


def machine_cpu() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from /proc/stat."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    total = sum(vals[:8])
    return total - idle, total


# --------------------------------------------------------------------------
# Small helpers.

def port_open(port: int, host: str = HOST) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_until(cond, deadline: float, *, alive=lambda: True, poll: float = POLL) -> bool:
    """Poll `cond` until it holds (True), the deadline passes or `alive` fails."""
    while True:
        if cond():
            return True
        if time.monotonic() >= deadline or not alive():
            return False
        time.sleep(min(poll, max(0.0, deadline - time.monotonic())))


def sleep_until(t: float, alive=lambda: True) -> bool:
    """Sleep until monotonic time `t`; False if `alive` failed first."""
    while time.monotonic() < t:
        if not alive():
            return False
        time.sleep(min(POLL, t - time.monotonic()))
    return True


def secs_arg(seconds: float) -> str:
    return f"{max(1, int(math.ceil(seconds)))}s"


def rate_env(rate: float) -> str:
    return str(int(rate)) if float(rate).is_integer() else repr(float(rate))


def parse_json_line(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise BenchError("loadgen printed no JSON line")


def run_checked(argv: list, *, cwd: Path, timeout: float) -> None:
    log(f"$ {' '.join(str(a) for a in argv)}   (in {cwd})")
    try:
        subprocess.run([str(a) for a in argv], cwd=cwd, check=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"timed out after {timeout:.0f} s: {argv[0]}") from e
    except subprocess.CalledProcessError as e:
        raise BenchError(f"{argv[0]} failed with exit code {e.returncode}") from e


def capture(argv: list, *, cwd: Path = ROOT, timeout: float = 20) -> str:
    try:
        r = subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True,
                           text=True, timeout=timeout)
        return (r.stdout or r.stderr).strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def nats_server_path() -> str | None:
    return shutil.which("nats-server") or (
        "/usr/sbin/nats-server" if os.access("/usr/sbin/nats-server", os.X_OK) else None)


def venv_python() -> Path:
    return VENV / "bin" / "python"


# --------------------------------------------------------------------------
# The servers.

class Server:
    """How to start one contender and where its clients connect."""

    name = ""
    label = ""

    def __init__(self, cfg: argparse.Namespace):
        self.cfg = cfg
        self.port = PORTS[self.name]
        self.proc: Proc | None = None
        self.publisher: Proc | None = None

    # What to run.
    def check(self) -> None:
        raise NotImplementedError

    def command(self) -> list:
        raise NotImplementedError

    def url(self) -> str:
        return f"ws://{HOST}:{self.port}/bench"

    def client_args(self, mode: str) -> list[str]:
        """loadgen arguments for a stream (`mode`="stream") or idle run."""
        return ["--url", self.url(), "--mode", mode]

    def versions(self) -> dict:
        return {}

    def delay_histogram(self) -> dict | None:
        """The server's own delivery-delay histogram, if it has one:
        {"buckets": [(upper bound s, cumulative count)], "sum": s, "count": n}."""
        return None

    # Lifecycle.
    def start(self, rate: float) -> Proc:
        self.check()
        if port_open(self.port):
            raise BenchError(f"127.0.0.1:{self.port} is already in use: not starting {self.name}")
        self.proc = Proc(f"{self.name}-server", self.command(), results=self.cfg.results,
                         env={"BENCH_RATE": rate_env(rate)})
        deadline = time.monotonic() + self.cfg.start_timeout
        if not wait_until(lambda: port_open(self.port), deadline, alive=self.proc.alive):
            tail = self.proc.log_tail()
            self.stop()
            raise BenchError(f"{self.name} did not accept on 127.0.0.1:{self.port} within "
                             f"{self.cfg.start_timeout:.0f} s\n{tail}")
        time.sleep(self.cfg.settle)
        if not self.proc.alive():
            raise BenchError(f"{self.name} exited after start-up\n{self.proc.log_tail()}")
        return self.proc

    def start_publisher(self, rate: float, duration: float) -> None:
        """Only NATS has an external producer."""

    def pids(self) -> list[int]:
        return process_tree(self.proc.pid) if self.proc else []

    def stop(self) -> None:
        if self.publisher:
            self.publisher.stop()
            self.publisher = None
        if self.proc:
            self.proc.stop()
            self.proc = None


DELAY_SERIES = "gateway_delivery_delay_seconds"


def scrape_delay(port: int) -> dict | None:
    """gateway_delivery_delay_seconds from the /metrics of the gateway on
    `port` (None if unreachable or absent)."""
    status, text = http_get(port, "/metrics", timeout=5)
    if status != 200:
        return None
    buckets, total, count = [], None, None
    for line in text.splitlines():
        m = re.fullmatch(DELAY_SERIES + r'_bucket\{le="([^"]+)"\} (\S+)', line)
        if m:
            buckets.append((math.inf if m[1] == "+Inf" else float(m[1]), float(m[2])))
        elif line.startswith(DELAY_SERIES + "_sum "):
            total = float(line.split()[1])
        elif line.startswith(DELAY_SERIES + "_count "):
            count = float(line.split()[1])
    if not buckets or count is None:
        return None
    return {"buckets": buckets, "sum": total or 0.0, "count": count}


def delay_window(a: dict | None, b: dict | None) -> dict | None:
    """The delay histogram's samples between two scrapes: how many writes
    were timed, their mean, and the bucket bounds p50 and p99 fall under."""
    if not a or not b or len(a["buckets"]) != len(b["buckets"]):
        return None
    n = b["count"] - a["count"]
    if n <= 0:
        return None
    out = {"writes": int(n), "mean_ms": round(1000 * (b["sum"] - a["sum"]) / n, 3)}
    for q, key in ((0.5, "p50_le_ms"), (0.99, "p99_le_ms"), (0.999, "p999_le_ms")):
        for (le, cb), (_, ca) in zip(b["buckets"], a["buckets"]):
            if cb - ca >= q * n:
                out[key] = None if math.isinf(le) else round(le * 1000, 3)
                break
    return out


def bench_copy(out: Path, *, linger: str | None = None, schema: Path | None = None,
               write_interval: str | None = None) -> Path:
    """examples/bench copied to `out` with absolute plugin dirs, `linger:`
    added to its channel when given, `limits.write_interval` when given, and
    `schema` in place of its own. Returns the copy's gateway.yaml."""
    src = ROOT / "examples" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    yaml = (src / "gateway.yaml").read_text().replace(
        "dirs: [../../target/release]", f"dirs: [{ROOT / 'target' / 'release'}]")
    if write_interval:
        if "\nlimits:\n" not in yaml:
            raise BenchError("examples/bench/gateway.yaml has no `limits:` section")
        yaml = yaml.replace("\nlimits:\n", f"\nlimits:\n  write_interval: {write_interval}\n")
    (out / "gateway.yaml").write_text(yaml)
    spec = (src / "bench.yaml").read_text()
    if linger:
        spec += f"linger: {linger}\n"
    (out / "bench.yaml").write_text(spec)
    shutil.copy(schema or src / "bench.schema.json", out / "bench.schema.json")
    return out / "gateway.yaml"


class Gateway(Server):
    name = "gateway"
    label = "gateway (this repo)"

    def delay_histogram(self) -> dict | None:
        return scrape_delay(self.port)

    def binary(self) -> Path:
        return ROOT / "target" / "release" / "gateway"

    def check(self) -> None:
        if not os.access(self.binary(), os.X_OK):
            raise BenchError(f"{self.binary()} is missing: run `bench/run.py setup`")
        if not (ROOT / "examples" / "bench" / "gateway.yaml").is_file():
            raise BenchError("examples/bench/gateway.yaml is missing")
        schema = getattr(self.cfg, "schema", None)
        if schema and not Path(schema).is_file():
            raise BenchError(f"--schema {schema}: no such file")

    def command(self) -> list:
        linger = getattr(self.cfg, "linger", None)
        schema = getattr(self.cfg, "schema", None)
        interval = getattr(self.cfg, "write_interval", None)
        if not linger and not schema and not interval:
            return [self.binary(), "--config", "examples/bench/gateway.yaml"]
        # examples/bench with `linger:` added to its channel, a
        # `write_interval` and/or another schema, in a scratch directory
        # (git-ignored).
        name = "-".join(f"{k}-{re.sub(r'[^A-Za-z0-9.-]+', '_', str(v))}"
                        for k, v in (("linger", linger), ("write_interval", interval),
                                     ("schema", schema and Path(schema).stem)) if v)
        config = bench_copy(self.cfg.results / f"gateway-{name}.tmp", linger=linger, schema=schema,
                            write_interval=interval)
        return [self.binary(), "--config", config]

    def versions(self) -> dict:
        rev = capture(["git", "rev-parse", "--short", "HEAD"])
        dirty = capture(["git", "status", "--porcelain", "--", "gateway", "plugins", "examples/bench"])
        v = {"git": rev + ("+dirty" if dirty else "")}
        if getattr(self.cfg, "linger", None):
            v["linger"] = self.cfg.linger
        if getattr(self.cfg, "write_interval", None):
            v["write_interval"] = self.cfg.write_interval
        if getattr(self.cfg, "schema", None):
            v["schema"] = str(self.cfg.schema)
        return v


class Node(Server):
    name = "node"
    label = "Node.js ws"

    def check(self) -> None:
        if not shutil.which("node"):
            raise BenchError("node is not on PATH")
        if not (NODE_DIR / "node_modules" / "ws").is_dir():
            raise BenchError("bench/peers/node-ws/node_modules is missing: run `bench/run.py setup`")

    def command(self) -> list:
        return ["node", NODE_DIR / "server.js", str(self.port)]

    def versions(self) -> dict:
        ws = {}
        try:
            ws = json.loads((NODE_DIR / "node_modules" / "ws" / "package.json").read_text())
        except (OSError, ValueError):
            pass
        return {"node": capture(["node", "--version"]), "ws": ws.get("version")}


class FastAPI(Server):
    name = "fastapi"
    label = "FastAPI (uvicorn, 1 worker)"

    def check(self) -> None:
        if not os.access(venv_python(), os.X_OK):
            raise BenchError("bench/.venv is missing: run `bench/run.py setup`")

    def command(self) -> list:
        return [venv_python(), FASTAPI_DIR / "server.py", str(self.port)]

    def versions(self) -> dict:
        out = capture([venv_python(), "-c",
                       "import sys, fastapi, uvicorn, websockets; "
                       "print(sys.version.split()[0], fastapi.__version__, uvicorn.__version__, "
                       "websockets.__version__)"])
        parts = out.split()
        if len(parts) == 4:
            return dict(zip(["python", "fastapi", "uvicorn", "websockets"], parts))
        return {"raw": out}


class Nats(Server):
    name = "nats"
    label = "NATS (nats-server websocket)"

    def check(self) -> None:
        if not nats_server_path():
            raise BenchError("nats-server not found (looked on PATH and /usr/sbin)")
        if not os.access(self.cfg.loadgen, os.X_OK):
            raise BenchError(f"{self.cfg.loadgen} is missing (it is also the NATS publisher)")
        if port_open(NATS_CLIENT_PORT):
            raise BenchError(f"127.0.0.1:{NATS_CLIENT_PORT} is already in use")

    def command(self) -> list:
        conf = self.cfg.results / "nats-ws.conf.tmp"
        text = NATS_TEMPLATE.read_text()
        text = text.replace("@CLIENT_PORT@", str(NATS_CLIENT_PORT)).replace("@WS_PORT@", str(self.port))
        conf.write_text(text)
        return [nats_server_path(), "-c", conf]

    def url(self) -> str:
        return f"ws://{HOST}:{self.port}"

    def client_args(self, mode: str) -> list[str]:
        # An idle NATS client is subscribed (CONNECT + SUB, then silent), like
        # an idle client of the other servers, which is subscribed to /bench
        # by connecting.
        nats_mode = "nats" if mode == "stream" else "nats-idle"
        return ["--url", self.url(), "--mode", nats_mode, "--nats-subject", "bench"]

    def start(self, rate: float) -> Proc:
        proc = super().start(rate)
        if not wait_until(lambda: port_open(NATS_CLIENT_PORT), time.monotonic() + 10, alive=proc.alive):
            raise BenchError(f"nats-server does not accept on 127.0.0.1:{NATS_CLIENT_PORT}")
        return proc

    def start_publisher(self, rate: float, duration: float) -> None:
        self.publisher = Proc(
            "nats-publisher",
            [self.cfg.loadgen, "publish", "--nats", f"{HOST}:{NATS_CLIENT_PORT}", "--subject", "bench",
             "--rate", rate_env(rate), "--pad", "100", "--duration", secs_arg(duration)],
            results=self.cfg.results, capture_stdout=True)
        time.sleep(0.5)
        if not self.publisher.alive():
            raise BenchError(f"loadgen publish exited at once\n{self.publisher.log_tail()}")

    def versions(self) -> dict:
        out = capture([nats_server_path() or "nats-server", "--version"])
        return {"nats-server": out.split(":", 1)[-1].strip()}


class Bare(Server):
    """The floor, not a peer: a bare tokio-tungstenite broadcast loop."""

    name = "bare"
    label = "bare tokio-tungstenite loop (floor)"

    def binary(self) -> Path:
        return ROOT / "target" / "release" / "examples" / "bare_broadcast"

    def check(self) -> None:
        if not os.access(self.binary(), os.X_OK):
            raise BenchError(f"{self.binary()} is missing: run `bench/run.py setup`")
        # A binary older than its source may not know what it is asked
        # (`--write-interval`) and would run unpaced, silently.
        source = ROOT / "bench" / "loadgen" / "examples" / "bare_broadcast.rs"
        if source.stat().st_mtime > self.binary().stat().st_mtime:
            raise BenchError(f"{self.binary()} is older than {source.relative_to(ROOT)}: "
                             "run `bench/run.py setup --only cargo`")

    def command(self) -> list:
        # `--write-interval D` paces each of its clients as the gateway's
        # `limits.write_interval` does: the floor of that setting.
        interval = getattr(self.cfg, "write_interval", None)
        return [self.binary(), str(self.port)] + ([interval] if interval else [])

    def versions(self) -> dict:
        interval = getattr(self.cfg, "write_interval", None)
        return {"write_interval": interval} if interval else {}


SERVER_CLASSES = {cls.name: cls for cls in (Gateway, Node, FastAPI, Nats, Bare)}


# --------------------------------------------------------------------------
# loadgen.

def loadgen_cmd(cfg, server: Server, mode: str, extra: list) -> list:
    argv = [cfg.loadgen, *server.client_args(mode), "--sources", str(cfg.sources)]
    if cfg.loadgen_threads:
        argv += ["--threads", str(cfg.loadgen_threads)]
    return argv + [str(a) for a in extra]


def loadgen_connected(lg: Proc) -> bool:
    """loadgen's progress (stderr) says its connect phase is over."""
    try:
        text = lg.log_path.read_text(errors="replace")
    except OSError:
        return False
    return "then measuring" in text or "loadgen: holding" in text


def finish_loadgen(lg: Proc, deadline: float) -> dict:
    if not lg.wait(deadline - time.monotonic()):
        lg.stop(grace=2.0)
        raise BenchError(f"loadgen did not finish in time (killed)\n{lg.log_tail()}")
    code = lg.popen.returncode
    text = lg.stdout_text()
    lg.stop()
    try:
        result = parse_json_line(text)
    except (BenchError, ValueError) as e:
        raise BenchError(f"loadgen exit code {code}: {e}\n{lg.log_tail()}") from e
    if code != 0:
        result.setdefault("exit_code", code)
    return result


class Sample:
    def __init__(self, server: Server, others: dict[str, Proc | None]):
        self.t = time.monotonic()
        pids = server.pids()
        self.server_cpu = cpu_secs(pids)
        self.server_split = cpu_split(pids)
        self.plugin_cpu = plugin_thread_cpu(pids) if isinstance(server, Gateway) else None
        self.other_cpu = {k: (cpu_secs(process_tree(p.pid)) if p and p.alive() else None)
                          for k, p in others.items()}
        self.machine = machine_cpu()


def window(a: Sample, b: Sample) -> dict:
    secs = b.t - a.t
    busy = b.machine[0] - a.machine[0]
    total = b.machine[1] - a.machine[1]
    out = {
        "window_secs": round(secs, 3),
        "server_cpu_secs": round(b.server_cpu - a.server_cpu, 3),
        "server_user_secs": round(b.server_split[0] - a.server_split[0], 3),
        "server_system_secs": round(b.server_split[1] - a.server_split[1], 3),
        "machine_cpu_busy_pct": round(100.0 * busy / total, 1) if total else None,
    }
    if a.plugin_cpu is not None and b.plugin_cpu is not None:
        # Part of server_cpu_secs: the push plugins' own threads.
        out["server_plugin_threads_cpu_secs"] = round(max(0.0, b.plugin_cpu - a.plugin_cpu), 3)
    for k in a.other_cpu:
        if a.other_cpu[k] is not None and b.other_cpu.get(k) is not None:
            out[f"{k}_cpu_secs"] = round(b.other_cpu[k] - a.other_cpu[k], 3)
    # /proc/stat counts by the timer tick, and on these VMs it has been seen
    # to stand still for seconds while the server and loadgen ran (their
    # own CPU times, from /proc/<pid>/stat, are exact). A busy share below
    # what the measured processes alone used is reported as unknown.
    measured = sum(v for k, v in out.items() if k.endswith("_cpu_secs"))
    pct = out["machine_cpu_busy_pct"]
    if pct is not None and secs > 0 and pct / 100 * (os.cpu_count() or 1) * secs < 0.9 * measured:
        out["machine_cpu_busy_pct_unreliable"] = pct
        out["machine_cpu_busy_pct"] = None
    return out


# --------------------------------------------------------------------------
# Scenario a: throughput and latency at one rate.

def stream_step(cfg, server: Server, rate: float, clients: int | None = None) -> dict:
    """One fresh server at `rate` msg/s, `clients` (default cfg.clients)
    loadgen clients, the server's CPU over a window inside loadgen's."""
    clients = clients or cfg.clients
    warmup, duration, ramp = cfg.warmup, cfg.duration, cfg.ramp
    connect_secs = clients / ramp
    step = {"rate": rate, "clients": clients, "warmup_secs": warmup, "duration_secs": duration}
    server.start(rate)
    lg = None
    try:
        if isinstance(server, Nats):
            server.start_publisher(rate, connect_secs + warmup + duration + 20)
        pids = server.pids()
        base_fds = fd_count(pids)
        step["rss_kib_before"] = rss_kib(pids)
        lg = Proc(f"{server.name}-loadgen", loadgen_cmd(cfg, server, "stream", [
            "--clients", clients, "--ramp", ramp, "--warmup", secs_arg(warmup),
            "--duration", secs_arg(duration), "--expect-rate", rate_env(rate)]),
            results=cfg.results, capture_stdout=True)
        t0 = lg.started
        hard_deadline = t0 + connect_secs + warmup + duration + cfg.step_slack
        # 1. Wait until the server holds every client (its open fds) or
        #    loadgen reports its connect phase over, bounded.
        wait_until(lambda: fd_count(pids) - base_fds >= clients or loadgen_connected(lg),
                   t0 + connect_secs + cfg.connect_slack, alive=lg.alive)
        t_conn = time.monotonic()
        step["server_saw_all_clients"] = fd_count(pids) - base_fds >= clients
        step["loadgen_connect_phase_over"] = loadgen_connected(lg)
        step["connect_wait_secs"] = round(t_conn - t0, 3)
        # 2. Measuring window: starts after loadgen's warm-up, ends 1 s before
        #    loadgen's own window can end.
        others = {"loadgen": lg, "publisher": server.publisher}
        if sleep_until(t_conn + warmup + cfg.window_lead, alive=lg.alive):
            a = Sample(server, others)
            delay_a = server.delay_histogram()
            sleep_until(a.t + max(1.0, duration - cfg.window_lead - 1.0), alive=lg.alive)
            b = Sample(server, others)
            delay_b = server.delay_histogram()
            step.update(window(a, b))
            if (delay := delay_window(delay_a, delay_b)) is not None:
                step["server_delay"] = delay
            step["window_inside_loadgen_run"] = lg.alive()
            step["rss_kib_during"] = rss_kib(pids)
        else:
            step["window_inside_loadgen_run"] = False
        result = finish_loadgen(lg, hard_deadline)
        lg = None
        step["loadgen"] = result
        dps = result.get("deliveries_per_sec") or 0
        if step.get("window_secs") and dps:
            deliveries_m = dps * step["window_secs"] / 1e6
            step["server_cpu_secs_per_1m"] = round(step["server_cpu_secs"] / deliveries_m, 4)
            if "loadgen_cpu_secs" in step:
                step["loadgen_cpu_secs_per_1m"] = round(step["loadgen_cpu_secs"] / deliveries_m, 4)
        step["expected_deliveries_per_sec"] = rate * clients
        return step
    finally:
        if lg:
            lg.stop(grace=2.0)
        server.stop()


def step_problem(step: dict, best_dps: float) -> str | None:
    """Why the rate ladder stops after this step (None: go on)."""
    if "error" in step:
        return "error"
    r = step.get("loadgen", {})
    if r.get("connected", 0) < step["clients"]:
        return f"only {r.get('connected')} of {step['clients']} clients connected"
    if r.get("gaps", 0) > 0:
        return f"{r['gaps']} gaps"
    if r.get("dups", 0) > 0:
        return f"{r['dups']} duplicates"
    if r.get("unparsed", 0) > 0:
        return f"{r['unparsed']} messages loadgen could not parse"
    if r.get("silent_clients", 0) > 0:
        return f"{r['silent_clients']} silent clients"
    if r.get("disconnects", 0) > 0:
        return f"{r['disconnects']} clients disconnected"
    # The producers stamp `ts` with when a message was due, so a producer
    # that falls behind shows in the latency too; a ratio above 1 is a
    # catch-up burst of messages that were late before the window.
    ratio = r.get("delivery_ratio")
    if ratio is not None and ratio < MIN_DELIVERY_RATIO:
        return f"delivered {ratio:.0%} of the offered rate"
    if ratio is not None and ratio > MAX_DELIVERY_RATIO:
        return f"delivered {ratio:.1%} of the offered rate (a catch-up burst)"
    p99 = (r.get("latency_us") or {}).get("p99")
    if p99 is None or p99 > MAX_P99_US:
        return "p99 > 1 s" if p99 is not None else "no latency"
    if best_dps and (r.get("deliveries_per_sec") or 0) < best_dps * GROWTH_MIN:
        return "deliveries/s stopped growing"
    return None


def fill_rates(lo: float, hi: float) -> list[int]:
    """Two rates between lo and hi (geometric thirds, 2 significant digits)."""
    out = []
    for k in (1, 2):
        r = lo * (hi / lo) ** (k / 3)
        digits = 10 ** max(0, int(math.floor(math.log10(r))) - 1)
        r = int(round(r / digits) * digits)
        if lo < r < hi and r not in out:
            out.append(r)
    return out


def scenario_throughput(cfg, server: Server) -> list[dict]:
    steps: list[dict] = []
    best = 0.0

    def run(rate: float, phase: str) -> dict:
        nonlocal best
        log(f"{server.name}: stream, {cfg.clients} clients at {rate} msg/s")
        try:
            step = stream_step(cfg, server, rate)
        except BenchError as e:
            step = {"rate": rate, "clients": cfg.clients, "error": str(e)}
            log(f"{server.name}: step failed: {e}")
        step["phase"] = phase
        step["stop"] = step_problem(step, best if phase == "ladder" else 0.0)
        r = step.get("loadgen", {})
        if sustained(step):
            best = max(best, r.get("deliveries_per_sec") or 0)
        lat = r.get("latency_us") or {}
        log(f"{server.name}: {rate} msg/s -> {r.get('deliveries_per_sec')} deliveries/s "
            f"({r.get('connected')} clients), p99 {lat.get('p99')} us, gaps {r.get('gaps')}, "
            f"server CPU-s/1M {step.get('server_cpu_secs_per_1m')}"
            + (f"; stop: {step['stop']}" if step["stop"] else ""))
        steps.append(step)
        return step

    last_ok = None   # last sustained ladder rate before the first failure
    failed = None    # first ladder rate that ended the ladder
    refine = None    # (lo, hi) to fill in when the ladder ended on a failure
    for rate in cfg.rates:
        if failed is not None and rate not in BASE_RATES:
            break
        step = run(rate, "ladder")
        if failed is not None:
            continue
        if step["stop"] is None:
            last_ok = rate
        else:
            failed = rate
            if not sustained(step):
                # Nothing sustained yet: look below the first rate.
                refine = (last_ok, rate) if last_ok is not None else (rate / 10, rate)
    # The ladder jumps (100 -> 1000 -> 2000 -> 5000 ...): when a server fails
    # a step, two rates in between find its ceiling more closely.
    if cfg.refine and refine:
        for rate in fill_rates(*refine):
            if not sustained(run(rate, "refine")):
                break
    return steps


# --------------------------------------------------------------------------
# Scenarios b and c: idle connections and connection rate.

def idle_run(cfg, server: Server, clients: int, ramp: float, hold: float, tag: str) -> dict:
    """Hold `clients` idle connections; RSS and fds before and while held."""
    out = {"clients": clients, "ramp": ramp}
    server.start(IDLE_RATE)
    lg = None
    try:
        pids = server.pids()
        time.sleep(1.0)
        base_fds = fd_count(pids)
        out["rss_kib_before"] = rss_kib(pids)
        connect_secs = clients / ramp
        # loadgen's --hold starts once every client is connected; the sample
        # below is taken --idle-sample-after seconds (default 1.5) after the
        # server holds them all. A sample after the server's first ping round
        # (the gateway pings every 30 s) includes what pings and pongs cost.
        sample_after = cfg.idle_sample_after
        hold = max(hold, 3, sample_after + 3)
        lg = Proc(f"{server.name}-loadgen-{tag}", loadgen_cmd(cfg, server, "idle", [
            "--clients", clients, "--ramp", ramp, "--hold", secs_arg(hold)]),
            results=cfg.results, capture_stdout=True)
        t0 = lg.started
        a = Sample(server, {})
        peak = [0]

        def all_held() -> bool:
            peak[0] = max(peak[0], fd_count(pids) - base_fds)
            return peak[0] >= clients or loadgen_connected(lg)

        wait_until(all_held, t0 + connect_secs + cfg.connect_slack, alive=lg.alive)
        out["server_saw_all_clients"] = peak[0] >= clients
        out["loadgen_connect_phase_over"] = loadgen_connected(lg)
        out["connect_wait_secs"] = round(time.monotonic() - t0, 3)
        # Let the server finish its per-connection allocations, then sample.
        held_at = time.monotonic()
        sleep_until(held_at + min(1.5, sample_after), alive=lg.alive)
        if sample_after > 1.5:
            out["rss_kib_early"] = rss_kib(pids)
            sleep_until(held_at + sample_after, alive=lg.alive)
        out["sampled_after_secs"] = round(time.monotonic() - held_at, 1)
        out["held_by_server"] = fd_count(pids) - base_fds
        out["held_by_server_peak"] = max(peak[0], out["held_by_server"])
        out["rss_kib_after"] = rss_kib(pids)
        out["sampled_while_loadgen_ran"] = lg.alive()
        b = Sample(server, {})
        out.update({f"during_{k}": v for k, v in window(a, b).items()})
        if out["held_by_server"] > 0:
            out["kib_per_connection"] = round(
                (out["rss_kib_after"] - out["rss_kib_before"]) / out["held_by_server"], 2)
        out["loadgen"] = finish_loadgen(lg, t0 + connect_secs + cfg.connect_slack + hold + cfg.step_slack)
        lg = None
        # A server that ignored the idle rate streamed to every client: its
        # RSS is not an idle connection's.
        received = out["loadgen"].get("messages") or 0
        if received > MAX_IDLE_MESSAGES_PER_CLIENT * clients:
            out["error"] = f"not idle: the clients received {received} messages"
            out.pop("kib_per_connection", None)
        return out
    finally:
        if lg:
            lg.stop(grace=2.0)
        server.stop()


def listen_overflows() -> int | None:
    """TcpExt ListenOverflows: SYNs/ACKs dropped because an accept queue was full."""
    try:
        with open("/proc/net/netstat") as f:
            lines = f.read().splitlines()
        for names, values in zip(lines[::2], lines[1::2]):
            if names.startswith("TcpExt:"):
                return int(dict(zip(names.split()[1:], values.split()[1:]))["ListenOverflows"])
    except (OSError, KeyError, ValueError):
        pass
    return None


def connect_run(cfg, server: Server, ramp: float) -> dict:
    clients = cfg.connect_clients
    out = {"clients": clients, "ramp": ramp}
    server.start(IDLE_RATE)
    lg = None
    try:
        pids = server.pids()
        time.sleep(0.5)
        a = Sample(server, {})
        overflows = listen_overflows()
        lg = Proc(f"{server.name}-loadgen-connect", loadgen_cmd(cfg, server, "idle", [
            "--clients", clients, "--ramp", ramp, "--hold", "1s"]),
            results=cfg.results, capture_stdout=True)
        deadline = lg.started + clients / ramp + cfg.connect_slack + cfg.step_slack
        result = finish_loadgen(lg, deadline)
        lg = None
        b = Sample(server, {})
        if overflows is not None and listen_overflows() is not None:
            out["listen_overflows"] = listen_overflows() - overflows
        out["server_cpu_secs"] = round(b.server_cpu - a.server_cpu, 3)
        out["server_rss_kib_after"] = rss_kib(pids)
        out["loadgen"] = result
        return out
    finally:
        if lg:
            lg.stop(grace=2.0)
        server.stop()


def scenario_connect_rate(cfg, server: Server) -> dict:
    """Connect bursts at increasing --ramp; the best connects/s wins.

    A ramp beyond what the server accepts overflows its listen queue, and the
    dropped SYNs come back only after TCP's 1 s retransmission timeout, so a
    single huge ramp measures queue sizes, not accept speed. The ladder stops
    when a connection fails, or once the server no longer keeps up with the
    ramp (connects/s < 90 % of it) and its connects/s also grew less than 5 %
    over the best so far (a server that falls behind a ramp may still accept
    faster at the next one).
    """
    out = {"clients": cfg.connect_clients, "runs": []}
    best_cps = 0.0
    for ramp in cfg.connect_ramps:
        try:
            run = connect_run(cfg, server, ramp)
        except BenchError as e:
            out["runs"].append({"ramp": ramp, "error": str(e)})
            log(f"{server.name}: connect run at ramp {ramp} failed: {e}")
            break
        out["runs"].append(run)
        r = run["loadgen"]
        log(f"{server.name}: ramp {ramp}/s -> {r.get('connects_per_sec')} connects/s, "
            f"{r.get('connect_failures')} failed, listen overflows {run.get('listen_overflows')}")
        cps = r.get("connects_per_sec") or 0
        if r.get("connect_failures") or (cps < 0.9 * ramp and cps < best_cps * GROWTH_MIN):
            break
        best_cps = max(best_cps, cps)
    ok = [x for x in out["runs"] if "loadgen" in x and not x["loadgen"].get("connect_failures")]
    if ok:
        best = max(ok, key=lambda x: x["loadgen"].get("connects_per_sec") or 0)
        out["best"] = {"ramp": best["ramp"], "connects_per_sec": best["loadgen"].get("connects_per_sec"),
                       "server_cpu_secs": best.get("server_cpu_secs")}
    return out


# --------------------------------------------------------------------------
# compare.

def machine_info() -> dict:
    info = {
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "nofile_limit": list(resource.getrlimit(resource.RLIMIT_NOFILE)),
        "one_session": ONE_SESSION,
    }
    # Inherited by the servers: the gateway's worker threads, for one.
    env = {k: os.environ[k] for k in ("TOKIO_WORKER_THREADS",) if k in os.environ}
    if env:
        info["env"] = env
    try:
        with open("/proc/sys/kernel/sched_autogroup_enabled") as f:
            info["sched_autogroup"] = f.read().strip() == "1"
    except OSError:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            info["mem_kib"] = int(f.readline().split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return info


def run_server(cfg, name: str, tag: str) -> dict:
    server = SERVER_CLASSES[name](cfg)
    doc = {
        "server": name, "label": server.label, "tag": tag, "quick": cfg.quick,
        "started_at": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_info(),
        "settings": {k: (str(v) if isinstance(v, Path) else sorted(v) if isinstance(v, set) else v)
                     for k, v in vars(cfg).items() if k not in ("func",)},
        "errors": [],
    }
    try:
        doc["versions"] = server.versions()
    except Exception as e:  # versions are informative only
        doc["versions"] = {"error": str(e)}
    try:
        server.check()
        if port_open(server.port):
            raise BenchError(f"127.0.0.1:{server.port} is already in use: {name} skipped")
    except BenchError as e:
        doc["errors"].append(str(e))
        log(f"{name}: skipped: {e}")
        return doc

    if "stream" in cfg.scenarios:
        doc["throughput"] = scenario_throughput(cfg, server)

    if "connect" in cfg.scenarios:
        run_connect_rate(cfg, server, doc)
    if "idle" in cfg.scenarios:
        run_idle(cfg, server, doc)
    if "max-idle" in cfg.scenarios and name in cfg.max_idle_servers:
        run_max_idle(cfg, server, doc)
    doc["finished_at"] = dt.datetime.now().isoformat(timespec="seconds")
    return doc


def run_connect_rate(cfg, server: Server, doc: dict) -> None:
    name = server.name
    log(f"{name}: connection rate, {cfg.connect_clients} clients at ramps {cfg.connect_ramps}")
    try:
        doc["connect_rate"] = scenario_connect_rate(cfg, server)
        log(f"{name}: best {(doc['connect_rate'].get('best') or {}).get('connects_per_sec')} connects/s")
    except BenchError as e:
        doc["errors"].append(f"connect_rate: {e}")
        log(f"{name}: connection rate failed: {e}")


def idle_ramp_for(cfg, doc: dict) -> float:
    # Idle clients connect no faster than 80 % of the best rate the server
    # accepted, so a slow acceptor is not measured on timeouts.
    best_cps = ((doc.get("connect_rate") or {}).get("best") or {}).get("connects_per_sec")
    return min(cfg.idle_ramp, max(100.0, round(0.8 * best_cps))) if best_cps else cfg.idle_ramp


def run_idle(cfg, server: Server, doc: dict) -> None:
    name = server.name
    idle_ramp = idle_ramp_for(cfg, doc)
    log(f"{name}: idle, {cfg.idle_clients} connections at ramp {idle_ramp}/s")
    try:
        doc["idle"] = idle_run(cfg, server, cfg.idle_clients, idle_ramp, cfg.hold, "idle")
        log(f"{name}: idle: {doc['idle'].get('kib_per_connection')} KiB per connection")
    except BenchError as e:
        doc["errors"].append(f"idle: {e}")
        log(f"{name}: idle failed: {e}")


def run_max_idle(cfg, server: Server, doc: dict) -> None:
    name = server.name
    log(f"{name}: most idle connections, trying {cfg.max_idle_clients}")
    try:
        doc["max_idle"] = idle_run(cfg, server, cfg.max_idle_clients, idle_ramp_for(cfg, doc),
                                   cfg.hold, "max")
        log(f"{name}: max idle: {doc['max_idle'].get('held_by_server_peak')} held")
    except BenchError as e:
        doc["errors"].append(f"max_idle: {e}")
        log(f"{name}: max idle failed: {e}")


def cmd_compare(cfg) -> int:
    names = [s.strip() for s in cfg.servers.split(",") if s.strip()]
    cfg.scenarios = {x.strip() for x in cfg.scenarios.split(",") if x.strip()}
    bad = cfg.scenarios - {"stream", "connect", "idle", "max-idle"}
    if bad:
        sys.exit(f"unknown scenario(s): {', '.join(sorted(bad))}")
    unknown = [n for n in names if n not in SERVER_CLASSES]
    if unknown:
        sys.exit(f"unknown server(s): {', '.join(unknown)} (known: {', '.join(SERVER_ORDER)})")
    cfg.results = Path(cfg.results).resolve()
    cfg.results.mkdir(parents=True, exist_ok=True)
    cfg.loadgen = Path(cfg.loadgen).resolve()
    if not os.access(cfg.loadgen, os.X_OK):
        sys.exit(f"{cfg.loadgen} is missing: run `bench/run.py setup`")
    # Quick: shorter windows, two rates, fewer idle connections.
    if cfg.quick:
        cfg.rates = cfg.rates or QUICK_RATES
        cfg.duration = cfg.duration or 3
        cfg.warmup = cfg.warmup or 1
        cfg.hold = cfg.hold or 3
        cfg.idle_clients = cfg.idle_clients or 5000
        cfg.connect_clients = cfg.connect_clients or 3000
        cfg.connect_ramps = cfg.connect_ramps or QUICK_CONNECT_RAMPS
        cfg.max_idle_servers = cfg.max_idle_servers if cfg.max_idle_servers is not None else ""
        cfg.refine = False
    cfg.rates = cfg.rates or FULL_RATES
    cfg.duration = cfg.duration or 10
    cfg.warmup = cfg.warmup or 2
    cfg.hold = cfg.hold or 4
    cfg.idle_clients = cfg.idle_clients or 10000
    cfg.connect_clients = cfg.connect_clients or 5000
    cfg.connect_ramps = cfg.connect_ramps or FULL_CONNECT_RAMPS
    cfg.max_idle_servers = [s for s in (cfg.max_idle_servers if cfg.max_idle_servers is not None
                                        else "gateway").split(",") if s]
    tag = cfg.tag or (dt.date.today().isoformat() + ("-quick" if cfg.quick else ""))
    a = machine_cpu()
    time.sleep(1.0)
    b = machine_cpu()
    cfg.machine_busy_pct_before = round(100.0 * (b[0] - a[0]) / max(1, b[1] - a[1]), 1)
    if cfg.machine_busy_pct_before > 20:
        log(f"warning: the machine is already {cfg.machine_busy_pct_before}% busy (of all cores) "
            "before the benchmark: results will be noisy")
    docs = []
    started = time.monotonic()
    for name in names:
        doc = run_server(cfg, name, tag)
        path = cfg.results / f"{tag}-{name}.json"
        path.write_text(json.dumps(doc, indent=2) + "\n")
        log(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
        docs.append(doc)
    summary = render_summary(docs, tag)
    out = cfg.results / f"{tag}-summary.md"
    out.write_text(summary)
    print(summary)
    log(f"wrote {out}; total {time.monotonic() - started:.0f} s")
    return 0


# --------------------------------------------------------------------------
# Markdown.

def fmt_delay(d: dict | None) -> str:
    if not d or "p99_le_ms" not in d:
        return "–"
    v = d["p99_le_ms"]
    return "> 10 s" if v is None else f"≤ {v:g} ms"


def fmt_us(us) -> str:
    if us is None:
        return "–"
    if us >= 1_000_000:
        return f"{us / 1e6:.2f} s"
    if us >= 1000:
        return f"{us / 1000:.2f} ms"
    return f"{us:.0f} µs"


def fmt_rate(n) -> str:
    if n >= 1_000_000 and n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    if n >= 1000 and n % 1000 == 0:
        return f"{n // 1000}k"
    return f"{n:,}"


def fmt_int(n) -> str:
    return "–" if n is None else f"{n:,.0f}"


def fmt_num(x, digits=3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def sustained(step: dict) -> bool:
    return step.get("stop") in (None, "deliveries/s stopped growing")


def step_at(doc: dict, rate: float) -> dict | None:
    for s in doc.get("throughput") or []:
        if s.get("rate") == rate and "loadgen" in s:
            return s
    return None


def env_note(machine: dict) -> str:
    """`, `NAME=value`` for each environment setting machine_info recorded."""
    return "".join(f", `{k}={v}`" for k, v in (machine.get("env") or {}).items())


def render_summary(docs: list[dict], tag: str) -> str:
    lines = [f"# WebSocket fan-out benchmark, {tag}", ""]
    clients = (docs[0].get("settings") or {}).get("clients", 1000) if docs else 1000
    if docs:
        m = docs[0].get("machine", {})
        st = docs[0].get("settings", {})
        lines += [
            f"Machine: {m.get('cpus')} CPUs ({m.get('cpu_model', '?')}), "
            f"{(m.get('mem_kib') or 0) / 1048576:.0f} GiB, Linux {m.get('kernel')}, "
            f"open files {m.get('nofile_limit')}"
            + env_note(m)
            + ". Server and load generator share the machine"
            + (", in one session (one scheduling group)." if m.get("one_session")
               else ", each in a session of its own"
               + (" (sched_autogroup on: one scheduling group each)." if m.get("sched_autogroup")
                  else ".")),
            f"Stream: {st.get('clients')} clients, ~150-byte messages, warm-up {st.get('warmup')} s, "
            f"measured {st.get('duration')} s per rate; idle: {st.get('idle_clients')} connections; "
            f"connection rate: {st.get('connect_clients')} clients per burst at --ramp "
            f"{', '.join(fmt_int(r) for r in st.get('connect_ramps') or [])} (best kept).",
            "",
        ]
    lines += [
        f"| server | max deliveries/s reached | p99 at {fmt_rate(100 * clients)} deliveries/s "
        f"| p99 at {fmt_rate(1000 * clients)} deliveries/s "
        "| server CPU-s per 1M deliveries | loadgen CPU-s per 1M deliveries | RSS per idle connection "
        "| new connections/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for doc in docs:
        steps = doc.get("throughput") or []
        ok = [s for s in steps if "loadgen" in s and sustained(s)]
        if ok:
            top = max(ok, key=lambda s: s["loadgen"].get("deliveries_per_sec") or 0)
            max_cell = f"{fmt_int(top['loadgen'].get('deliveries_per_sec'))} ({fmt_int(top['rate'])} msg/s)"
        elif steps:
            max_cell = "none sustained"
        else:
            max_cell = "–"

        def p99_cell(rate):
            s = step_at(doc, rate)
            if not s:
                return "–"
            cell = fmt_us((s["loadgen"].get("latency_us") or {}).get("p99"))
            if not sustained(s):
                cell += f" ({s['stop']}; {fmt_int(s['loadgen'].get('deliveries_per_sec'))}/s)"
            return cell

        s1m = step_at(doc, 1000)
        cpu_cell = fmt_num(s1m.get("server_cpu_secs_per_1m")) if s1m else "–"
        lg_cell = fmt_num(s1m.get("loadgen_cpu_secs_per_1m")) if s1m else "–"
        if s1m and not sustained(s1m):
            # Measured at what it did deliver, not at 1M/s: not comparable
            # with a server that kept the rate.
            cpu_cell += f" (not sustained: {fmt_int(s1m['loadgen'].get('deliveries_per_sec'))}/s)"
        if doc["server"] == "nats" and s1m and s1m.get("publisher_cpu_secs") is not None:
            notes.append(f"NATS: the publisher (`loadgen publish`) used {s1m['publisher_cpu_secs']:.3f} CPU-s "
                         f"in the {s1m.get('window_secs')} s window at 1000 msg/s on top of nats-server.")
        idle = doc.get("idle") or {}
        idle_cell = (f"{idle['kib_per_connection']:.1f} KiB" if idle.get("kib_per_connection") is not None
                     else "–")
        best = (doc.get("connect_rate") or {}).get("best") or {}
        conn_cell = fmt_int(best.get("connects_per_sec"))
        if best:
            conn_cell += f" (ramp {fmt_int(best.get('ramp'))})"
        lines.append(f"| {doc.get('label', doc['server'])} | {max_cell} | {p99_cell(100)} | {p99_cell(1000)} "
                     f"| {cpu_cell} | {lg_cell} | {idle_cell} | {conn_cell} |")
        mx = doc.get("max_idle")
        if mx:
            notes.append(f"{doc.get('label')}: most idle connections held: "
                         f"{fmt_int(mx.get('held_by_server_peak'))} of {fmt_int(mx.get('clients'))} tried "
                         f"(loadgen connected {fmt_int((mx.get('loadgen') or {}).get('connected'))}); "
                         f"RSS {fmt_int(mx.get('rss_kib_after'))} KiB.")
        for err in doc.get("errors") or []:
            notes.append(f"{doc.get('label')}: {err.splitlines()[0]}")
    lines += ["", f"Server CPU-s per 1M deliveries: measured at 1000 msg/s × {clients} clients "
              f"({fmt_rate(1000 * clients)} deliveries/s offered), over a window inside loadgen's "
              "measuring window; the loadgen column is the generator's CPU in the same window. "
              "p99 cells of a rate the server did not sustain say why and what it delivered."]
    if notes:
        lines += [""] + [f"- {n}" for n in notes]

    lines += ["", "## Stream steps", "",
              "| server | msg/s | connected | deliveries/s | p50 | p99 | p99.9 | max | gaps "
              "| in-server p99 | server CPU-s/1M | server CPU | loadgen CPU | machine busy | RSS KiB | stop |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for doc in docs:
        for s in sorted(doc.get("throughput") or [], key=lambda s: s.get("rate") or 0):
            r = s.get("loadgen") or {}
            lat = r.get("latency_us") or {}
            win = s.get("window_secs") or 0

            def pct(key):
                v = s.get(key)
                return f"{100 * v / win:.0f}%" if v is not None and win else "–"

            stop = s.get("stop") or ""
            if "error" in s:
                stop = "error: " + s["error"].splitlines()[0][:80]
            lines.append(
                f"| {doc['server']} | {fmt_int(s.get('rate'))} | {fmt_int(r.get('connected'))} "
                f"| {fmt_int(r.get('deliveries_per_sec'))} | {fmt_us(lat.get('p50'))} | {fmt_us(lat.get('p99'))} "
                f"| {fmt_us(lat.get('p999'))} | {fmt_us(lat.get('max'))} | {fmt_int(r.get('gaps'))} "
                f"| {fmt_delay(s.get('server_delay'))} "
                f"| {fmt_num(s.get('server_cpu_secs_per_1m'))} | {pct('server_cpu_secs')} "
                f"| {pct('loadgen_cpu_secs')} | "
                f"{'–' if s.get('machine_cpu_busy_pct') is None else str(s['machine_cpu_busy_pct']) + '%'} "
                f"| {fmt_int(s.get('rss_kib_during'))} | {stop} |")
    lines += ["", "CPU columns are percent of one core over the measuring window (200% = both cores); "
              "machine busy is of the whole machine (100% = both cores). In-server p99: the bucket "
              "bound of the gateway's own `gateway_delivery_delay_seconds` (one sample per socket "
              "write: from the emit of its oldest message to when the session took it for the write) "
              "that 99% of the window's writes fell under; the rest of p99 is the write itself (the "
              "kernel, the client's wake-up) and the load generator. Latency is measured from when "
              "each message was due by its producer's schedule, so a producer that fell behind "
              "shows in it.", ""]

    lines += ["## Idle connections", "",
              "| server | idle conns asked | held | RSS before KiB | RSS held KiB | KiB/conn | sampled after s |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for doc in docs:
        for key in ("idle", "max_idle"):
            idle = doc.get(key)
            if not idle:
                continue
            lines.append(
                f"| {doc['server']} | {fmt_int(idle.get('clients'))} | {fmt_int(idle.get('held_by_server_peak'))} "
                f"| {fmt_int(idle.get('rss_kib_before'))} | {fmt_int(idle.get('rss_kib_after'))} "
                f"| {fmt_num(idle.get('kib_per_connection'), 1)} | {fmt_num(idle.get('sampled_after_secs'), 1)} |")
    lines += ["", "## Connection rate", "",
              "| server | clients | --ramp | connected | failures | connects/s | listen-queue overflows "
              "| server CPU-s |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for doc in docs:
        conn = doc.get("connect_rate") or {}
        for run in conn.get("runs") or []:
            cl = run.get("loadgen") or {}
            lines.append(
                f"| {doc['server']} | {fmt_int(conn.get('clients'))} | {fmt_int(run.get('ramp'))} "
                f"| {fmt_int(cl.get('connected'))} | {fmt_int(cl.get('connect_failures'))} "
                f"| {fmt_int(cl.get('connects_per_sec'))} | {fmt_int(run.get('listen_overflows'))} "
                f"| {fmt_num(run.get('server_cpu_secs'), 2)} |"
                + (f" error: {run['error'].splitlines()[0][:80]}" if "error" in run else ""))
    lines += ["", "Listen-queue overflows are machine-wide (TcpExt ListenOverflows): SYNs dropped "
              "because the accept queue was full; those clients retry after 1 s.", ""]
    versions = [f"{d['server']}: " + ", ".join(f"{k} {v}" for k, v in (d.get("versions") or {}).items())
                for d in docs]
    lines += ["Versions: " + "; ".join(versions), ""]
    return "\n".join(lines)


def cmd_summary(cfg) -> int:
    results = Path(cfg.results).resolve()
    tag = cfg.tag
    if not tag:
        tags = sorted({p.name.rsplit("-", 1)[0] for p in results.glob("*.json")})
        if not tags:
            sys.exit(f"no results in {results}")
        tag = tags[-1]
    docs = []
    for name in SERVER_ORDER:
        path = results / f"{tag}-{name}.json"
        if path.is_file():
            docs.append(json.loads(path.read_text()))
    if not docs:
        sys.exit(f"no {tag}-<server>.json in {results}")
    summary = render_summary(docs, tag)
    (results / f"{tag}-summary.md").write_text(summary)
    print(summary)
    return 0


# --------------------------------------------------------------------------
# scale: the gateway's cost per delivery as clients and channels grow.

SCALE_CLIENTS = [100, 1000, 10000]
SCALE_CHANNELS = [1, 10, 100]
# Total deliveries/s offered in every cell of a level; the first level always
# runs, later ones only if they fit in --budget.
SCALE_TOTALS = [200_000, 1_000_000]
SCALE_MAX_CONNECTIONS = 100_000
BENCH_SCHEMA = ROOT / "examples" / "bench" / "bench.schema.json"


def write_scale_config(results: Path, channels: int) -> Path:
    """A gateway config with `channels` channels bench-0..K-1, each a ticker
    push source (pad 100, the bench schema) at rate BENCH_RATE, served at the
    literal path /bench/<i> on 127.0.0.1:9900. Returns the gateway.yaml."""
    d = results / f"scale-{channels}ch.tmp"
    if d.exists():
        shutil.rmtree(d)
    specs = d / "channels"
    specs.mkdir(parents=True)
    for i in range(channels):
        (specs / f"bench-{i}.yaml").write_text(
            f"# Generated by bench/run.py scale (channel {i} of {channels}).\n"
            f"channel: bench-{i}\n"
            f"description: Scale benchmark stream {i} of {channels}.\n"
            f"schema: {json.dumps(str(BENCH_SCHEMA))}\n"
            "source:\n"
            "  plugin: ticker\n"
            "  mode: push\n"
            "  config:\n"
            "    rate: 1\n"
            "    rate_env: BENCH_RATE\n"
            "    pad: 100\n"
            "queue:\n"
            "  on_full: drop_oldest\n"
            "endpoints:\n"
            f"  - path: /bench/{i}\n")
    conf = d / "gateway.yaml"
    conf.write_text(
        f"# Generated by bench/run.py scale: {channels} ticker channel(s), each at BENCH_RATE msg/s.\n"
        "listeners:\n"
        "  bench:\n"
        f"    bind: {HOST}:{PORTS['gateway']}\n"
        "plugins:\n"
        f"  dirs: [{json.dumps(str(ROOT / 'target' / 'release'))}]\n"
        "channels:\n"
        "  - channels/*.yaml\n"
        "limits:\n"
        f"  max_connections: {SCALE_MAX_CONNECTIONS}\n"
        "log:\n"
        "  level: warn\n")
    return conf


class ScaleGateway(Gateway):
    """The gateway with K generated channels; loadgen spreads its clients
    over /bench/0../bench/K-1 (client c follows channel c % K)."""

    label = "gateway (this repo), K channels"

    def __init__(self, cfg, conf: Path, channels: int, name: str):  # noqa: super() needs PORTS[name]
        self.cfg = cfg
        self.name = name
        self.port = PORTS["gateway"]
        self.proc = None
        self.publisher = None
        self.conf = conf
        self.channels = channels

    def check(self) -> None:
        if not os.access(self.binary(), os.X_OK):
            raise BenchError(f"{self.binary()} is missing: run `bench/run.py setup`")
        if not self.conf.is_file():
            raise BenchError(f"{self.conf} is missing")

    def command(self) -> list:
        return [self.binary(), "--config", self.conf]

    def url(self) -> str:
        return f"ws://{HOST}:{self.port}/bench/{{n}}"

    def client_args(self, mode: str) -> list[str]:
        return ["--url", self.url(), "--spread", str(self.channels), "--mode", mode]


def binaries_info(cfg) -> dict:
    """Size and mtime of the measured binaries (a rebuild during the run shows)."""
    out = {}
    for path in (ROOT / "target" / "release" / "gateway", ROOT / "target" / "release" / "libticker.so",
                 Path(cfg.loadgen)):
        try:
            st = path.stat()
            out[path.name] = {"bytes": st.st_size,
                              "mtime": dt.datetime.fromtimestamp(st.st_mtime).isoformat(timespec="seconds")}
        except OSError:
            out[path.name] = None
    return out


def scale_cell_estimate(cfg, clients: int) -> float:
    """Seconds one cell should take: start, connect, warm-up, window, stop."""
    return cfg.settle + 1.5 + clients / cfg.ramp + cfg.warmup + cfg.duration + 3.0


def scale_cell(cfg, total: float, clients: int, channels: int, conf: Path) -> dict:
    rate = total / clients
    cell = {
        "total_offered": total, "clients": clients, "channels": channels,
        "clients_per_channel": round(clients / channels, 2),
        "rate_per_channel": rate,
        "published_per_sec": rate * channels,
    }
    if clients < channels:
        cell["skipped"] = f"fewer clients ({clients}) than channels ({channels})"
        return cell
    if rate < 1:
        cell["skipped"] = f"per-channel rate {rate:g} msg/s is below 1"
        return cell
    if clients % channels:
        cell["uneven"] = True   # some channels have one client more
    server = ScaleGateway(cfg, conf, channels, f"scale-{int(total)}-{clients}c-{channels}ch")
    t0 = time.monotonic()
    try:
        step = stream_step(cfg, server, rate, clients)
    except BenchError as e:
        step = {"rate": rate, "clients": clients, "error": str(e)}
    cell["cell_secs"] = round(time.monotonic() - t0, 1)
    cell.update(step)
    cell["problem"] = step_problem(cell, 0.0)
    r = cell.get("loadgen") or {}
    dps = r.get("deliveries_per_sec") or 0
    win = cell.get("window_secs") or 0
    if dps and win and cell.get("server_cpu_secs") is not None:
        deliveries = dps * win
        cell["server_cores"] = round(cell["server_cpu_secs"] / win, 3)
        # 1 CPU-s per 1M deliveries is 1 µs per delivery.
        cell["server_cpu_us_per_delivery"] = round(1e6 * cell["server_cpu_secs"] / deliveries, 4)
        cell["server_user_us_per_delivery"] = round(1e6 * cell["server_user_secs"] / deliveries, 4)
        cell["server_system_us_per_delivery"] = round(1e6 * cell["server_system_secs"] / deliveries, 4)
        # Messages published (and parsed, validated, framed once) per second
        # by the K channels together, measured as deliveries / clients-per-channel.
        published = dps / (clients / channels)
        cell["server_cpu_us_per_published_message"] = round(
            1e6 * cell["server_cpu_secs"] / (published * win), 3)
        if cell.get("server_plugin_threads_cpu_secs") is not None:
            cell["plugin_threads_us_per_published_message"] = round(
                1e6 * cell["server_plugin_threads_cpu_secs"] / (published * win), 3)
        if cell.get("loadgen_cpu_secs") is not None:
            cell["loadgen_cores"] = round(cell["loadgen_cpu_secs"] / win, 3)
    return cell


def log_cell(cell: dict) -> None:
    r = cell.get("loadgen") or {}
    lat = r.get("latency_us") or {}
    if "skipped" in cell:
        log(f"scale: {cell['clients']} clients x {cell['channels']} channels: skipped ({cell['skipped']})")
        return
    log(f"scale: {fmt_rate(int(cell['total_offered']))}/s, {cell['clients']} clients x {cell['channels']} "
        f"channels ({cell['rate_per_channel']:g} msg/s each) -> {r.get('deliveries_per_sec')} deliveries/s, "
        f"p50 {lat.get('p50')} us, p99 {lat.get('p99')} us, gaps {r.get('gaps')}, server "
        f"{cell.get('server_cores')} cores, {cell.get('server_cpu_us_per_delivery')} us/delivery, "
        f"{cell.get('server_cpu_us_per_published_message')} us/message (plugin threads "
        f"{cell.get('plugin_threads_us_per_published_message')})"
        + (f"; problem: {cell['problem']}" if cell.get("problem") else "")
        + (f"; error: {cell['error'].splitlines()[0]}" if "error" in cell else ""))


def cmd_scale(cfg) -> int:
    cfg.results = Path(cfg.results).resolve()
    cfg.results.mkdir(parents=True, exist_ok=True)
    cfg.loadgen = Path(cfg.loadgen).resolve()
    if not os.access(cfg.loadgen, os.X_OK):
        sys.exit(f"{cfg.loadgen} is missing: run `bench/run.py setup`")
    if not BENCH_SCHEMA.is_file():
        sys.exit(f"{BENCH_SCHEMA} is missing")
    tag = cfg.tag or f"{dt.date.today().isoformat()}-scale"
    json_path = cfg.results / f"{tag}.json"
    md_path = cfg.results / f"{tag}.md"
    started = time.monotonic()

    # A quiet machine first (bounded): another process may be using the CPU.
    load1 = os.getloadavg()[0]
    if cfg.max_load and load1 >= cfg.max_load and cfg.wait_load > 0:
        log(f"load average {load1:.2f} >= {cfg.max_load}: waiting up to {cfg.wait_load:.0f} s")
        wait_until(lambda: os.getloadavg()[0] < cfg.max_load, time.monotonic() + cfg.wait_load, poll=5.0)
        load1 = os.getloadavg()[0]
        if load1 >= cfg.max_load:
            log(f"warning: load average still {load1:.2f}; running anyway")
    a = machine_cpu()
    time.sleep(1.0)
    b = machine_cpu()
    busy_before = round(100.0 * (b[0] - a[0]) / max(1, b[1] - a[1]), 1)
    if busy_before > 20:
        log(f"warning: the machine is already {busy_before}% busy before the benchmark: results will be noisy")
    started = time.monotonic()   # the budget counts from here, not from the wait

    gw = Gateway(cfg)
    doc = {
        "kind": "scale", "tag": tag,
        "started_at": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_info(),
        "versions": gw.versions(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(cfg).items()
                     if k not in ("func",)},
        "binaries": binaries_info(cfg),
        "loadavg_before": [round(x, 2) for x in os.getloadavg()],
        "machine_busy_pct_before": busy_before,
        "levels": [],
    }

    def save() -> None:
        doc["elapsed_secs"] = round(time.monotonic() - started, 1)
        json_path.write_text(json.dumps(doc, indent=2) + "\n")
        md_path.write_text(render_scale(doc))

    confs = {k: write_scale_config(cfg.results, k) for k in cfg.channels}
    cells_secs: dict[tuple[int, int], float] = {}   # (clients, channels) -> last measured cell time
    for li, total in enumerate(cfg.totals):
        level = {"total_offered": total, "cells": []}
        doc["levels"].append(level)
        plan = [(c, k) for c in cfg.clients for k in cfg.channels]
        estimate = sum(cells_secs.get(ck, scale_cell_estimate(cfg, ck[0])) for ck in plan)
        elapsed = time.monotonic() - started
        if li > 0 and elapsed + estimate > cfg.budget:
            level["skipped"] = (f"time budget: {elapsed:.0f} s used, the level needs ~{estimate:.0f} s, "
                                f"budget {cfg.budget:.0f} s")
            log(f"scale: {fmt_rate(int(total))} deliveries/s skipped ({level['skipped']})")
            save()
            continue
        log(f"scale: level {fmt_rate(int(total))} deliveries/s offered, {len(plan)} cells, ~{estimate:.0f} s")
        for clients, channels in plan:
            est = cells_secs.get((clients, channels), scale_cell_estimate(cfg, clients))
            elapsed = time.monotonic() - started
            if elapsed + est > cfg.budget:
                cell = {"total_offered": total, "clients": clients, "channels": channels,
                        "skipped": f"time budget ({elapsed:.0f} s used, ~{est:.0f} s needed)"}
            else:
                cell = scale_cell(cfg, total, clients, channels, confs[channels])
                if "cell_secs" in cell:
                    cells_secs[(clients, channels)] = cell["cell_secs"]
            log_cell(cell)
            level["cells"].append(cell)
            save()
    doc["finished_at"] = dt.datetime.now().isoformat(timespec="seconds")
    if binaries_info(cfg) != doc["binaries"]:
        doc["binaries_changed_during_run"] = binaries_info(cfg)
        log("warning: a measured binary was rebuilt during the run")
    save()
    print(md_path.read_text())
    log(f"wrote {json_path} and {md_path.name}; total {time.monotonic() - started:.0f} s")
    return 0


def fmt_us_cost(x) -> str:
    return "–" if x is None else f"{x:.2f}"


def render_scale(doc: dict) -> str:
    m = doc.get("machine") or {}
    st = doc.get("settings") or {}
    lines = [f"# Gateway cost vs clients and channels, {doc.get('tag')}", ""]
    lines += [
        f"Machine: {m.get('cpus')} CPUs ({m.get('cpu_model', '?')}), "
        f"{(m.get('mem_kib') or 0) / 1048576:.0f} GiB, Linux {m.get('kernel')}; gateway "
        f"{(doc.get('versions') or {}).get('git', '?')}"
        + env_note(m)
        + ". Server and loadgen share the machine "
        f"(load average before: {', '.join(str(x) for x in doc.get('loadavg_before') or [])}; "
        f"{doc.get('machine_busy_pct_before')}% busy in the second before).",
        "",
        "Workload: K channels `bench-0`…`bench-K-1`, each a `ticker` push source "
        "(`pad: 100`, ~150-byte messages, validated against `examples/bench/bench.schema.json`) "
        "at its own path `/bench/<i>`; loadgen spreads the clients evenly "
        "(`--spread K`: client c follows `/bench/<c mod K>`, and checks that channel's own `seq`). "
        "Each client follows one channel, so the per-channel rate is total / clients and every cell "
        "of a level offers the same deliveries/s; messages published/s = K × that rate. "
        f"loadgen `--sources {st.get('sources')}`, `--ramp {fmt_int(st.get('ramp'))}`, warm-up "
        f"{st.get('warmup')} s, window {st.get('duration')} s; server CPU (utime+stime from /proc) over "
        f"a window of {max(1.0, (st.get('duration') or 0) - (st.get('window_lead') or 0) - 1.0):g} s inside "
        "loadgen's. A fresh gateway for every cell.",
        "",
        "**µs per delivery** = server CPU-s / deliveries in the window × 1e6, which is the same "
        "number as server CPU-s per 1M deliveries. *sys* is the kernel's part of it. "
        "**µs per message** divides by the messages the channels published instead; *plugin "
        "threads* is the part of it spent in the push plugins' own threads (`gw-*`: the `ticker`s "
        "formatting, pacing and emitting).",
        "",
    ]
    for level in doc.get("levels") or []:
        total = int(level["total_offered"])
        lines += [f"## {fmt_rate(total)} deliveries/s offered", ""]
        if level.get("skipped"):
            lines += [f"Not run: {level['skipped']}.", ""]
            continue
        lines += [
            "| clients | channels | clients / channel | msg/s per channel | published msg/s "
            "| deliveries/s | of offered | p50 | p99 | gaps | server cores "
            "| server CPU-s per 1M deliveries = µs per delivery | of which sys | µs per message "
            "| of which plugin threads | loadgen cores | machine busy | note |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for c in level.get("cells") or []:
            r = c.get("loadgen") or {}
            lat = r.get("latency_us") or {}
            note = c.get("skipped") or c.get("problem") or ""
            if "error" in c:
                note = "error: " + c["error"].splitlines()[0][:80]
            if c.get("uneven"):
                note = (note + "; " if note else "") + "uneven spread"
            dps = r.get("deliveries_per_sec")
            ratio = f"{100 * dps / c['total_offered']:.1f}%" if dps else "–"
            busy = c.get("machine_cpu_busy_pct")
            lines.append(
                f"| {fmt_int(c['clients'])} | {c['channels']} | {c.get('clients_per_channel', '–'):g} "
                f"| {c['rate_per_channel']:g} | {fmt_int(c.get('published_per_sec'))} "
                f"| {fmt_int(dps)} | {ratio} | {fmt_us(lat.get('p50'))} | {fmt_us(lat.get('p99'))} "
                f"| {fmt_int(r.get('gaps'))} | {fmt_num(c.get('server_cores'), 2)} "
                f"| **{fmt_us_cost(c.get('server_cpu_us_per_delivery'))}** "
                f"| {fmt_us_cost(c.get('server_system_us_per_delivery'))} "
                f"| {fmt_us_cost(c.get('server_cpu_us_per_published_message'))} "
                f"| {fmt_us_cost(c.get('plugin_threads_us_per_published_message'))} "
                f"| {fmt_num(c.get('loadgen_cores'), 2)} "
                f"| {'–' if busy is None else f'{busy:.0f}%'} | {note} |"
                if "skipped" not in c else
                f"| {fmt_int(c['clients'])} | {c['channels']} | – | – | – | – | – | – | – | – | – | – | – "
                f"| – | – | – | – | skipped: {c['skipped']} |")
        # The pivot the issue asks for: flat along the clients axis?
        chans = sorted({c["channels"] for c in level.get("cells") or []})
        clis = sorted({c["clients"] for c in level.get("cells") or []})
        get = {(c["clients"], c["channels"]): c for c in level.get("cells") or []}
        lines += ["", "µs of server CPU per delivery (rows: clients, columns: channels):", "",
                  "| clients \\ channels | " + " | ".join(str(k) for k in chans) + " |",
                  "|---:|" + "---:|" * len(chans)]
        for cl in clis:
            cells = []
            for k in chans:
                c = get.get((cl, k)) or {}
                v = c.get("server_cpu_us_per_delivery")
                cell = fmt_us_cost(v)
                if v is not None and c.get("problem"):
                    cell += " †"
                cells.append(cell)
            lines.append(f"| {fmt_int(cl)} | " + " | ".join(cells) + " |")
        if any(c.get("problem") for c in level.get("cells") or []):
            lines += ["", "† the cell was not sustained (see its note): the figure describes an "
                      "overloaded system."]
        lines.append("")
    lines += [f"Runner time: {doc.get('elapsed_secs')} s. Raw loadgen lines and samples: "
              f"`{doc.get('tag')}.json`.", ""]
    return "\n".join(lines)


def cmd_scale_summary(cfg) -> int:
    results = Path(cfg.results).resolve()
    tag = cfg.tag or f"{dt.date.today().isoformat()}-scale"
    path = results / f"{tag}.json"
    if not path.is_file():
        sys.exit(f"{path} is missing")
    md = render_scale(json.loads(path.read_text()))
    (results / f"{tag}.md").write_text(md)
    print(md)
    return 0


# --------------------------------------------------------------------------
# cluster: one gateway against two, one cluster over NATS JetStream.

CLUSTER_SETUPS = ["memory", "nats-1", "nats-2"]
CLUSTER_RATES = [100, 1000]
CLUSTER_INSTANCES = ["gw-a", "gw-b"]
LEASE_LINE = re.compile(r'^gateway_source_lease_held\{channel="bench",instance="([^"]*)"\} (\d+)', re.M)
# No proxy for the runner's own HTTP requests to 127.0.0.1.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def http_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, str]:
    """(status, body) of GET http://127.0.0.1:port/path; status 0 when unreachable."""
    try:
        with _HTTP.open(f"http://{HOST}:{port}{path}", timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, ""
    except (OSError, ValueError):
        return 0, ""


class PrivateNats:
    """The run's own nats-server with JetStream: a free port, a temporary
    store, killed (and the store removed) at the end. Never the one on 4222."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.port = free_port()
        while self.port == 4222:
            self.port = free_port()
        # Its monitoring port: /jsz and /connz show what the server delivered
        # to each instance's consumer.
        self.monitor = free_port()
        self.store: Path | None = None
        self.proc: Proc | None = None

    def url(self) -> str:
        return f"nats://{HOST}:{self.port}"

    def start(self) -> None:
        binary = nats_server_path()
        if not binary:
            raise BenchError("nats-server not found (looked on PATH and /usr/sbin)")
        self.store = Path(tempfile.mkdtemp(prefix="bench-cluster-js-"))
        self.proc = Proc("cluster-nats-server", [binary, "-js", "-a", HOST, "-p", self.port,
                                                 "-m", self.monitor, "-sd", self.store],
                         results=self.cfg.results)
        if not wait_until(lambda: port_open(self.port), time.monotonic() + self.cfg.start_timeout,
                          alive=self.proc.alive):
            tail = self.proc.log_tail()
            self.stop()
            raise BenchError(f"nats-server did not accept on {HOST}:{self.port}\n{tail}")
        time.sleep(0.5)
        if not self.proc.alive():
            raise BenchError(f"nats-server exited after start-up\n{self.proc.log_tail()}")
        log(f"cluster: private nats-server (JetStream) on {self.url()}, store {self.store}")

    def pids(self) -> list[int]:
        return process_tree(self.proc.pid) if self.proc and self.proc.alive() else []

    def consumers(self, prefix: str) -> dict:
        """Stream `{prefix}_messages` as the server sees it: its last
        sequence, and per consumer (named by the instance whose connection
        subscribed to its deliver subject) the messages it delivered
        (`consumer_seq`) and the stream sequence it reached."""
        out: dict = {}
        status, text = http_get(self.monitor, "/jsz?consumers=true&config=true")
        status2, text2 = http_get(self.monitor, "/connz?subs=detail")
        if status != 200:
            return out
        owner = {}
        if status2 == 200:
            for conn in json.loads(text2).get("connections") or []:
                name = (conn.get("name") or "").removeprefix("gateway ")
                for sub in conn.get("subscriptions_list_detail") or []:
                    owner[sub.get("subject")] = name
        for acct in json.loads(text).get("account_details") or []:
            for st in acct.get("stream_detail") or []:
                if st.get("name") != f"{prefix}_messages":
                    continue
                out["stream_last_seq"] = (st.get("state") or {}).get("last_seq")
                out["consumers"] = {}
                for c in st.get("consumer_detail") or []:
                    who = owner.get((c.get("config") or {}).get("deliver_subject"), c.get("name"))
                    d = c.get("delivered") or {}
                    out["consumers"][who] = {"consumer_seq": d.get("consumer_seq"),
                                             "stream_seq": d.get("stream_seq"),
                                             "num_pending": c.get("num_pending")}
        return out

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()
            self.proc = None
        if self.store:
            shutil.rmtree(self.store, ignore_errors=True)
            self.store = None

    def version(self) -> str:
        return capture([nats_server_path() or "nats-server", "--version"]).split(":", 1)[-1].strip()


def write_cluster_config(results: Path, setup: str, instance: str, port: int,
                         broker: dict | None) -> Path:
    """The bench deployment (examples/bench: one ticker channel `bench` at
    /bench, pad 100, the bench schema) on 127.0.0.1:`port`, with the
    in-memory broker (`broker` None) or `broker: {kind: nats, ...}`."""
    d = results / f"cluster-{setup}.tmp"
    d.mkdir(parents=True, exist_ok=True)
    (d / "bench.yaml").write_text(
        "# Generated by bench/run.py cluster: examples/bench/bench.yaml with an absolute schema path.\n"
        "channel: bench\n"
        "description: Benchmark stream of numbered, timestamped, padded messages.\n"
        f"schema: {json.dumps(str(BENCH_SCHEMA))}\n"
        "source:\n"
        "  plugin: ticker\n"
        "  mode: push\n"
        "  config:\n"
        "    rate: 1000\n"
        "    rate_env: BENCH_RATE\n"
        "    pad: 100\n"
        "queue:\n"
        "  on_full: drop_oldest\n"
        "endpoints:\n"
        "  - path: /bench\n")
    broker_yaml = ""
    if broker:
        broker_yaml = ("broker:\n"
                       "  kind: nats\n"
                       f"  url: {broker['url']}\n"
                       f"  subject_prefix: {broker['subject_prefix']}\n"
                       f"  instance: {instance}\n")
    conf = d / f"gateway-{instance}.yaml"
    conf.write_text(
        f"# Generated by bench/run.py cluster: setup {setup}, instance {instance}.\n"
        "listeners:\n"
        "  bench:\n"
        f"    bind: {HOST}:{port}\n"
        "plugins:\n"
        f"  dirs: [{json.dumps(str(ROOT / 'target' / 'release'))}]\n"
        "channels:\n"
        "  - bench.yaml\n"
        "limits:\n"
        f"  max_connections: {SCALE_MAX_CONNECTIONS}\n"
        + broker_yaml +
        "log:\n"
        "  level: info\n")
    return conf


class ClusterGateway(Gateway):
    """One gateway process of a cluster setup, on its own port; started
    means: it logged `listening` and its /readyz answers 200."""

    def __init__(self, cfg, name: str, conf: Path, port: int, instance: str):  # noqa: no PORTS entry
        self.cfg = cfg
        self.name = name
        self.port = port
        self.proc = None
        self.publisher = None
        self.conf = conf
        self.instance = instance

    def check(self) -> None:
        if not os.access(self.binary(), os.X_OK):
            raise BenchError(f"{self.binary()} is missing: run `bench/run.py setup`")
        if not self.conf.is_file():
            raise BenchError(f"{self.conf} is missing")

    def command(self) -> list:
        return [self.binary(), "--config", self.conf]

    def start(self, rate: float) -> Proc:
        # The listener is bound before the gateway joins the cluster, so an
        # accepting port is not enough: wait for /readyz.
        proc = super().start(rate)
        deadline = time.monotonic() + self.cfg.start_timeout
        if not wait_until(lambda: http_get(self.port, "/readyz")[0] == 200, deadline, alive=proc.alive):
            tail = proc.log_tail()
            self.stop()
            raise BenchError(f"{self.name}: /readyz did not answer 200 within "
                             f"{self.cfg.start_timeout:.0f} s\n{tail}")
        if "listening" not in proc.log_path.read_text(errors="replace"):
            tail = proc.log_tail()
            self.stop()
            raise BenchError(f"{self.name}: ready but never logged `listening`\n{tail}")
        return proc

    def lease_held(self) -> int | None:
        """gateway_source_lease_held of channel bench on /metrics (None: no such line)."""
        status, text = http_get(self.port, "/metrics")
        m = LEASE_LINE.search(text) if status == 200 else None
        return int(m.group(2)) if m else None


class GatewayGroup:
    """The gateway processes of one setup, sampled as one server."""

    def __init__(self, gateways: list[ClusterGateway]):
        self.gateways = gateways

    def pids(self) -> list[int]:
        return [p for gw in self.gateways for p in gw.pids()]


def merge_loadgens(results: list[dict], clients: int) -> dict:
    """One loadgen-shaped report from several. Counts add up; the latency
    histograms are not in loadgen's output, so percentiles cannot be merged:
    a percentile of the union lies between the smallest and the largest of
    the loadgens' own, and the largest (the worst) is what `latency_us`
    carries (`*_best` the smallest). max and the mean are exact."""
    out: dict = {"loadgens": len(results)}
    for k in ("clients", "connected", "connect_failures", "messages", "gaps", "dups",
              "clients_with_gaps", "silent_clients", "disconnects", "connected_at_end"):
        out[k] = sum(r.get(k) or 0 for r in results)
    out["deliveries_per_sec"] = round(sum(r.get("deliveries_per_sec") or 0 for r in results), 1)
    expected = sum(r.get("expected_deliveries") or 0 for r in results)
    if expected:
        out["expected_deliveries"] = expected
        out["delivery_ratio"] = round(out["messages"] / expected, 4)
    lats = [r.get("latency_us") for r in results if r.get("latency_us")]
    if lats:
        lat = {}
        for q in ("p50", "p90", "p99", "p999"):
            lat[q] = max(x[q] for x in lats)
            lat[f"{q}_best"] = min(x[q] for x in lats)
        lat["max"] = max(x["max"] for x in lats)
        samples = sum(x.get("samples") or 0 for x in lats)
        lat["samples"] = samples
        if samples:
            lat["mean"] = round(sum(x["mean"] * x["samples"] for x in lats) / samples, 1)
        lat["exact"] = len(lats) == 1
        out["latency_us"] = lat
    else:
        out["latency_us"] = None
    out["clients"] = out["clients"] or clients
    return out


def cluster_step(cfg, nats: PrivateNats, setup: str, rate: float, run: int) -> dict:
    """One setup at `rate` msg/s: fresh gateway process(es), --loadgens
    loadgen processes sharing the clients (spread over the instances), the
    gateways' CPU (summed) over a window inside the loadgens' windows."""
    clients, warmup, duration = cfg.clients, cfg.warmup, cfg.duration
    n_gw = 2 if setup == "nats-2" else 1
    n_lg = cfg.loadgens
    shares = [clients // n_lg + (1 if j < clients % n_lg else 0) for j in range(n_lg)]
    ramp = cfg.ramp / n_lg   # each loadgen; together they connect at --ramp
    connect_secs = clients / cfg.ramp
    label = f"cluster-{setup}-{rate_env(rate)}-r{run}"
    prefix = re.sub(r"[^A-Za-z0-9_]", "_", f"bench_{os.getpid()}_{setup}_{rate_env(rate)}_r{run}")
    step = {"setup": setup, "rate": rate, "run": run, "clients": clients, "instances": n_gw,
            "warmup_secs": warmup, "duration_secs": duration, "loadgen_clients": shares}
    if setup != "memory":
        step["broker"] = {"kind": "nats", "url": nats.url(), "subject_prefix": prefix}
    gws: list[ClusterGateway] = []
    lgs: list[Proc] = []
    try:
        for i in range(n_gw):
            inst = CLUSTER_INSTANCES[i]
            port = free_port()
            broker = None if setup == "memory" else {"url": nats.url(), "subject_prefix": prefix}
            conf = write_cluster_config(cfg.results, setup, inst, port, broker)
            gw = ClusterGateway(cfg, f"{label}-{inst}", conf, port, inst)
            gws.append(gw)
            gw.start(rate)
            if broker and i == 0:
                # The first instance takes the source's lease before the
                # second one starts, so gw-a is the one running the source.
                if not wait_until(lambda: gw.lease_held() == 1, time.monotonic() + 10):
                    raise BenchError(f"{gw.name} did not take the source's lease within 10 s\n"
                                     f"{gw.proc.log_tail()}")
        step["ports"] = {gw.instance: gw.port for gw in gws}
        if setup != "memory":
            time.sleep(1.0)   # a heartbeat round: each instance has seen the other
            held = {gw.instance: gw.lease_held() for gw in gws}
            step["lease_held"] = held
            if sorted(held.values()) != [0] * (n_gw - 1) + [1]:
                raise BenchError(f"expected exactly one lease holder, /metrics says {held}")
        if setup != "memory":
            before = {"metrics": {gw.instance: broker_metrics(gw) for gw in gws},
                      "nats": nats.consumers(prefix)}
        group = GatewayGroup(gws)
        pids = group.pids()
        base_fds = fd_count(pids)
        step["rss_kib_before"] = {gw.instance: rss_kib(gw.pids()) for gw in gws}
        # Loadgen j follows instance j mod n: with two instances, half the
        # clients on the lease holder (gw-a), half on the other (gw-b).
        for j, share in enumerate(shares):
            gw = gws[j % n_gw]
            lgs.append(Proc(f"{label}-loadgen-{j}", loadgen_cmd(cfg, gw, "stream", [
                "--clients", share, "--ramp", ramp, "--warmup", secs_arg(warmup),
                "--duration", secs_arg(duration), "--expect-rate", rate_env(rate)]),
                results=cfg.results, capture_stdout=True))
        step["loadgen_targets"] = [gws[j % n_gw].instance for j in range(n_lg)]
        t0 = min(lg.started for lg in lgs)
        hard_deadline = t0 + connect_secs + warmup + duration + cfg.step_slack
        all_alive = lambda: all(lg.alive() for lg in lgs)  # noqa: E731
        wait_until(lambda: fd_count(pids) - base_fds >= clients or all(loadgen_connected(lg) for lg in lgs),
                   t0 + connect_secs + cfg.connect_slack, alive=all_alive)
        t_conn = time.monotonic()
        step["server_saw_all_clients"] = fd_count(pids) - base_fds >= clients
        step["loadgen_connect_phase_over"] = all(loadgen_connected(lg) for lg in lgs)
        step["connect_wait_secs"] = round(t_conn - t0, 3)
        others: dict[str, Proc | None] = {f"loadgen{j}": lg for j, lg in enumerate(lgs)}
        others.update({gw.instance: gw.proc for gw in gws})
        others["nats"] = nats.proc
        if sleep_until(t_conn + warmup + cfg.window_lead, alive=all_alive):
            a = Sample(group, others)
            sleep_until(a.t + max(1.0, duration - cfg.window_lead - 1.0), alive=all_alive)
            b = Sample(group, others)
            win = window(a, b)
            step.update(win)
            step["loadgen_cpu_secs"] = round(sum(win.get(f"loadgen{j}_cpu_secs") or 0
                                                 for j in range(n_lg)), 3)
            step["window_inside_loadgen_run"] = all_alive()
            # Whatever else ran meanwhile (the runner, other users): machine
            # busy minus the gateways, loadgens and nats-server, in cores.
            if win.get("machine_cpu_busy_pct") is not None and win["window_secs"]:
                ours = step["server_cpu_secs"] + step["loadgen_cpu_secs"] + (win.get("nats_cpu_secs") or 0)
                step["other_cores"] = round(win["machine_cpu_busy_pct"] / 100 * (os.cpu_count() or 1)
                                            - ours / win["window_secs"], 2)
            step["rss_kib_during"] = {gw.instance: rss_kib(gw.pids()) for gw in gws}
            step["nats_rss_kib_during"] = rss_kib(nats.pids())
        else:
            step["window_inside_loadgen_run"] = False
        raw = []
        for lg in lgs:
            raw.append(finish_loadgen(lg, hard_deadline))
        lgs = []
        step["loadgens"] = raw
        step["loadgen"] = merge_loadgens(raw, clients)
        if setup != "memory":
            step["lease_held_after"] = {gw.instance: gw.lease_held() for gw in gws}
            after = {"metrics": {gw.instance: broker_metrics(gw) for gw in gws},
                     "nats": nats.consumers(prefix)}
            step["broker_metrics"] = after["metrics"]
            step["nats_path"] = nats_path(before, after)
        dps = step["loadgen"].get("deliveries_per_sec") or 0
        if step.get("window_secs") and dps:
            deliveries_m = dps * step["window_secs"] / 1e6
            step["server_cpu_secs_per_1m"] = round(step["server_cpu_secs"] / deliveries_m, 4)
            step["loadgen_cpu_secs_per_1m"] = round(step["loadgen_cpu_secs"] / deliveries_m, 4)
            if step.get("nats_cpu_secs") is not None:
                step["nats_cpu_secs_per_1m"] = round(step["nats_cpu_secs"] / deliveries_m, 4)
        step["expected_deliveries_per_sec"] = rate * clients
        return step
    finally:
        for lg in lgs:
            lg.stop(grace=2.0)
        for gw in gws:
            gw.stop()


def broker_metrics(gw: ClusterGateway) -> dict:
    """The instance's gateway_broker_* / gateway_cluster_* counters."""
    status, text = http_get(gw.port, "/metrics")
    out = {}
    if status != 200:
        return out
    for line in text.splitlines():
        if line.startswith(("gateway_broker_", "gateway_cluster_", "gateway_source_leases_")):
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                pass
    return out


def nats_path(before: dict, after: dict) -> dict:
    """What went through NATS during the loadgen run (between two snapshots):
    messages the source's instance sent, what each consumer got from
    nats-server, and what each other instance handed to its sessions."""
    out: dict = {"before": before, "after": after}
    mb, ma = before["metrics"], after["metrics"]
    sent_key = "gateway_broker_messages_sent_total"
    recv_key = "gateway_broker_messages_received_total"
    sent = sum((ma[i].get(sent_key) or 0) - (mb.get(i, {}).get(sent_key) or 0) for i in ma)
    out["sent"] = sent
    nb, na = before.get("nats") or {}, after.get("nats") or {}
    stream = (na.get("stream_last_seq") or 0) - (nb.get("stream_last_seq") or 0)
    out["stream_messages"] = stream
    out["instances"] = {}
    for inst, m in ma.items():
        got = (m.get(recv_key) or 0) - (mb.get(inst, {}).get(recv_key) or 0)
        row = {"received": got}
        ca = (na.get("consumers") or {}).get(inst)
        cb = (nb.get("consumers") or {}).get(inst)
        if ca and cb and ca.get("consumer_seq") is not None and cb.get("consumer_seq") is not None:
            row["delivered_by_nats"] = ca["consumer_seq"] - cb["consumer_seq"]
            if stream:
                row["delivered_by_nats_share"] = round(row["delivered_by_nats"] / stream, 4)
        if sent and got:
            row["received_share"] = round(got / sent, 4)
        out["instances"][inst] = row
    return out


def log_cluster_step(step: dict) -> None:
    r = step.get("loadgen") or {}
    lat = r.get("latency_us") or {}
    per = ", ".join(f"{(x.get('latency_us') or {}).get('p50')}/{(x.get('latency_us') or {}).get('p99')}"
                    for x in step.get("loadgens") or [])
    log(f"cluster: {step['setup']} at {rate_env(step['rate'])} msg/s (run {step['run']}) -> "
        f"{r.get('deliveries_per_sec')} deliveries/s, p50/p99 per loadgen [{per}] us, max {lat.get('max')} us, "
        f"gaps {r.get('gaps')}, dups {r.get('dups')}, gateway CPU-s/1M {step.get('server_cpu_secs_per_1m')}"
        + "".join(f"; {inst} got {row.get('received')} of {(step['nats_path'].get('sent'))} sent"
                  for inst, row in ((step.get("nats_path") or {}).get("instances") or {}).items()
                  if row.get("received"))
        + (f"; problem: {step['problem']}" if step.get("problem") else "")
        + (f"; error: {step['error'].splitlines()[0]}" if "error" in step else ""))


def cmd_cluster(cfg) -> int:
    cfg.results = Path(cfg.results).resolve()
    cfg.results.mkdir(parents=True, exist_ok=True)
    cfg.loadgen = Path(cfg.loadgen).resolve()
    if not os.access(cfg.loadgen, os.X_OK):
        sys.exit(f"{cfg.loadgen} is missing: run `bench/run.py setup`")
    if not BENCH_SCHEMA.is_file():
        sys.exit(f"{BENCH_SCHEMA} is missing")
    setups = [s.strip() for s in cfg.setups.split(",") if s.strip()]
    bad = [s for s in setups if s not in CLUSTER_SETUPS]
    if bad:
        sys.exit(f"unknown setup(s): {', '.join(bad)} (known: {', '.join(CLUSTER_SETUPS)})")
    if cfg.loadgens < 2 and "nats-2" in setups:
        sys.exit("--loadgens must be at least 2 for nats-2 (one per instance)")
    if cfg.quick:
        cfg.duration = cfg.duration or 3
        cfg.warmup = cfg.warmup or 1
        cfg.repeat = cfg.repeat or 1
    cfg.duration = cfg.duration or 10
    cfg.warmup = cfg.warmup or 2
    cfg.repeat = cfg.repeat or 3
    tag = cfg.tag or (dt.date.today().isoformat() + ("-quick" if cfg.quick else ""))
    json_path = cfg.results / f"{tag}-cluster.json"
    md_path = cfg.results / f"{tag}-cluster-summary.md"

    # A quiet machine first (bounded), as for scale.
    load1 = os.getloadavg()[0]
    if cfg.max_load and load1 >= cfg.max_load and cfg.wait_load > 0:
        log(f"load average {load1:.2f} >= {cfg.max_load}: waiting up to {cfg.wait_load:.0f} s")
        wait_until(lambda: os.getloadavg()[0] < cfg.max_load, time.monotonic() + cfg.wait_load, poll=5.0)
        load1 = os.getloadavg()[0]
        if load1 >= cfg.max_load:
            log(f"warning: load average still {load1:.2f}; running anyway")
    a = machine_cpu()
    time.sleep(1.0)
    b = machine_cpu()
    busy_before = round(100.0 * (b[0] - a[0]) / max(1, b[1] - a[1]), 1)
    if busy_before > 20:
        log(f"warning: the machine is already {busy_before}% busy before the benchmark: results will be noisy")
    started = time.monotonic()
    nats = PrivateNats(cfg)
    doc = {
        "kind": "cluster", "tag": tag, "quick": cfg.quick,
        "started_at": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_info(),
        "versions": {**Gateway(cfg).versions(), "nats-server": nats.version()},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(cfg).items()
                     if k not in ("func",)},
        "binaries": binaries_info(cfg),
        "loadavg_before": [round(x, 2) for x in os.getloadavg()],
        "machine_busy_pct_before": busy_before,
        "nats": {"port": nats.port},
        "steps": [],
    }

    def save() -> None:
        doc["elapsed_secs"] = round(time.monotonic() - started, 1)
        json_path.write_text(json.dumps(doc, indent=2) + "\n")
        md_path.write_text(render_cluster(doc))

    try:
        nats.start()
        # Rates outside, setups inside: the three setups of one rate run
        # back to back, and --repeat rounds interleave, so a drift of the
        # machine shows up in every setup alike.
        for run in range(1, cfg.repeat + 1):
            for rate in cfg.rates:
                for setup in setups:
                    busy = quiet_machine(cfg)
                    log(f"cluster: {setup}, {cfg.clients} clients at {rate_env(rate)} msg/s (run {run})")
                    try:
                        step = cluster_step(cfg, nats, setup, rate, run)
                    except BenchError as e:
                        step = {"setup": setup, "rate": rate, "run": run, "clients": cfg.clients,
                                "error": str(e)}
                    step["machine_busy_pct_before"] = busy
                    step["problem"] = step_problem(step, 0.0)
                    if nats.proc is None or not nats.proc.alive():
                        step["error"] = step.get("error") or "nats-server died"
                    log_cluster_step(step)
                    doc["steps"].append(step)
                    save()
                    if nats.proc is None or not nats.proc.alive():
                        raise BenchError(f"the private nats-server died\n{nats.proc.log_tail() if nats.proc else ''}")
    finally:
        nats.stop()
    doc["finished_at"] = dt.datetime.now().isoformat(timespec="seconds")
    if binaries_info(cfg) != doc["binaries"]:
        doc["binaries_changed_during_run"] = binaries_info(cfg)
        log("warning: a measured binary was rebuilt during the run")
    save()
    print(md_path.read_text())
    log(f"wrote {json_path} and {md_path.name}; total {time.monotonic() - started:.0f} s")
    return 0


def quiet_machine(cfg) -> float:
    """Wait (up to --step-quiet-wait s) until the machine is under
    --step-max-busy % busy over a second, so that another user's burst of
    work does not land in a step; the last reading."""
    deadline = time.monotonic() + cfg.step_quiet_wait
    while True:
        a = machine_cpu()
        time.sleep(1.0)
        b = machine_cpu()
        busy = round(100.0 * (b[0] - a[0]) / max(1, b[1] - a[1]), 1)
        if busy <= cfg.step_max_busy or time.monotonic() >= deadline:
            if busy > cfg.step_max_busy:
                log(f"warning: the machine is {busy}% busy before this step; running anyway")
            return busy


def median(xs: list) -> float | None:
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


CLUSTER_LABELS = {
    "memory": "memory: 1 gateway, in-memory broker",
    "nats-1": "nats-1: 1 gateway, NATS broker",
    "nats-2": "nats-2: 2 gateways, NATS broker, clients split",
}


def render_cluster(doc: dict) -> str:
    m = doc.get("machine") or {}
    st = doc.get("settings") or {}
    v = doc.get("versions") or {}
    steps = doc.get("steps") or []
    lines = [f"# One gateway vs two over NATS JetStream, {doc.get('tag')}"
             + (" (quick run)" if doc.get("quick") else ""), ""]
    lines += [
        f"Machine: {m.get('cpus')} CPUs ({m.get('cpu_model', '?')}), "
        f"{(m.get('mem_kib') or 0) / 1048576:.0f} GiB, Linux {m.get('kernel')}; gateway {v.get('git', '?')}, "
        f"nats-server {v.get('nats-server', '?')} (private, JetStream, memory-stored stream). "
        "Gateways, nats-server and loadgens share the machine "
        f"(load average before: {', '.join(str(x) for x in doc.get('loadavg_before') or [])}; "
        f"{doc.get('machine_busy_pct_before')}% busy in the second before).",
        "",
        f"Workload: the `bench` channel (`ticker`, ~150-byte `{{seq,ts,pad}}` messages) at R msg/s; "
        f"{st.get('clients')} clients in {st.get('loadgens')} loadgen processes "
        f"(`--sources {st.get('sources')}`, together `--ramp {fmt_int(st.get('ramp'))}`), warm-up "
        f"{st.get('warmup')} s, window {st.get('duration')} s; gateway CPU summed over the instances "
        "(utime+stime from /proc) over a window inside the loadgens'. "
        f"{st.get('repeat')} round(s); fresh gateway process(es) for every step. "
        "nats-1 and nats-2 use a fresh `subject_prefix` per step.",
        "",
        "- **memory**: one gateway, the default in-memory broker; both loadgens on it.",
        "- **nats-1**: one gateway with `broker: {kind: nats}`; both loadgens on it "
        "(it holds the lease, runs the source, publishes every message to the stream and "
        "reads it back from its own consumer, where it skips its own).",
        "- **nats-2**: two gateways with the same broker settings; `gw-a` holds the lease and "
        "runs the source, `gw-b` gets every message through the JetStream stream. Loadgen 0 "
        "(half the clients) on `gw-a`, loadgen 1 on `gw-b`.",
        "",
        "Latency: loadgen does not print its histogram, so percentiles of different loadgens "
        "cannot be merged. Per loadgen `p50 / p99` are given as `a | b`; **p99 worst** is the "
        "larger one, an upper bound of the merged p99 (a percentile of the union lies between the "
        "loadgens' own). max is exact.",
        "",
    ]
    runs = sorted({s.get("run") for s in steps if s.get("run") is not None})
    keys = []
    for s in steps:
        k = (s["rate"], s["setup"])
        if k not in keys:
            keys.append(k)
    keys.sort(key=lambda k: (k[0], CLUSTER_SETUPS.index(k[1]) if k[1] in CLUSTER_SETUPS else 9))
    if len(runs) > 1:
        lines += [f"## Medians over {len(runs)} rounds", "",
                  "| setup | msg/s | deliveries/s | p50 worst | p99 worst | max (worst round) | gaps (sum) "
                  "| gateway CPU-s per 1M deliveries | nats-server CPU-s per 1M | gateway RSS KiB |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for rate, setup in keys:
            ss = [s for s in steps if s["rate"] == rate and s["setup"] == setup and "loadgen" in s]
            if not ss:
                continue
            lat = [s["loadgen"].get("latency_us") or {} for s in ss]
            lines.append(
                f"| {setup} | {fmt_int(rate)} "
                f"| {fmt_int(median([s['loadgen'].get('deliveries_per_sec') for s in ss]))} "
                f"| {fmt_us(median([x.get('p50') for x in lat]))} | {fmt_us(median([x.get('p99') for x in lat]))} "
                f"| {fmt_us(max((x.get('max') or 0) for x in lat))} "
                f"| {fmt_int(sum(s['loadgen'].get('gaps') or 0 for s in ss))} "
                f"| {fmt_num(median([s.get('server_cpu_secs_per_1m') for s in ss]))} "
                f"| {fmt_num(median([s.get('nats_cpu_secs_per_1m') for s in ss]))} "
                f"| {fmt_int(median([sum((s.get('rss_kib_during') or {}).values()) or None for s in ss]))} |")
        lines += [""]
    lines += ["## Every step", "",
              "| setup | msg/s | round | connected | deliveries/s (of offered) | p50 per loadgen | p99 per loadgen "
              "| p99 worst | max | gaps / dups | gateway CPU-s per 1M | nats CPU-s per 1M | gateway cores "
              "| loadgen cores | machine busy | other cores | gateway RSS KiB | problem |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for rate, setup in keys:
        for s in sorted((s for s in steps if s["rate"] == rate and s["setup"] == setup),
                        key=lambda s: s.get("run") or 0):
            if "loadgen" not in s:
                lines.append(f"| {setup} | {fmt_int(rate)} | {s.get('run')} | – | – | – | – | – | – | – | – | – "
                             f"| – | – | – | – | – | error: {(s.get('error') or '?').splitlines()[0][:100]} |")
                continue
            r = s["loadgen"]
            lat = r.get("latency_us") or {}
            per = s.get("loadgens") or []
            p50s = " \\| ".join(fmt_us((x.get("latency_us") or {}).get("p50")) for x in per)
            p99s = " \\| ".join(fmt_us((x.get("latency_us") or {}).get("p99")) for x in per)
            win = s.get("window_secs") or 0
            dps = r.get("deliveries_per_sec")
            offered = s.get("expected_deliveries_per_sec")
            share = f" ({100 * dps / offered:.1f}%)" if dps and offered else ""
            rss = s.get("rss_kib_during") or {}
            rss_cell = " + ".join(fmt_int(x) for x in rss.values()) if rss else "–"
            busy = s.get("machine_cpu_busy_pct")
            lines.append(
                f"| {setup} | {fmt_int(rate)} | {s.get('run')} | {fmt_int(r.get('connected'))} "
                f"| {fmt_int(dps)}{share} | {p50s} | {p99s} | {fmt_us(lat.get('p99'))} | {fmt_us(lat.get('max'))} "
                f"| {fmt_int(r.get('gaps'))} / {fmt_int(r.get('dups'))} "
                f"| {fmt_num(s.get('server_cpu_secs_per_1m'))} | {fmt_num(s.get('nats_cpu_secs_per_1m'))} "
                f"| {fmt_num(s['server_cpu_secs'] / win if win and s.get('server_cpu_secs') is not None else None, 2)} "
                f"| {fmt_num(s['loadgen_cpu_secs'] / win if win and s.get('loadgen_cpu_secs') is not None else None, 2)} "
                f"| {'–' if busy is None else f'{busy:.0f}%'} | {fmt_num(s.get('other_cores'), 2)} "
                f"| {rss_cell} | {s.get('problem') or ''} |")
    lines += ["", "Cores are CPU-s per second of the window (2.00 = both cores); machine busy is of the "
              "whole machine (100% = both cores); other cores = machine busy minus the gateways, loadgens "
              "and nats-server (the runner, anything else running). Gateway RSS: one figure per instance (`gw-a + gw-b`), "
              "sampled during the window. Raw loadgen lines, per-instance CPU, lease state and the "
              f"instances' `gateway_broker_*` counters: `{doc.get('tag')}-cluster.json`.", ""]
    paths = [s for s in steps if s.get("nats_path")]
    if paths:
        lines += ["## What went through NATS", "",
                  "Between the moment every instance was ready and the end of the loadgens' run: "
                  "messages the source's instance published to the stream, the stream's new "
                  "sequences, and per instance how many messages nats-server delivered to its "
                  "consumer (JetStream `/jsz`, consumer_seq) and how many it handed to its sessions "
                  "(`gateway_broker_messages_received_total`; an instance skips its own messages, "
                  "so the source's instance shows 0 received).", "",
                  "| setup | msg/s | round | sent | stream seqs | instance | delivered by nats-server "
                  "| received (to sessions) |",
                  "|---|---:|---:|---:|---:|---|---:|---:|"]
        for rate, setup in keys:
            for s in sorted((s for s in paths if s["rate"] == rate and s["setup"] == setup),
                            key=lambda s: s.get("run") or 0):
                p = s["nats_path"]
                for inst, row in (p.get("instances") or {}).items():
                    share = row.get("delivered_by_nats_share")
                    rshare = row.get("received_share")
                    lines.append(
                        f"| {setup} | {fmt_int(rate)} | {s.get('run')} | {fmt_int(p.get('sent'))} "
                        f"| {fmt_int(p.get('stream_messages'))} | {inst} "
                        f"| {fmt_int(row.get('delivered_by_nats'))}"
                        + (f" ({100 * share:.1f}%)" if share is not None else "")
                        + f" | {fmt_int(row.get('received'))}"
                        + (f" ({100 * rshare:.1f}% of sent)" if rshare is not None else "") + " |")
        lines += [""]
    errors = [s for s in steps if "error" in s]
    for s in errors:
        lines.append(f"- {s['setup']} at {fmt_int(s['rate'])} msg/s, round {s.get('run')}: "
                     f"{s['error'].splitlines()[0]}")
    if errors:
        lines.append("")
    lines += [f"Runner time: {doc.get('elapsed_secs')} s.", ""]
    return "\n".join(lines)


def cmd_cluster_summary(cfg) -> int:
    results = Path(cfg.results).resolve()
    tag = cfg.tag or dt.date.today().isoformat()
    path = results / f"{tag}-cluster.json"
    if not path.is_file():
        sys.exit(f"{path} is missing")
    md = render_cluster(json.loads(path.read_text()))
    (results / f"{tag}-cluster-summary.md").write_text(md)
    print(md)
    return 0


# --------------------------------------------------------------------------
# setup.

def cmd_setup(cfg) -> int:
    if "node" in cfg.only:
        if not shutil.which("npm"):
            raise BenchError("npm is not on PATH")
        verb = "ci" if (NODE_DIR / "package-lock.json").is_file() else "install"
        run_checked(["npm", verb, "--no-audit", "--no-fund"], cwd=NODE_DIR, timeout=900)
    if "fastapi" in cfg.only:
        if not os.access(venv_python(), os.X_OK):
            run_checked([sys.executable, "-m", "venv", VENV], cwd=BENCH, timeout=300)
        run_checked([venv_python(), "-m", "pip", "install", "--disable-pip-version-check", "-q",
                     "-r", FASTAPI_DIR / "requirements.txt"], cwd=BENCH, timeout=1800)
    if "cargo" in cfg.only:
        run_checked(["cargo", "build", "--release", "-p", "gateway", "-p", "ticker", "-p", "loadgen"],
                    cwd=ROOT, timeout=3600)
        run_checked(["cargo", "build", "--release", "-p", "loadgen", "--example", "bare_broadcast"],
                    cwd=ROOT, timeout=3600)
    if not nats_server_path():
        log("warning: nats-server not found; the nats peer will be skipped")
    log("setup done")
    return 0


# --------------------------------------------------------------------------

def add_loadgen_args(p):
    """The load generator's binary and its source addresses."""
    p.add_argument("--sources", type=int, default=4, help="loadgen source addresses 127.0.0.1..N")
    p.add_argument("--loadgen", default=str(ROOT / "target" / "release" / "loadgen"))
    p.add_argument("--one-session", action="store_true",
                   help="run servers and load generator in run.py's session, one scheduling group "
                        "under sched_autogroup, instead of a session (and group) each")


def add_load_wait_args(p):
    """Waiting for a quiet machine before a run."""
    p.add_argument("--max-load", type=float, default=1.0,
                   help="wait for the 1-minute load average to fall below this first (0: do not wait)")
    p.add_argument("--wait-load", type=float, default=120, help="longest wait for --max-load, s")


def add_step_timing_args(p, server):
    """Start-up, connection and CPU-window timing of one step."""
    p.add_argument("--start-timeout", type=float, default=30.0)
    p.add_argument("--settle", type=float, default=0.5, help=f"seconds after {server} accepts")
    p.add_argument("--connect-slack", type=float, default=15.0,
                   help="extra seconds allowed for all clients to connect")
    p.add_argument("--step-slack", type=float, default=30.0,
                   help="extra seconds before a loadgen run is killed")
    p.add_argument("--window-lead", type=float, default=0.5,
                   help="seconds after loadgen's warm-up before the CPU window opens")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("setup", help="install the peers' dependencies and build the Rust binaries")
    s.add_argument("--only", default="node,fastapi,cargo",
                   help="comma-separated subset of node,fastapi,cargo (default: all)")
    s.set_defaults(func=cmd_setup)

    c = sub.add_parser("compare", help="run every scenario against every server")
    c.add_argument("--servers", default=",".join(SERVER_ORDER))
    c.add_argument("--quick", action="store_true",
                   help="smoke run: 3 s windows, rates 100 and 1000, 5000 idle connections")
    c.add_argument("--scenarios", default="stream,connect,idle,max-idle",
                   help="comma-separated subset of stream,connect,idle,max-idle (default: all; "
                        "max-idle runs only for --max-idle-servers)")
    c.add_argument("--clients", type=int, default=1000)
    c.add_argument("--rates", type=lambda v: [float(x) if "." in x else int(x) for x in v.split(",")],
                   help=f"message rates to try, in order (default {','.join(map(str, FULL_RATES))})")
    c.add_argument("--duration", type=int, help="loadgen measuring window, s (default 10, quick 3)")
    c.add_argument("--warmup", type=int, help="loadgen warm-up, s (default 2, quick 1)")
    c.add_argument("--no-refine", dest="refine", action="store_false",
                   help="do not try rates between the last sustained and the first failed one")
    c.add_argument("--ramp", type=float, default=2000, help="connections/s while connecting stream clients")
    c.add_argument("--idle-clients", type=int, help="idle connections (default 10000, quick 5000)")
    c.add_argument("--idle-ramp", type=float, default=5000)
    c.add_argument("--hold", type=int, help="seconds idle connections are held once connected")
    c.add_argument("--idle-sample-after", type=float, default=1.5,
                   help="seconds after the server holds every idle connection that RSS is sampled "
                        "(default 1.5; 40 includes the gateway's first 30 s ping round)")
    c.add_argument("--max-idle-servers", default=None,
                   help="servers tried with --max-idle-clients (default gateway; none with --quick)")
    c.add_argument("--max-idle-clients", type=int, default=19900,
                   help="idle connections tried for the most-held figure (open-file limit 20000)")
    c.add_argument("--connect-clients", type=int, help="clients of the connection-rate run (default 5000)")
    c.add_argument("--connect-ramps", type=lambda v: [float(x) for x in v.split(",")],
                   help="--ramp values of the connection-rate runs, in order "
                        f"(default {','.join(map(str, FULL_CONNECT_RAMPS))}; quick "
                        f"{','.join(map(str, QUICK_CONNECT_RAMPS))})")
    add_loadgen_args(c)
    c.add_argument("--loadgen-threads", type=int, help="loadgen --threads (default: loadgen's own)")
    c.add_argument("--results", default=str(DEFAULT_RESULTS))
    c.add_argument("--tag", help="file name prefix (default: today's date, + -quick)")
    c.add_argument("--linger", help="run the gateway's bench channel with this `linger` (e.g. 20ms)")
    c.add_argument("--write-interval",
                   help="run the gateway with this `limits.write_interval` (e.g. 15ms), "
                        "and pace the bare loop's clients the same way")
    c.add_argument("--schema", type=Path,
                   help="run the gateway's bench channel with this JSON Schema file instead of "
                        "examples/bench/bench.schema.json (e.g. bench/accept-all.schema.json: validation off)")
    add_step_timing_args(c, "a server")
    c.set_defaults(func=cmd_compare)

    ints = lambda v: [int(x) for x in v.split(",") if x.strip()]  # noqa: E731
    g = sub.add_parser("scale", help="gateway cost per delivery vs clients and channels "
                                     "(a grid at equal offered deliveries/s)")
    g.add_argument("--totals", type=ints, default=SCALE_TOTALS,
                   help="offered deliveries/s per level, in order; later levels run only if they "
                        f"fit in --budget (default {','.join(map(str, SCALE_TOTALS))})")
    g.add_argument("--clients", type=ints, default=SCALE_CLIENTS,
                   help=f"client counts (default {','.join(map(str, SCALE_CLIENTS))})")
    g.add_argument("--channels", type=ints, default=SCALE_CHANNELS,
                   help=f"channel counts K (default {','.join(map(str, SCALE_CHANNELS))})")
    g.add_argument("--duration", type=int, default=8, help="loadgen measuring window, s")
    g.add_argument("--warmup", type=int, default=2, help="loadgen warm-up, s")
    g.add_argument("--ramp", type=float, default=5000, help="connections/s while connecting")
    g.add_argument("--budget", type=float, default=540,
                   help="seconds: no cell or level is started that would end after this (default 540)")
    add_load_wait_args(g)
    add_loadgen_args(g)
    g.add_argument("--loadgen-threads", type=int, help="loadgen --threads (default: loadgen's own)")
    g.add_argument("--results", default=str(DEFAULT_RESULTS))
    g.add_argument("--tag", help="file name: <results>/<tag>.json and .md (default <date>-scale)")
    add_step_timing_args(g, "the gateway")
    g.set_defaults(func=cmd_scale)

    gs = sub.add_parser("scale-summary", help="rebuild <tag>.md from <tag>.json of a scale run")
    gs.add_argument("--results", default=str(DEFAULT_RESULTS))
    gs.add_argument("--tag", help="default <date>-scale")
    gs.set_defaults(func=cmd_scale_summary)

    k = sub.add_parser("cluster", help="one gateway vs two over NATS JetStream (`broker: {kind: nats}`), "
                                       "clients split over the instances")
    k.add_argument("--setups", default=",".join(CLUSTER_SETUPS),
                   help=f"comma-separated subset of {','.join(CLUSTER_SETUPS)} (default: all)")
    k.add_argument("--quick", action="store_true", help="smoke run: 1 s warm-up, 3 s windows, one round")
    k.add_argument("--clients", type=int, default=1000, help="clients in all (split over the loadgens)")
    k.add_argument("--rates", type=lambda v: [float(x) if "." in x else int(x) for x in v.split(",")],
                   default=CLUSTER_RATES,
                   help=f"message rates, in order (default {','.join(map(str, CLUSTER_RATES))})")
    k.add_argument("--repeat", type=int, help="rounds of every setup x rate (default 3, quick 1)")
    k.add_argument("--duration", type=int, help="loadgen measuring window, s (default 10, quick 3)")
    k.add_argument("--warmup", type=int, help="loadgen warm-up, s (default 2, quick 1)")
    k.add_argument("--ramp", type=float, default=2000,
                   help="connections/s while connecting, all loadgens together")
    k.add_argument("--loadgens", type=int, default=2,
                   help="loadgen processes sharing the clients, in every setup (loadgen j follows "
                        "instance j mod instances; default 2)")
    add_loadgen_args(k)
    k.add_argument("--loadgen-threads", type=int, default=1,
                   help="loadgen --threads of each loadgen (default 1: two loadgens have the two "
                        "worker threads one loadgen has by default)")
    add_load_wait_args(k)
    k.add_argument("--step-max-busy", type=float, default=20.0,
                   help="before each step, wait for the machine to be at most this %% busy (over 1 s)")
    k.add_argument("--step-quiet-wait", type=float, default=60.0,
                   help="longest wait for --step-max-busy before a step, s")
    k.add_argument("--results", default=str(DEFAULT_RESULTS))
    k.add_argument("--tag", help="<results>/<tag>-cluster.json and -cluster-summary.md "
                                 "(default: today's date, + -quick)")
    add_step_timing_args(k, "a gateway")
    k.set_defaults(func=cmd_cluster)

    ks = sub.add_parser("cluster-summary", help="rebuild <tag>-cluster-summary.md from <tag>-cluster.json")
    ks.add_argument("--results", default=str(DEFAULT_RESULTS))
    ks.add_argument("--tag", help="default: today's date")
    ks.set_defaults(func=cmd_cluster_summary)

    m = sub.add_parser("summary", help="rebuild <tag>-summary.md from <tag>-<server>.json")
    m.add_argument("--results", default=str(DEFAULT_RESULTS))
    m.add_argument("--tag")
    m.set_defaults(func=cmd_summary)

    cfg = p.parse_args(argv)
    global ONE_SESSION
    ONE_SESSION = bool(getattr(cfg, "one_session", False))
    if getattr(cfg, "only", None) is not None:
        cfg.only = {x.strip() for x in cfg.only.split(",")}
    if getattr(cfg, "sources", 1) < 1 or getattr(cfg, "sources", 1) > 250:
        sys.exit("--sources must be 1..250 (127.0.0.1..127.0.0.N)")

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    signal.signal(signal.SIGTERM, _on_signal)
    try:
        return cfg.func(cfg)
    except BenchError as e:
        log(f"error: {e}")
        return 1
    except KeyboardInterrupt:
        log("interrupted; stopping every started process")
        return 130
    finally:
        stop_all()


if __name__ == "__main__":
    sys.exit(main())
