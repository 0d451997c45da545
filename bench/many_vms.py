"""Section 8: one ``vballoon serve`` for N VMs (issue 12.4).

N real UML guests of 64 MiB, each on its own vhost-user socket of one ``serve --vm ...``,
all active. Measured from outside, as an operator would:

- device memory per VM: PSS summed over every process of the server (the parent and each
  jailed worker; any other process of its tree is counted too), guest memory mappings
  excluded (they are the guest's RAM, shared with UML), divided by N;
- idle cost per device: context switches (wake-ups) and CPU time of every thread of those
  processes over an idle window, after the guests settled;
- start-up: ``serve`` answering, and every VM active after the guests booted;
- ``vballoon status --vm NAME`` end to end (a fresh CLI process each time);
- resizing all N at once, by the CLI (``vballoon set vm0=16M ... --wait``) and over the
  control socket (one ``set`` with ``targets``, then ``wait`` for each), until all settled.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.results import Report, fmt
from bench.serve import ServeProcess, vballoon_command
from bench.system import MIB, descendants, pinned
from guest.uml import GuestConfig, UmlGuest

GUEST_MIB = 64
RESIZE_BYTES = 16 * MIB
HEADERS = ["VMs", "PSS per VM MiB", "parent PSS MiB", "worker PSS MiB (mean)",
           "other processes (the zygote)", "idle wake-ups/s per VM", "idle CPU ms/s (all)",
           "serve ready s", "all active s", "status via CLI ms (median)",
           "resize all: CLI s", "resize all: socket s"]


def run_many(report: Report, counts: list[int], device_cpus: set[int], guest_cpus: set[int],
             idle_seconds: float, log: Callable[[str], None]) -> None:
    table = report.table("8. One serve, many VMs (UML guests of 64 MiB, all active)", HEADERS)
    table.notes.append(
        "PSS summed over serve's processes (the parent, the zygote every worker is forked "
        "from, and every jailed worker; nothing else stays), "
        "shared mappings (guest RAM) excluded, divided by the number of VMs. Wake-ups are "
        "voluntary + involuntary context switches of every thread of those processes during "
        f"{idle_seconds:g} s with every guest idle. Resizing sets every VM's balloon to "
        f"{RESIZE_BYTES // MIB} MiB and waits until all report it (then back to 0 before "
        "the next way).")
    for count in counts:
        try:
            row = _one(report, count, device_cpus, guest_cpus, idle_seconds, log)
        except Exception as exc:            # noqa: BLE001 - a failed size is a row saying so
            log(f"many VMs, N={count}: {exc}")
            row = [str(count), f"failed: {exc}"] + ["-"] * (len(HEADERS) - 2)
        table.rows.append(row)


def _one(report: Report, count: int, device_cpus: set[int], guest_cpus: set[int],
         idle_seconds: float, log: Callable[[str], None]) -> list[str]:
    names = tuple(f"vm{i}" for i in range(count))
    with tempfile.TemporaryDirectory(prefix="vb-many-") as tmp:
        serve = ServeProcess(Path(tmp), "many", jail=True, cpus=device_cpus, vms=names)
        guests: list[UmlGuest] = []
        try:
            serve.start()
            ready = serve.wait_ready(timeout=30)
            with pinned(guest_cpus):
                for name in names:
                    guest = UmlGuest(GuestConfig(mem_mib=GUEST_MIB,
                                                 vhost_socket=serve.vm_socket(name)))
                    guests.append(guest)
                    guest.start()
            for guest in guests:
                guest.wait_ready()
            with serve.client(timeout=30) as client:
                _wait_all(client, lambda vm: vm["state"] == "active" and vm["worker_pid"],
                          60, "every VM active")
                active = time.monotonic() - serve.started
                log(f"many VMs, N={count}: serve ready {ready:.2f} s, all active {active:.1f} s")
                tree = descendants(serve.pid)
                memory = _memory(tree)
                time.sleep(1.0)                     # let the last counters and stats go out
                wakeups, cpu = _idle(descendants(serve.pid), idle_seconds)
                status_ms = _cli_status(serve, names[0])
                cli_s = _resize_by_cli(serve, names)
                _resize(client, names, 0)
                socket_s = _resize(client, names, RESIZE_BYTES)
        finally:
            stop_all(guests, serve)
    per_vm = memory["total"] / count
    cond = dict(vms=count, guest_mib=GUEST_MIB, mode="jailed", runs=1)
    report.add("many_vms_pss_per_vm", per_vm / MIB, "MiB", **cond)
    report.add("many_vms_idle_wakeups_per_vm", wakeups / count, "1/s", **cond)
    report.add("many_vms_idle_cpu", cpu, "ms/s", **cond)
    report.add("many_vms_status_cli", status_ms, "ms", **cond)
    report.add("many_vms_resize_cli", cli_s, "s", **cond)
    report.add("many_vms_resize_socket", socket_s, "s", **cond)
    report.add("many_vms_all_active", active, "s", **cond)
    return [str(count), fmt(per_vm / MIB, 2), fmt(memory["parent"] / MIB, 1),
            fmt(memory["worker"] / MIB, 2), str(memory["others"]),
            fmt(wakeups / count, 2), fmt(cpu, 2), fmt(ready, 2), fmt(active, 1),
            fmt(status_ms, 0), fmt(cli_s, 2), fmt(socket_s, 2)]


def stop_all(guests: list[UmlGuest], serve: ServeProcess) -> None:
    """Stop every guest, whatever each one does, then the server."""
    for guest in guests:
        try:
            guest.stop()
        except Exception:                # noqa: BLE001 - stop every guest whatever
            pass
    serve.stop()


def _wait_all(client, test, timeout: float, what: str) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        vms = client.request("list")["vms"]
        if all(test(vm) for vm in vms):
            return vms
        if time.monotonic() > deadline:
            stuck = [vm["name"] for vm in vms if not test(vm)]
            raise TimeoutError(f"{what}: not after {timeout} s ({len(stuck)} left, e.g. {stuck[:3]})")
        time.sleep(0.02)


def _pss_unshared(pid: int) -> int:
    """PSS of ``pid``'s private mappings (a shared mapping here is guest RAM)."""
    total, counting = 0, True
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split(" ", 1)[0]
            if not head.endswith(":"):
                counting = line.split()[1][3] != "s"
            elif head == "Pss:" and counting:
                total += int(line.split()[1]) * 1024
    return total


