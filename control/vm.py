"""One VM in ``vballoon serve``: its name, its vhost-user socket, the front-end connected to it
and that front-end's device. The server holds any number of these on one loop; each has its
own session, its own jailed worker (under a uid of its own) and its own restart budget, so
nothing one VM's front-end, guest or worker does changes another's state.

    --vm web1=/run/vb/web1.sock,deflate-on-oom,free-page-reporting
    vballoon add web1 --socket /run/vb/web1.sock --free-page-reporting

A VM spec's options are the per-VM ``serve`` options: ``deflate-on-oom``,
``free-page-reporting``, ``no-page-poison``, ``no-stats``, ``stats-interval=SECONDS``.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass

from control.errors import RequestError
from control.handover import Adoption, VmRecord
from control.loop import EventLoop
from control.supervisor import ProxyOptions
from control.vhost_peer import VhostUserPeer
from control.vmdevice import VmDevice
from device.balloon import BalloonOptions
from device.config import POISON_VAL_OFFSET
from device.errors import DeviceError

log = logging.getLogger("vballoon.serve")

DEFAULT_VM = "default"            # the one VM of ``serve --socket PATH``
MAX_VMS = 1024
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
FLAGS = {"deflate-on-oom": ("deflate_on_oom", True),
         "free-page-reporting": ("free_page_reporting", True),
         "no-page-poison": ("page_poison", False),
         "no-stats": ("stats", False)}
MAX_STATS_INTERVAL = 86400.0


def check_name(name: object) -> str:
    if type(name) is not str or not _NAME.match(name):
        raise RequestError(f"bad VM name {str(name)[:80]!r}: 1-64 letters, digits, '_', '.' "
                           f"or '-', starting with a letter or digit")
    return name


@dataclass(frozen=True)
class VmSpec:
    """What a VM is served with: a name, a vhost-user socket path, its device options."""

    name: str
    socket_path: str
    balloon: BalloonOptions = BalloonOptions()

    def __post_init__(self) -> None:
        check_name(self.name)
        if not self.socket_path or "\0" in self.socket_path or len(self.socket_path) > 107:
            raise RequestError(f"bad socket path {self.socket_path[:80]!r} for VM {self.name!r}")


def parse_vm(text: str, defaults: BalloonOptions = BalloonOptions()) -> VmSpec:
    """``NAME=SOCKET[,OPTION...]`` -> a ``VmSpec``; raises ``RequestError`` saying what is
    wrong. Options not given keep ``defaults`` (the ``serve`` command line's)."""
    name, sep, rest = text.partition("=")
    if not sep:
        raise RequestError(f"bad --vm {text[:80]!r}: use NAME=SOCKET[,option...]")
    path, *options = rest.split(",")
    return VmSpec(check_name(name), path, options_from(options, defaults))


def options_from(words: list[str] | dict, defaults: BalloonOptions = BalloonOptions()) -> BalloonOptions:
    """Per-VM device options from spec words (``deflate-on-oom``, ``stats-interval=2``) or
    from the control protocol's map (``{"deflate_on_oom": true, "stats_interval": 2}``)."""
    if isinstance(words, dict):
        allowed = {"deflate_on_oom", "free_page_reporting", "page_poison", "stats",
                   "stats_interval"}
        unknown = set(words) - allowed
        if unknown:
            raise RequestError(f"unknown VM options {sorted(map(str, unknown))}; known: "
                               f"{', '.join(sorted(allowed))}")
        changes = {}
        for key, value in words.items():
            if key == "stats_interval":
                changes[key] = _interval(value)
            elif type(value) is not bool:
                raise RequestError(f"VM option {key!r} must be true or false")
            else:
                changes[key] = value
        return dataclasses.replace(defaults, **changes)
    changes: dict[str, object] = {}
    for word in words:
        key, sep, value = word.partition("=")
        if key in FLAGS and not sep:
            field, on = FLAGS[key]
            changes[field] = on
        elif key == "stats-interval" and sep:
            try:
                changes["stats_interval"] = _interval(float(value))
            except ValueError:
                raise RequestError(f"bad stats-interval {value[:20]!r}") from None
        else:
            raise RequestError(f"unknown VM option {word[:40]!r}; known: "
                               f"{', '.join(sorted(FLAGS))}, stats-interval=SECONDS")
    return dataclasses.replace(defaults, **changes)


def _interval(value: object) -> float:
    if type(value) not in (int, float) or not 0 <= value <= MAX_STATS_INTERVAL:
        raise RequestError(f"stats interval must be 0..{MAX_STATS_INTERVAL:g} seconds")
    return float(value)


class Vm:
    """A VM's listener and the front-end it serves (one at a time, a fresh device each)."""

    def __init__(self, loop: EventLoop, spec: VmSpec, listener: socket.socket,
                 proxy: ProxyOptions, on_change: Callable[["Vm"], None],
                 on_disconnect: Callable[["Vm"], None], record: VmRecord | None = None) -> None:
        self.loop = loop
        self.record = record              # with ``serve --keeper``: what a successor needs
        self.spec = spec
        self.listener = listener
        self.proxy = proxy
        self.frontend: VhostUserPeer | None = None
        self.connections = 0
        self._on_change = on_change
        self._on_disconnect = on_disconnect
        # Devices whose front-end went away while their worker still stops: ended for good
        # when the VM goes (their fds close when they do).
        self.stopping: set[VmDevice] = set()

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def device(self) -> VmDevice | None:
        return self.frontend.device if self.frontend is not None else None

    def accept(self, conn: socket.socket) -> None:
        if self.frontend is not None:
            log.warning("vm %s: a second front-end connected while one is served: refused",
                        self.name)
            conn.close()
            return
        self._serve(conn)
        if self.record is not None:
            self.record.connected(conn)
        log.info("vm %s: front-end connected", self.name)

    def _serve(self, conn: socket.socket) -> VhostUserPeer:
        self.connections += 1
        device = VmDevice(self.loop, self.spec.balloon, self.proxy, self.name)
        if self.record is not None:
            # First: a successor must know whatever a waiting client is told next.
            device.listeners.append(lambda: self._keep_config(device))
        device.listeners.append(lambda: self._on_change(self))
        self.frontend = VhostUserPeer(self.loop, conn, device, self._closed, self.record)
        return self.frontend

    def _keep_config(self, device: VmDevice) -> None:
        if device is self.device:
            config = device.config
            self.record.config(config.num_pages, config.actual,
                               device.model.poison_val if device.model.poison_written else None)

    def adopt(self, adoption: Adoption, serving: Callable[[], None] = lambda: None) -> None:
        """Carry on the connection a dead ``serve`` left with the keeper: the session
        replayed, the target and ``actual`` as they were, the rings resumed (then
        ``serving()``)."""
        log.info("vm %s: adopting the front-end's connection (%d requests replayed)",
                 self.name, len(adoption.requests))
        peer = self._serve(adoption.conn)
        device = peer.device
        if self.record is not None:
            self.record.adopted(adoption)

        def started(error: BaseException | None) -> None:
            if error is not None:
                log.error("vm %s: the adopted session did not start: %s", self.name, error)
            else:
                log.info("vm %s: serving the adopted connection again", self.name)
                serving()
        # The config first: the request in flight may be the guest reading it. (Set as it
        # was, not as a change: the guest already knows this target.)
        try:
            device.config.num_pages = adoption.target
            device.config.actual = adoption.actual
            if adoption.poison is not None:
                device.write_config(POISON_VAL_OFFSET, adoption.poison.to_bytes(4, "little"))
        except (DeviceError, OverflowError) as exc:
            log.error("vm %s: the kept poison value does not apply (%s)", self.name, exc)
        peer.adopt(adoption.requests, adoption.in_flight, started)

    def _closed(self, why: str) -> None:
        device = self.frontend.device
        self.frontend = None
        if self.record is not None:
            self.record.disconnected()
        if device.state != "idle":
            self.stopping.add(device)
            device.listeners.append(lambda: self._stopped(device))
        self._on_disconnect(self)

    def _stopped(self, device: VmDevice) -> None:
        if device.state == "idle":
            self.stopping.discard(device)

    def terminate(self, why: str) -> None:
        """End the front-end's connection and every worker of this VM at once."""
        frontend = self.frontend
        if frontend is not None:
            frontend.device.terminate()          # nobody needs the worker's state any more
            frontend.close(why)                  # no-op if terminating already closed it
        for device in list(self.stopping):
            device.terminate()
        self.stopping.clear()
