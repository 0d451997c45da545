"""How long from spawn() to the callable running in a fully jailed child.

    .venv/bin/python -m bench.jail_startup [--count 200] [--mode kill|log|off]
                                           [--no-namespaces] [--cpu 0]

Each round forks a jailed child under device/balloon.policy whose callable
writes one byte to a kept pipe; the clock stops when the parent sees that
byte. The first round (which also compiles the policy) is reported apart.
The process is pinned to one CPU (--cpu, -1 for none) so the numbers measure
the jail and not the scheduler; the goal is a median under 10 ms.
"""

from __future__ import annotations

import argparse
import os
import select
import statistics
import time
from pathlib import Path

from sandbox import JailConfig, Policy, spawn

POLICY = Path(__file__).resolve().parent.parent / "device" / "balloon.policy"
DEADLINE_MS = 10_000


def one_round(config: JailConfig, read_fd: int) -> tuple[float, float]:
    """(ms until spawn() returned, ms until the callable ran) for one child."""
    started = time.perf_counter()
    child = spawn(lambda: os.write(3, b"!"), config)
    returned = time.perf_counter()
    poller = select.poll()
    poller.register(read_fd, select.POLLIN)
    if not poller.poll(DEADLINE_MS) or os.read(read_fd, 1) != b"!":
        child.close()
        raise RuntimeError("the jailed callable did not run")
    running = time.perf_counter()
    status = child.wait(DEADLINE_MS / 1000)
    child.close()
    if status.code != 0:
        raise RuntimeError(f"the jailed child {status.describe()}")
    return (returned - started) * 1000, (running - started) * 1000


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--mode", choices=("kill", "log", "off"), default="kill")
    parser.add_argument("--no-namespaces", action="store_true")
    parser.add_argument("--cpu", type=int, default=0, help="pin to this CPU (-1: do not pin)")
    args = parser.parse_args()
    if args.cpu >= 0:
        os.sched_setaffinity(0, {args.cpu})
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    config = JailConfig(
        keep_fds=[write_fd],
        renumber=3,
        seccomp=Policy.from_file(POLICY),
        seccomp_mode=args.mode,
        namespaces=not args.no_namespaces,
    )
    first = one_round(config, read_fd)
    rounds = [one_round(config, read_fd) for _ in range(args.count)]
    returned = [r for r, _ in rounds]
    running = [r for _, r in rounds]
    pinned = f"CPU {args.cpu}" if args.cpu >= 0 else "not pinned"
    print(f"jail start-up, {args.count} rounds, seccomp {args.mode}, "
          f"namespaces {'off' if args.no_namespaces else 'on'}, uid {os.geteuid()}, {pinned}")
    print(f"  first round (compiles the policy): {first[1]:.2f} ms")
    for label, samples in (("spawn() returned", returned), ("callable running", running)):
        print(f"  {label:17s} median {statistics.median(samples):6.2f} ms   p95 {percentile(samples, 0.95):6.2f} ms"
              f"   max {max(samples):6.2f} ms")
    os.close(read_fd)
    os.close(write_fd)


if __name__ == "__main__":
    main()
