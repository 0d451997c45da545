"""``vballoon serve``: the I/O loop, a registry of VMs, and the operator's control socket.

One thread, one ``EventLoop``, in the parent (never jailed, never touching guest memory).
Nothing in the loop waits: sockets are non-blocking with bounded output buffers, and each
worker's supervisor is a state machine the same loop drives. Each VM (``control.vm.Vm``) has
its own vhost-user socket, session and jailed worker; the code path is the same for one VM
and for a thousand. A VM's vhost-user connection is held for as long as its front-end keeps
it: a dying worker is replaced behind it, so the guest never sees the connection drop (a
guest whose connection drops with pages in the balloon hangs for good).

    vhost-user socket of each VM --accept--> one front-end at a time per VM
                                             (``VhostUserPeer``), a fresh device for each
    control socket  --accept--> any number of operator clients (length-prefixed msgpack);
                                requests name their VM (``vm``), ``add``/``remove`` VMs
    SIGTERM / SIGINT ---------> kill every worker, close everything, remove socket files

Failure domains: an unexpected error while serving one front-end ends that connection;
while serving one control client, that client. Never ``serve``, never another VM.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import signal
import socket
import stat
import sys
import time
from dataclasses import dataclass, field

import msgpack

from control import commands
from control.autopilot import Tuning
from control.pilot import Pilot
from control.spawner import SPAWNER, Job
from control.zygote import ZYGOTE
from control.errors import RequestError
from control.jailed import load_policy
from control.handover import Link, Store, VmRecord, adoptions
from control.loop import EventLoop, Timer
from control.supervisor import ProxyOptions
from control.vhost_backend import VhostUserSession
from control.vhost_peer import VhostUserPeer
from control.vm import DEFAULT_VM, MAX_VMS, Vm, VmSpec, check_name, options_from
from control.vmdevice import SettleWatch, VmDevice
from control.wire import FrameDecoder, FrameError, encode_reply
from device.balloon import SECCOMP_POLICY, BalloonOptions

log = logging.getLogger("vballoon.serve")

MAX_CLIENTS = 64
MAX_CLIENT_BACKLOG = 1 << 20       # bytes of replies a client may leave unread
MAX_WAITS_PER_CLIENT = 16          # pending ``wait`` requests one client may hold
MAX_WAITS = 256                    # ... and all clients together
ACCEPT_BACKOFF = (0.05, 1.0)       # first and longest pause after accept() ran out of fds
TICK = 0.1                         # seconds between checks of pending waits (only then)
# accept() failures that say "not now" (out of fds or memory), not "this listener is broken".
_ACCEPT_RETRY = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


@dataclass(frozen=True)
class ServeOptions:
    """``socket_path``: the VM named ``default`` (``serve --socket``); ``vms``: more, each
    with its own options (``serve --vm``); ``balloon``: the default VM's options, and what
    every other VM's options start from."""

    socket_path: str | None = None
    control_path: str | None = None
    balloon: BalloonOptions = BalloonOptions()
    proxy: ProxyOptions = ProxyOptions()
    vms: tuple[VmSpec, ...] = ()
    autopilot: Tuning = Tuning()

    def specs(self) -> list[VmSpec]:
        specs = ([VmSpec(DEFAULT_VM, self.socket_path, self.balloon)] if self.socket_path
                 else []) + list(self.vms)
        for kind, values in (("name", [s.name for s in specs]),
                             ("socket", [s.socket_path for s in specs])):
            repeated = {v for v in values if values.count(v) > 1}
            if repeated:
                raise RequestError(f"VM {kind} {sorted(repeated)[0]!r} given twice")
        return specs


@dataclass
class Client:
    sock: socket.socket
    decoder: FrameDecoder = field(default_factory=FrameDecoder)
    outgoing: bytearray = field(default_factory=bytearray)


@dataclass
class Waiter:
    """A ``wait`` (``watch`` set) or a ``stats`` refresh (``asked_at``) to answer later."""

    client: Client
    ident: object
    vm: Vm
    watch: SettleWatch | None = None
    asked_at: float = 0.0
    deadline: float = 0.0