def _memory(tree: list[int]) -> dict[str, float]:
    kinds: dict[str, list[int]] = {"parent": [], "worker": [], "other": []}
    for pid in tree:
        try:
            pss = _pss_unshared(pid)
            with open(f"/proc/{pid}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue
        kind = "parent" if pid == tree[0] else ("worker" if comm == "vballoon-worker" else "other")
        kinds[kind].append(pss)
    return {"total": sum(sum(v) for v in kinds.values()), "parent": sum(kinds["parent"]),
            "worker": statistics.mean(kinds["worker"]) if kinds["worker"] else 0,
            "others": len(kinds["other"])}


def _switches_and_cpu(pids: list[int]) -> tuple[int, float]:
    switches, ticks = 0, 0
    for pid in pids:
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/status") as f:
                    for line in f:
                        if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                            switches += int(line.split()[1])
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                    ticks += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            continue
    return switches, ticks / os.sysconf("SC_CLK_TCK") * 1000


def _idle(pids: list[int], seconds: float) -> tuple[float, float]:
    """(wake-ups per second, CPU ms per second) of every thread of ``pids``."""
    s0, c0 = _switches_and_cpu(pids)
    time.sleep(seconds)
    s1, c1 = _switches_and_cpu(pids)
    return (s1 - s0) / seconds, (c1 - c0) / seconds


def _cli_status(serve: ServeProcess, vm: str, runs: int = 10) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([*vballoon_command(), "status", "--vm", vm, "--control", serve.control_path],
                       check=True, stdout=subprocess.DEVNULL)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def _resize_by_cli(serve: ServeProcess, names: tuple[str, ...]) -> float:
    start = time.perf_counter()
    subprocess.run([*vballoon_command(), "set", *(f"{n}={RESIZE_BYTES}" for n in names),
                    "--wait", "--timeout", "120", "--control", serve.control_path],
                   check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def _resize(client, names: tuple[str, ...], size: int) -> float:
    start = time.perf_counter()
    client.request("set", targets={name: size for name in names})
    _wait_all(client, lambda vm: vm["actual_bytes"] == size, 120, f"every balloon at {size}")
    return time.perf_counter() - start
