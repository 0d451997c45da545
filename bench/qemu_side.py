"""QEMU's own balloon and vballoon side by side: the same QEMU 11 binary, guest kernel and
memory; QEMU's built-in ``virtio-balloon-pci`` (driven over QMP ``balloon`` and
``query-balloon``) against vballoon behind ``vhost-user-test-device-pci``.

One run, per device: the guest dirties the memory the balloon will take and frees it; then
inflate to SIZE (until ``actual`` reaches it) and deflate to 0, timed, with the host memory
freed (the guest RAM memfd's blocks) and the CPU of the device side: QEMU's main thread for
the built-in device, ``serve`` + its worker for vballoon (QEMU's whole process CPU is
reported for both). Runs of the two devices are interleaved, both guests alive side by
side, everything pinned to one CPU (guest, QEMU and the device side share it).
"""

from __future__ import annotations

import json
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.results import Report, fmt
from bench.serve import ServeProcess
from bench.system import MIB, Budget, median, pinned, process_cpu_ns, task_cpu_ns, tree_cpu_ns
from bench.system import descendants
from guest.qemu import DEFAULT_QEMU_DIR, QemuConfig, QemuGuest

GUEST_MIB = 1024
DEVICES = ("built-in", "vballoon")
HEADERS = ["balloon", "device", "inflate s", "deflate s", "host MiB freed",
           "device CPU ms (inflate+deflate)", "QEMU CPU ms", "runs"]


def qemu_available() -> str | None:
    if not (DEFAULT_QEMU_DIR / ".ready").exists():
        return "no QEMU test bed: run `make qemu`"
    return None


class Qmp:
    """A minimal QMP client (one command at a time)."""

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.sock.settimeout(timeout)
        self.buffer = b""
        self._read()                                   # the greeting
        self.execute("qmp_capabilities")

    def _read(self) -> dict:
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise OSError("QMP closed")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def execute(self, command: str, **arguments) -> dict:
        self.sock.sendall(json.dumps({"execute": command, "arguments": arguments}).encode()
                          + b"\n")
        while True:
            message = self._read()
            if "return" in message:
                return message["return"]
            if "error" in message:
                raise OSError(f"QMP {command}: {message['error']}")

    def close(self) -> None:
        self.sock.close()


@dataclass
class Side:
    name: str
    guest: QemuGuest
    qmp: Qmp | None = None
    serve: ServeProcess | None = None

    def device_cpu_ns(self) -> int:
        if self.serve is not None:
            return tree_cpu_ns(descendants(self.serve.pid))     # serve and all below it
        return task_cpu_ns(self.guest.pid, self.guest.pid)      # QEMU's main thread

    def qemu_cpu_ns(self) -> int:
        return process_cpu_ns(self.guest.pid)

    def balloon(self, size: int, timeout: float = 120.0) -> float:
        """Set the balloon to ``size`` bytes and wait until the guest got there."""
        start = time.monotonic()
        if self.serve is not None:
            with self.serve.client(timeout=timeout + 10) as client:
                client.request("set", size=size)
                reply = client.request("wait", timeout=timeout, stall=30.0)
            if reply["outcome"] != "settled":
                raise RuntimeError(f"vballoon did not settle: {reply['outcome']}")
            return time.monotonic() - start
        goal = GUEST_MIB * MIB - size                   # QEMU's value: the guest's size
        self.qmp.execute("balloon", value=goal)
        deadline = start + timeout
        while self.qmp.execute("query-balloon")["actual"] != goal:
            if time.monotonic() > deadline:
                raise RuntimeError("the built-in balloon did not settle")
            time.sleep(0.002)
        return time.monotonic() - start

    def stop(self) -> None:
        if self.qmp is not None:
            self.qmp.close()
        self.guest.stop()
        if self.serve is not None:
            self.serve.stop()


def start_side(name: str, workdir: Path, cpus: set[int]) -> Side:
    if name == "vballoon":
        serve = ServeProcess(workdir, "vb", jail=True, cpus=cpus)
        serve.start()
        serve.wait_ready()
        guest = QemuGuest(QemuConfig(mem_mib=GUEST_MIB, vhost_socket=serve.socket_path))
        with pinned(cpus):
            guest.start()
        guest.wait_ready()
        serve.wait_active(timeout=30)
        return Side(name, guest, serve=serve)
    qmp_path = str(workdir / "qmp.sock")
    guest = QemuGuest(QemuConfig(mem_mib=GUEST_MIB, extra_args=(
        "-device", "virtio-balloon-pci,id=balloon0",
        "-qmp", f"unix:{qmp_path},server=on,wait=off")))
    with pinned(cpus):
        guest.start()
    guest.wait_ready()
    return Side(name, guest, qmp=Qmp(qmp_path))