class Server:
    """Serves every VM's vhost-user front-end and any number of control clients."""

    def __init__(self, options: ServeOptions, store: Store | None = None,
                 kept: dict[str, tuple[bytes, list[int]]] | None = None) -> None:
        """``store``: the keeper's (``serve --keeper``); ``kept``: what it handed over from
        a ``serve`` that died, to adopt."""
        self.options = options
        self.loop = EventLoop()
        self.store = store
        if store is not None:
            store.watch = lambda writable: self.loop.watch(
                store.sock, writer=store.flush if writable else None)
        adopted, kept_blobs = adoptions(kept or {})
        self._kept_pilots = kept_blobs["pilot"]
        self.running = True
        self.vms: dict[str, Vm] = {}
        self._vm_listeners: dict[int, Vm] = {}
        self.clients: dict[int, Client] = {}
        self.waiters: list[Waiter] = []
        self._tick: Timer | None = None
        self._accept_backoff: dict[int, float] = {}
        self.pilot = Pilot(self.loop, options.autopilot, lambda: self.vms)
        specs = options.specs()
        if not specs and not options.control_path:
            raise RequestError("nothing to serve: give --socket, --vm or --control (to add "
                               "VMs later)")
        if options.proxy.jail:
            # Fail at start-up, not at the guest's first connection, if the policy is bad;
            # and have it parsed (and the jail imported) before the guest waits on it.
            load_policy(options.proxy.policy or SECCOMP_POLICY)
            if options.proxy.zygote and options.proxy.seccomp_mode == "kill":
                SPAWNER.submit(Job(ZYGOTE.warm, self.loop, lambda result: None, []))
        self.control_listener = None
        try:
            for spec in specs:
                self.add_vm(spec)
            for name, blob in kept_blobs["spec"].items():
                spec = self._kept_spec(name, blob)
                try:
                    if spec is not None:
                        self.add_vm(spec, keep=True)
                except RequestError as exc:   # a restart must not end every other VM
                    log.error("vm %s: added at runtime, cannot be served again: %s", name, exc)
            for name, adoption in adopted.items():
                vm = self.vms.get(name)
                if vm is None:
                    log.warning("vm %s: kept connection of a VM no longer served: closed", name)
                    self._forget_kept(name, adoption)
                    continue
                vm.adopt(adoption, lambda vm=vm: self._pilot_again(vm))
            if options.control_path:
                self.control_listener = self._listen(options.control_path, backlog=16)
                self._watch_listener(self.control_listener)
        except (RequestError, OSError):
            for vm in list(self.vms.values()):
                self._close_vm(vm)
            raise

    # -- the registry -----------------------------------------------------------------------

    def _forget_kept(self, name: str, adoption) -> None:
        """A kept connection nobody serves: closed here and at the keeper (which would
        otherwise hold it open, and its front-end would wait for ever)."""
        adoption.conn.close()
        for _, fds in adoption.requests + [adoption.in_flight or (b"", [])]:
            for fd in fds:
                os.close(fd)
        if self.store is not None:
            VmRecord(self.store, name).disconnected()
            self.store.drop(f"spec/{name}")
            self.store.drop(f"pilot/{name}")

    def _kept_spec(self, name: str, blob: bytes) -> VmSpec | None:
        try:
            path, options = msgpack.unpackb(blob)
            return VmSpec(name, path, BalloonOptions(**options))
        except (ValueError, TypeError, RequestError, msgpack.ExtraData, msgpack.FormatError) as exc:
            log.error("vm %s: the kept spec of this VM added at runtime is malformed (%s): not "
                      "served", name, exc)
            return None

    def add_vm(self, spec: VmSpec, keep: bool = False) -> Vm:
        """Start serving ``spec`` (listening on its socket); raises ``RequestError``.
        ``keep``: a VM added at runtime, whose spec a successor needs (``--keeper``)."""
        if spec.name in self.vms:
            raise RequestError(f"there is a VM named {spec.name!r} already")
        if len(self.vms) >= MAX_VMS:
            raise RequestError(f"this server already serves {MAX_VMS} VMs")
        if any(vm.spec.socket_path == spec.socket_path for vm in self.vms.values()):
            raise RequestError(f"{spec.socket_path} is another VM's socket")
        try:
            listener = self._listen(spec.socket_path, backlog=1)
        except OSError as exc:
            raise RequestError(f"cannot listen on {spec.socket_path}: {exc.strerror}") from None
        record = VmRecord(self.store, spec.name) if self.store is not None else None
        vm = Vm(self.loop, spec, listener, self.options.proxy,
                on_change=self._vm_changed, on_disconnect=self._vm_disconnected, record=record)
        if keep and self.store is not None:
            self.store.put(f"spec/{spec.name}", msgpack.packb(
                [spec.socket_path, dataclasses.asdict(spec.balloon)]))
        self.vms[spec.name] = vm
        self._vm_listeners[listener.fileno()] = vm
        self._watch_listener(listener)
        log.info("vm %s: vhost-user socket %s", spec.name, spec.socket_path)
        return vm

    def remove_vm(self, name: str) -> None:
        vm = self.vms.get(name)
        if vm is None:
            raise RequestError(f"no VM named {name!r}")
        self._fail_waiters(vm, "the VM was removed")
        self._pilot_off(name, "the VM was removed")
        self._close_vm(vm)
        if self.store is not None:
            self.store.drop(f"spec/{name}")
        log.info("vm %s: removed", name)

    def _close_vm(self, vm: Vm) -> None:
        vm.terminate("the VM was removed" if self.running else "shutting down")
        self.vms.pop(vm.name, None)
        self._vm_listeners.pop(vm.listener.fileno(), None)
        self.loop.unwatch(vm.listener)
        vm.listener.close()
        try:
            os.unlink(vm.spec.socket_path)
        except FileNotFoundError:
            pass                                   # someone removed it already

    def _single(self) -> Vm | None:
        """The VM a request without ``vm`` means: the only one, else none."""
        return next(iter(self.vms.values())) if len(self.vms) == 1 else self.vms.get(DEFAULT_VM)

    def _resolve(self, message: dict) -> Vm:
        name = message.get("vm")
        if name is None:
            if len(self.vms) != 1:
                known = ", ".join(sorted(self.vms)) or "none yet"
                raise RequestError(f"this server has {len(self.vms)} VMs: say which with "
                                   f"--vm NAME (VMs: {known})")
            return next(iter(self.vms.values()))
        vm = self.vms.get(check_name(name))
        if vm is None:
            raise RequestError(f"no VM named {name!r} (VMs: {', '.join(sorted(self.vms)) or 'none'})")
        return vm

    # The single VM's objects, as tests and tools of a one-VM server look at them.
    @property
    def frontend(self) -> VhostUserPeer | None:
        vm = self._single()
        return vm.frontend if vm is not None else None

    @property
    def connections(self) -> int:
        vm = self._single()
        return vm.connections if vm is not None else 0

    @property
    def device(self) -> VmDevice | None:
        return self.frontend.device if self.frontend is not None else None

    @property
    def session(self) -> VhostUserSession | None:
        return self.frontend.session if self.frontend is not None else None

    @property
    def conn(self) -> socket.socket | None:
        return self.frontend.conn if self.frontend is not None else None

    @staticmethod
    def _listen(path: str, backlog: int) -> socket.socket:
        """Listen on ``path``, replacing a stale socket file but never a live server's."""
        if os.path.lexists(path):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise RequestError(f"{path} exists and is not a socket: not replacing it")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)             # nothing answers: left over from a dead server
            else:
                raise RequestError(f"{path} is in use by a running server")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o077)          # owner-only from the moment it exists
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        sock.listen(backlog)
        sock.setblocking(False)
        return sock

    # -- the loop ----------------------------------------------------------------------------

    def run(self, install_signals: bool = True) -> None:
        """Serve until SIGTERM/SIGINT or ``stop()``; then shut everything down.

        ``install_signals=False`` runs the loop in a thread other than the main one (where
        Python cannot install signal handlers), as the tests do.
        """
        restore = self._install_signals() if install_signals else (lambda: None)
        log.info("%d VMs, control socket %s: ready", len(self.vms), self.options.control_path)
        try:
            self.loop.run_forever(lambda: self.running)
        finally:
            restore()
            self.shutdown()

    def _install_signals(self):
        old_wakeup = signal.set_wakeup_fd(self.loop.wakeup_fd())
        old = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}

        def restore() -> None:
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in old.items():
                signal.signal(sig, handler)
        return restore

    def _on_signal(self, signum: int, frame: object) -> None:
        log.info("%s: shutting down", signal.Signals(signum).name)
        self.running = False

    def stop(self) -> None:
        """Ask the loop to end (from another thread)."""
        self.running = False
        self.loop.wake()

    def shutdown(self) -> None:
        self.running = False
        for vm in list(self.vms.values()):
            self._close_vm(vm)                      # nobody needs the workers' state any more
        for client in list(self.clients.values()):
            self._drop_client(client)
        if self.control_listener is not None:
            self.loop.unwatch(self.control_listener)
            self.control_listener.close()
            if self.options.control_path and os.path.exists(self.options.control_path):
                os.unlink(self.options.control_path)
        if self.store is not None:
            self.store.flush()                     # what is left: the keeper ends with us
        self.loop.close()

    # -- listeners ---------------------------------------------------------------------------

    def _watch_listener(self, listener: socket.socket) -> None:
        if listener.fileno() >= 0 and self.running:
            self.loop.watch(listener, reader=lambda: self._on_listener(listener))

    def _on_listener(self, listener: socket.socket) -> None:
        try:
            sock, _ = listener.accept()
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno not in _ACCEPT_RETRY:
                raise
            # Out of fds (or memory): keep serving the connections we have, stop watching
            # this listener (it would be ready again at once) and try again later.
            first, longest = ACCEPT_BACKOFF
            delay = min(longest, self._accept_backoff.get(listener.fileno(), first / 2) * 2)
            self._accept_backoff[listener.fileno()] = delay
            log.warning("cannot accept a connection on %s: %s; retrying in %.2f s",
                        listener.getsockname(), exc.strerror, delay)
            self.loop.unwatch(listener)
            self.loop.call_later(delay, lambda: self._watch_listener(listener))
            return
        self._accept_backoff.pop(listener.fileno(), None)
        vm = self._vm_listeners.get(listener.fileno())
        if vm is not None:
            vm.accept(sock)
        else:
            self._accept_client(sock)

    def _vm_changed(self, vm: Vm) -> None:
        self._check_waiters()
        self.pilot.on_change(vm)

    def _vm_disconnected(self, vm: Vm) -> None:
        self._fail_waiters(vm, "the guest disconnected")
        self._pilot_off(vm.name, "the guest disconnected")

    # -- the autopilot's settings, kept with the keeper (--keeper) ----------------------------

    def _pilot_on(self, vm: Vm, floor: int | None, reserve: int | None, ceiling: int | None,
                  dry_run: bool) -> dict:
        status = self.pilot.enable(vm, floor, reserve, ceiling, dry_run)
        if self.store is not None:
            self.store.put(f"pilot/{vm.name}", msgpack.packb([floor, reserve, ceiling, dry_run]))
        return status

    def _pilot_off(self, name: str, why: str = "disabled") -> bool:
        if self.store is not None:
            self.store.drop(f"pilot/{name}")
        return self.pilot.disable(name, why)

    def _pilot_again(self, vm: Vm) -> None:
        """An adopted VM serves again: its autopilot too, as it was set."""
        blob = self._kept_pilots.pop(vm.name, None)
        if blob is None or self.vms.get(vm.name) is not vm:
            return
        try:
            floor, reserve, ceiling, dry_run = msgpack.unpackb(blob)
            self._pilot_on(vm, floor, reserve, ceiling, dry_run)
        except (ValueError, TypeError, RequestError, msgpack.ExtraData, msgpack.FormatError) as exc:
            log.error("vm %s: the kept autopilot settings do not apply (%s): autopilot off",
                      vm.name, exc)

    def _fail_waiters(self, vm: Vm, why: str) -> None:
        theirs = [w for w in self.waiters if w.vm is vm]
        self.waiters = [w for w in self.waiters if w.vm is not vm]
        for waiter in theirs:
            self._reply(waiter.client, {"id": waiter.ident, "ok": False, "error": why})

    # -- operator clients --------------------------------------------------------------------

    def _accept_client(self, sock: socket.socket) -> None:
        if len(self.clients) >= MAX_CLIENTS:
            try:
                sock.send(encode_reply({"id": None, "ok": False,
                                        "error": f"more than {MAX_CLIENTS} control clients"}))
            except OSError:
                pass                        # it is being refused either way
            sock.close()
            return
        sock.setblocking(False)
        client = Client(sock)
        self.clients[sock.fileno()] = client
        self._watch_client(client)

    def _watch_client(self, client: Client) -> None:
        self.loop.watch(client.sock, reader=lambda: self._on_client(client),
                        writer=(lambda: self._flush(client)) if client.outgoing else None)

    def _on_client(self, client: Client) -> None:
        try:
            data = client.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop_client(client)
            return
        try:
            messages = client.decoder.feed(data)
        except FrameError as exc:
            self._reply(client, {"id": None, "ok": False, "error": str(exc)})
            self._drop_client(client)
            return
        for message in messages:
            if client.sock.fileno() < 0:
                return
            try:
                self._serve(client, message)
            except Exception:
                # One failure domain per client: a bug met by one request ends that
                # client (logged with the traceback), never ``serve``.
                log.exception("unexpected error serving a control request")
                self._reply(client, {"id": None, "ok": False, "error": "internal error"})
                self._drop_client(client)
                return

    def _serve(self, client: Client, message: dict) -> None:
        ident = message.get("id")
        if not (ident is None or type(ident) is int):
            ident = None
        cmd = message.get("cmd")
        try:
            if type(cmd) is not str:
                raise RequestError(f"'cmd' must be a command name, not {str(cmd)[:40]!r}")
            if cmd in SERVER_COMMANDS:
                result = SERVER_COMMANDS[cmd](self, message)
                self._reply(client, {"id": ident, "ok": True, **result})
                return
            if cmd == "set" and "targets" in message:
                result = commands.set_many(self._devices_for(message), message)
                for name in result["vms"]:
                    self._manual(name)
                self._reply(client, {"id": ident, "ok": True, **result})
                return
            vm = self._resolve(message)
            device = vm.device
            if cmd == "wait" or cmd == "stats" and message.get("refresh") is True:
                self._check_wait_limits(client)
            result = commands.handle(device, {k: v for k, v in message.items() if k != "vm"})
            if cmd in ("set", "adjust") and self._manual(vm.name):
                result = {**result, "autopilot": "off: a manual target takes the VM off "
                                                 "autopilot"}
        except RequestError as exc:
            self._reply(client, {"id": ident, "ok": False, "error": str(exc)})
            return
        if isinstance(result, commands.RefreshRequest):
            now = time.monotonic()
            self.waiters.append(Waiter(client, ident, vm, asked_at=now,
                                       deadline=now + result.timeout))
            self._check_waiters()
            return
        if isinstance(result, commands.WaitRequest):
            self.waiters.append(Waiter(client, ident, vm, device.settle_watch(result.timeout,
                                                                              result.stall)))
            self._check_waiters()
            return
        self._reply(client, {"id": ident, "ok": True, **result})

    def _manual(self, name: str) -> bool:
        """A manual target on a VM under autopilot takes it off autopilot (always: the
        operator's word wins, and the reply says so)."""
        return self._pilot_off(name, "a manual target")

    def _devices_for(self, message: dict) -> dict[str, VmDevice | None]:
        targets = message.get("targets")
        if not isinstance(targets, dict) or not targets:
            raise RequestError("'targets' must map VM names to sizes in bytes")
        devices = {}
        for name in targets:
            devices[name] = self._resolve({"vm": name}).device
        return devices

    # -- server-level commands (no VM) -------------------------------------------------------

    def _cmd_list(self, message: dict) -> dict:
        commands.check_fields(message, set())
        return {"vms": [commands.vm_summary(vm.name, vm.spec.socket_path, vm.device)
                        for vm in sorted(self.vms.values(), key=lambda vm: vm.name)]}

    def _cmd_add(self, message: dict) -> dict:
        commands.check_fields(message, {"name", "socket", "options"})
        socket_path = message.get("socket")
        if type(socket_path) is not str:
            raise RequestError("'socket' must be the path of the VM's vhost-user socket")
        options = message.get("options", {})
        if not isinstance(options, dict):
            raise RequestError("'options' must be a map")
        spec = VmSpec(check_name(message.get("name")), socket_path,
                      options_from(options, self.options.balloon))
        vm = self.add_vm(spec, keep=True)
        return commands.vm_summary(vm.name, vm.spec.socket_path, vm.device)

    def _cmd_autopilot(self, message: dict) -> dict:
        commands.check_fields(message, {"action", "floor", "reserve", "ceiling", "dry_run"})
        action = message.get("action")
        if action == "status":
            names = [message["vm"]] if message.get("vm") is not None else sorted(self.vms)
            for name in names:
                self._resolve({"vm": name})
            return {"vms": [self.pilot.status(name) for name in names],
                    "host": None if self.pilot.last_host is None else
                    {"available_bytes": self.pilot.last_host.available_bytes,
                     "psi_some_avg10": self.pilot.last_host.psi_some_avg10},
                    "host_budget_bytes": self.options.autopilot.host_budget}
        vm = self._resolve(message)
        if action == "disable":
            if not self._pilot_off(vm.name):
                raise RequestError(f"VM {vm.name!r} is not under autopilot")
            return self.pilot.status(vm.name)
        if action == "enable":
            sizes = {}
            for key in ("floor", "reserve", "ceiling"):
                value = message.get(key)
                if value is not None and (type(value) is not int or value < 0):
                    raise RequestError(f"{key!r} must be a size in bytes")
                sizes[key] = value
            dry_run = message.get("dry_run", False)
            if type(dry_run) is not bool:
                raise RequestError("'dry_run' must be true or false")
            return self._pilot_on(vm, sizes["floor"], sizes["reserve"], sizes["ceiling"],
                                  dry_run)
        raise RequestError(f"unknown autopilot action {action!r}: enable, disable or status")

    def _cmd_remove(self, message: dict) -> dict:
        commands.check_fields(message, {"name"})
        name = check_name(message.get("name"))
        self.remove_vm(name)
        return {"removed": name}

    def _check_wait_limits(self, client: Client) -> None:
        if len(self.waiters) >= MAX_WAITS:
            raise RequestError(f"{MAX_WAITS} waits are pending on this server: try again "
                               f"when some have ended")
        if sum(1 for w in self.waiters if w.client is client) >= MAX_WAITS_PER_CLIENT:
            raise RequestError(f"this client already has {MAX_WAITS_PER_CLIENT} waits "
                               f"pending")

    def _check_waiters(self) -> None:
        """Answer the waits that are over; a tick runs only while some are pending."""
        if self.waiters:
            now = time.monotonic()
            done, self.waiters = self.waiters, []
            bodies: dict[str, dict] = {}
            for waiter in done:
                if waiter.client.sock.fileno() < 0:
                    continue                    # its client went away while we replied
                if waiter.watch is None:
                    if not self._check_refresh(waiter, now):
                        self.waiters.append(waiter)
                    continue
                device = waiter.vm.device
                if device is None:
                    outcome = "disconnected"
                else:
                    outcome = waiter.watch.check(device.config.actual, device.config.num_pages,
                                                 now)
                if outcome is None:
                    self.waiters.append(waiter)
                    continue
                body = bodies.get(waiter.vm.name)
                if body is None:
                    body = bodies[waiter.vm.name] = commands.status(device)
                self._reply(waiter.client, {"id": waiter.ident, "ok": True,
                                            "outcome": outcome, **body})
        if self.waiters and (self._tick is None or not self._tick.pending):
            self._tick = self.loop.call_later(TICK, self._check_waiters)

    def _check_refresh(self, waiter: Waiter, now: float) -> bool:
        """Answer a stats refresh if the guest sent newer values or time is up."""
        device = waiter.vm.device
        updated = device.stats.updated_monotonic if device is not None else None
        if device is not None and updated is not None and updated > waiter.asked_at:
            self._reply(waiter.client, {"id": waiter.ident, "ok": True,
                                        **commands.stats(device, refresh=False),
                                        "refresh_requested": True})
            return True
        if device is None or now >= waiter.deadline:
            why = ("the guest disconnected" if device is None else
                   f"the guest did not refresh its statistics within "
                   f"{waiter.deadline - waiter.asked_at:g} s")
            self._reply(waiter.client, {"id": waiter.ident, "ok": False, "error": why})
            return True
        return False

    def _reply(self, client: Client, message: dict) -> None:
        if client.sock.fileno() < 0:
            return
        client.outgoing += encode_reply(message)
        if len(client.outgoing) > MAX_CLIENT_BACKLOG:
            log.warning("control client does not read its replies: dropped")
            self._drop_client(client)
            return
        self._flush(client)

    def _flush(self, client: Client) -> None:
        try:
            sent = client.sock.send(client.outgoing)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._drop_client(client)
            return
        del client.outgoing[:sent]
        self._watch_client(client)

    def _drop_client(self, client: Client) -> None:
        fd = client.sock.fileno()
        if fd < 0:
            return
        self.clients.pop(fd, None)
        self.loop.unwatch(client.sock)
        client.sock.close()
        self.waiters = [w for w in self.waiters if w.client is not client]


SERVER_COMMANDS = {"list": Server._cmd_list, "add": Server._cmd_add, "remove": Server._cmd_remove,
                   "autopilot": Server._cmd_autopilot}


# The spawner thread runs Python for a few ms per worker spawn; the loop thread waiting for
# the GIL meanwhile would delay every VM's replies by up to Python's default 5 ms interval.
GIL_SWITCH_INTERVAL = 0.0005


def serve(options: ServeOptions, keeper: Link | None = None) -> None:
    """``vballoon serve``: serve ``options`` in this process until SIGTERM/SIGINT; with a
    ``keeper`` (``--keeper``), adopt what it kept and leave it what a successor needs."""
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    kept, store = None, None
    if keeper is not None:
        store = Store(keeper)
        kept = store.load()
    Server(options, store, kept).run()
