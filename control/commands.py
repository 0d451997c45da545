"""The operator's commands, independent of sockets: a request map in, a reply map out.

Every argument is checked here; a refused request raises ``RequestError`` and changes
nothing. ``wait`` is answered later by the server (it may take seconds); this module only
validates it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from control.api import Counters, Stats, Status, VmSummary
from control.errors import RequestError
from control.vmdevice import VmDevice
from device.balloon import PAGE_SIZE, feature_names

COMMANDS = ("status", "stats", "set", "adjust", "wait", "reset", "list", "add", "remove",
            "autopilot")
MAX_WAIT = 3600.0
DEFAULT_REFRESH_WAIT = 2.0
MAX_REFRESH_WAIT = 60.0


@dataclass(frozen=True)
class RefreshRequest:
    """``stats`` with ``refresh``: answered by the server once the guest has sent values
    newer than the request, or with an error after ``timeout``."""

    timeout: float


@dataclass(frozen=True)
class WaitRequest:
    timeout: float
    stall: float


def _number(message: dict, name: str, low: float, high: float, default: float | None = None) -> float:
    value = message.get(name, default)
    if type(value) not in (int, float) or not low <= value <= high:
        raise RequestError(f"{name!r} must be a number from {low} to {high}, not {value!r}")
    return float(value)


def check_fields(message: dict, allowed: set[str]) -> None:
    unknown = set(message) - allowed - {"id", "cmd", "vm"}
    if unknown:
        raise RequestError(f"unknown arguments {sorted(map(str, unknown))}")


def status(device: VmDevice | None) -> dict[str, Any]:
    """The status map (``control.api.Status``; its field names are a contract)."""
    if device is None:
        return Status(state="waiting", connected=False, target_bytes=0, actual_bytes=0,
                      worker_pid=None, worker_restarts=0, features=[], guest_memory_bytes=None,
                      last_worker_exit=None, seccomp_denials=None).to_json()
    worker = device.worker
    return Status(state=device.state, connected=True,
                  target_bytes=device.config.num_pages * PAGE_SIZE,
                  actual_bytes=device.config.actual * PAGE_SIZE,
                  worker_pid=worker.pid if worker is not None else None,
                  worker_restarts=device.restarts,
                  features=feature_names(device.acked_features),
                  guest_memory_bytes=None if device.guest_pages is None
                  else device.guest_pages * PAGE_SIZE,
                  last_worker_exit=device.last_exit,
                  seccomp_denials=device.denials(),
                  counters=Counters.from_values(device.counters()),
                  poison_val=device.model.poison_val,
                  warnings=device.warnings()).to_json()


def stats(device: VmDevice | None, refresh: bool) -> dict[str, Any]:
    """The latest guest statistics by Firecracker's names; None for what never arrived."""
    snapshot = device.stats if device is not None else None
    updated = snapshot.updated_wall if snapshot is not None else None
    requested = bool(refresh and device is not None and device.request_stats())
    return Stats(values=dict(snapshot.values) if snapshot is not None else {},
                 updated_at=updated,
                 age_seconds=None if not updated else max(0.0, time.time() - updated),
                 refresh_requested=requested).to_json()


def vm_summary(name: str, socket_path: str, device: VmDevice | None) -> dict[str, Any]:
    """One row of ``list`` (``control.api.VmSummary``)."""
    worker = device.worker if device is not None else None
    return VmSummary(name=name, socket=socket_path,
                     state=device.state if device is not None else "waiting",
                     target_bytes=device.config.num_pages * PAGE_SIZE if device else 0,
                     actual_bytes=device.config.actual * PAGE_SIZE if device else 0,
                     guest_memory_bytes=None if device is None or device.guest_pages is None
                     else device.guest_pages * PAGE_SIZE,
                     worker_pid=worker.pid if worker is not None else None,
                     worker_restarts=device.restarts if device is not None else 0).to_json()


def set_many(devices: dict[str, VmDevice | None], message: dict) -> dict[str, Any]:
    """``set`` with ``targets`` (VM name -> bytes): every target is checked before any is
    applied, so a refused one changes nothing anywhere."""
    check_fields(message, {"targets"})
    targets = message["targets"]
    checked = {name: _target(devices[name], size, name) for name, size in targets.items()}
    for name, size in checked.items():
        devices[name].set_target_bytes(size)
    return {"vms": {name: status(devices[name]) for name in checked}}


def _target(device: VmDevice | None, size: object, name: str | None = None) -> int:
    target = _device(device, name)
    if type(size) is not int or not 0 <= size <= target.guest_pages * PAGE_SIZE:
        where = f" for VM {name!r}" if name else ""
        raise RequestError(f"size{where} must be 0..{target.guest_pages * PAGE_SIZE} bytes "
                           f"(the guest's memory), not {size!r}")
    return size


def _device(device: VmDevice | None, name: str | None = None) -> VmDevice:
    if device is None or device.guest_pages is None:
        where = f" to VM {name!r}" if name else ""
        raise RequestError(f"no guest is connected{where} (or it has not set up the balloon "
                           f"yet)")
    return device


def handle(device: VmDevice | None,
           message: dict) -> dict[str, Any] | WaitRequest | RefreshRequest:
    """Run one request; returns the reply body, or a ``WaitRequest``/``RefreshRequest``
    the server answers later."""
    cmd = message.get("cmd")
    if device is not None:
        device.check_alive()        # any operator request checks the worker still answers
    if cmd == "status":
        check_fields(message, set())
        return status(device)
    if cmd == "stats":
        check_fields(message, {"refresh", "timeout"})
        refresh = message.get("refresh", False)
        if type(refresh) is not bool:
            raise RequestError("'refresh' must be true or false")
        timeout = _number(message, "timeout", 0, MAX_REFRESH_WAIT, DEFAULT_REFRESH_WAIT)
        if not refresh:
            return stats(device, False)
        if device is None or not device.request_stats():
            raise RequestError("no guest to ask for fresh statistics (none connected, or "
                               "its device is not active)")
        return RefreshRequest(timeout)
    if cmd == "set":
        check_fields(message, {"size"})
        size = _target(device, message.get("size"))
        device.set_target_bytes(size)
        return status(device)
    if cmd == "adjust":
        check_fields(message, {"pages"})
        pages = message.get("pages")
        if type(pages) is not int:
            raise RequestError(f"'pages' must be a whole number, not {pages!r}")
        _device(device).adjust_pages(pages)
        return status(device)
    if cmd == "reset":
        check_fields(message, set())
        target = _device(device)
        if not target.recover():
            raise RequestError(f"the device is {target.state}, not failed: nothing to reset")
        return status(device)
    if cmd == "wait":
        check_fields(message, {"timeout", "stall"})
        _device(device)
        return WaitRequest(_number(message, "timeout", 0, MAX_WAIT, 30.0),
                           _number(message, "stall", 0.1, MAX_WAIT, 5.0))
    raise RequestError(f"unknown command {cmd!r}; commands: {', '.join(COMMANDS)}")