def measure(side: Side, size: int) -> dict[str, float]:
    side.guest.fill_memory(size // MIB + 64)
    side.guest.free_memory()
    before_ram = side.guest.host_ram_bytes()
    cpu0, qemu0 = side.device_cpu_ns(), side.qemu_cpu_ns()
    inflate = side.balloon(size)
    freed = before_ram - side.guest.host_ram_bytes()
    deflate = side.balloon(0)
    return {"inflate": inflate, "deflate": deflate, "freed": freed / MIB,
            "device_cpu": (side.device_cpu_ns() - cpu0) / 1e6,
            "qemu_cpu": (side.qemu_cpu_ns() - qemu0) / 1e6}


def run_side_by_side(report: Report, sizes: list[int], runs: int, cpu: int, budget: Budget,
                     log: Callable[[str], None]) -> None:
    why = qemu_available()
    table = report.table("7. QEMU's built-in balloon vs vballoon (same QEMU, kernel, memory)",
                         HEADERS)
    if why is not None:
        table.notes.append(f"not run: {why}")
        log(f"QEMU side by side: {why}")
        return
    table.notes.append(
        f"QEMU 11 under TCG, {GUEST_MIB} MiB guest, one vCPU; guest, QEMU and serve + worker "
        f"all pinned to CPU {cpu}. Median of the runs; the devices' runs interleaved. Device "
        "CPU: QEMU's main thread for the built-in device (its virtqueue handlers run on the "
        "vCPU thread under TCG and are in 'QEMU CPU'), serve + worker for vballoon.")
    results: dict[tuple[int, str], list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="vballoon-qemu-bench-") as tmp:
        sides = {}
        try:
            for name in DEVICES:
                directory = Path(tmp) / name
                directory.mkdir()
                sides[name] = start_side(name, directory, {cpu})
            for run in range(runs):
                if run and budget.left() < 0:
                    log("QEMU side by side: out of budget, fewer runs")
                    break
                for size in sizes:
                    for name in (DEVICES if run % 2 == 0 else DEVICES[::-1]):
                        row = measure(sides[name], size)
                        results.setdefault((size, name), []).append(row)
                        log(f"QEMU {name} {size // MIB} MiB run {run + 1}: inflate "
                            f"{row['inflate']:.2f} s, deflate {row['deflate']:.2f} s, freed "
                            f"{row['freed']:.0f} MiB, device CPU {row['device_cpu']:.0f} ms")
        finally:
            for side in sides.values():
                side.stop()
    for size in sizes:
        medians = {}
        for name in DEVICES:
            rows = results.get((size, name), [])
            if not rows:
                continue
            med = {key: median([r[key] for r in rows]) for key in rows[0]}
            medians[name] = med
            table.rows.append([f"{size // MIB} MiB", name, fmt(med["inflate"], 2),
                               fmt(med["deflate"], 2), fmt(med["freed"], 0),
                               fmt(med["device_cpu"], 0), fmt(med["qemu_cpu"], 0),
                               str(len(rows))])
            for key, unit in (("inflate", "s"), ("deflate", "s"), ("freed", "MiB"),
                              ("device_cpu", "ms")):
                report.add(f"qemu_{key}", med[key], unit, mode=name, runs=len(rows),
                           placement=f"all on CPU {cpu}", balloon_bytes=size)
        if len(medians) == 2:
            for key, goal in (("inflate", 1.05), ("deflate", 1.1)):
                ratio = medians["vballoon"][key] / medians["built-in"][key]
                report.add(f"qemu_{key}_ratio", ratio, "x", runs=len(results[(size, "vballoon")]),
                           balloon_bytes=size)
                report.goal(f"QEMU, {size // MIB} MiB: vballoon {key} within {goal}x of the "
                            f"built-in balloon", f"{ratio:.2f}x ({medians['vballoon'][key]:.2f} s "
                            f"vs {medians['built-in'][key]:.2f} s)", ratio <= goal)
