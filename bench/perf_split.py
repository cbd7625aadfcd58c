#!/usr/bin/env python3
"""Split a `perf record -g` profile of the gateway into where its threads' time
goes: the socket send (the write itself, waking the client's reader, being
preempted by that reader on the way out), the gateway's own code, sleeping and
waking (epoll, futex), and the rest.

    perf record -F 2999 -g -p <gateway pid> -o gw.data -- sleep 8
    perf script -i gw.data -F comm,tid,ip,sym,dso > gw.txt
    python3 bench/perf_split.py gw.txt [--comm tokio-rt-worker] [--binary gateway]

Each sample is put in the first category its stack matches, from its top
frame down, so the shares add up to 100% per thread name. On a virtual
machine without a PMU, perf samples on a timer and work done with interrupts
off (a context switch, a wake-up) is counted where they come back on:
`finish_task_switch` and `_raw_spin_unlock_irqrestore`; the categories below
follow the stack to the operation that caused it.
"""

import argparse
import collections
import sys


def samples(path):
    """(comm, [frame, ...]) per sample of `perf script -F comm,tid,ip,sym,dso`."""
    comm, frames = None, []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                if comm is not None:
                    yield comm, frames
                comm, frames = None, []
            elif line[0] in " \t":
                parts = line.split(None, 1)
                frames.append(parts[1].strip() if len(parts) > 1 else "")
            else:
                comm, frames = line.split()[0], []
    if comm is not None:
        yield comm, frames


def category(frames, binary):
    top = frames[0] if frames else ""
    stack = " ".join(frames)
    if "finish_task_switch" in top:
        if "writev" in stack or "tcp_sendmsg" in stack:
            return "send: preempted on the way out (by the woken reader)"
        if "epoll_wait" in stack:
            return "switch: sleeping in epoll_wait"
        if "futex" in stack:
            return "switch: sleeping on a futex"
        return "switch: other"
    if "sock_def_readable" in stack:
        return "send: waking the client's reader"
    if "writev" in stack or "tcp_sendmsg" in stack:
        return "send: the rest (TCP, loopback receive)"
    if "epoll_wait" in stack or "futex" in stack:
        return "epoll / futex, not switching"
    if f"/{binary})" in top or f"({binary})" in top:
        return f"user: {binary}"
    if "kernel.kallsyms" in top:
        return "kernel: other"
    dso = top.rsplit("(", 1)[-1].rstrip(")") if "(" in top else "?"
    return f"user: {dso.rsplit('/', 1)[-1]}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("script", help="output of perf script -F comm,tid,ip,sym,dso")
    ap.add_argument("--comm", action="append", help="thread names to report (default: all)")
    ap.add_argument("--binary", default="gateway", help="the gateway's file name")
    args = ap.parse_args()
    by_comm = collections.defaultdict(collections.Counter)
    for comm, frames in samples(args.script):
        by_comm[comm][category(frames, args.binary)] += 1
    if not by_comm:
        sys.exit(f"{args.script}: no samples")
    total = sum(sum(c.values()) for c in by_comm.values())
    for comm in sorted(by_comm, key=lambda k: -sum(by_comm[k].values())):
        if args.comm and comm not in args.comm:
            continue
        cats = by_comm[comm]
        n = sum(cats.values())
        print(f"{comm}: {n} samples, {100 * n / total:.1f}% of all")
        for name, count in cats.most_common():
            print(f"  {100 * count / n:5.1f}%  {name}")


if __name__ == "__main__":
    main()
