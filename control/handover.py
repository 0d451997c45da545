"""What ``serve`` leaves with its keeper, so a new ``serve`` can carry on after a crash.

``vballoon serve --keeper`` runs ``serve`` as the child of a small keeper process
(``control/keeper.py``). ``serve`` tells the keeper, as it happens, everything a successor
needs to adopt each VM's vhost-user connection: the connection itself, the requests that set
the session up (with their fds: guest memory, kick and call eventfds, the backend channel),
the device's config (target, ``actual``) and the VMs added at runtime. The keeper holds them
(its own copies of the fds); if ``serve`` dies, it starts a new one and hands them over.

The wire: a ``SOCK_SEQPACKET`` socket pair, one record per message: a msgpack list
``[op, key, blob]`` with the record's fds attached (SCM_RIGHTS). Ops from ``serve``:
``put`` (store, replacing what ``key`` held), ``drop`` (forget ``key``), ``drop-prefix``.
From the keeper, at a new ``serve``'s start: one ``entry`` per key, then ``end``.

Sending never blocks the loop: records wait in a bounded queue (fds duplicated at once, so
the caller may close its own) until the socket takes them. If the keeper is gone, ``serve``
carries on without one (logged once).
"""

from __future__ import annotations

import array
import collections
import dataclasses
import logging
import mmap
import os
import socket
import struct
import time

import msgpack

from control import vhost_user as vu

log = logging.getLogger("vballoon.handover")

MAX_RECORD = 64 * 1024          # bytes of one record (a request's bytes, a config blob)
MAX_FDS = 8                     # fds of one record (a memory table carries up to 8)
MAX_QUEUED = 4096               # records waiting for the keeper to read them
SEND_BUFFER = 4 << 20           # bytes of records the socket holds for the keeper
HANDOVER_TIMEOUT = 10.0         # seconds a new serve waits for the keeper's entries
_ANCILLARY = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)


def dup_all(fds) -> tuple[int, ...]:
    """Copies of ``fds``; raises ``OSError`` (out of fds) with none left open."""
    copies: list[int] = []
    try:
        for fd in fds:
            copies.append(os.dup(fd))
    except OSError:
        for fd in copies:
            os.close(fd)
        raise
    return tuple(copies)


@dataclasses.dataclass
class Link:
    """serve's end of its keeper: the record socket, and one byte of memory shared with
    the keeper that serve sets when it gives up on it (a memory write, so it is there
    whatever happens next: the keeper then never hands the records on)."""

    sock: socket.socket
    flag: mmap.mmap

    @property
    def gave_up(self) -> bool:
        return self.flag[0] != 0


def send_record(sock: socket.socket, op: str, key: str, blob: bytes = b"",
                fds: tuple[int, ...] = ()) -> None:
    data = msgpack.packb([op, key, blob])
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([data], ancillary)


def recv_record(sock: socket.socket) -> tuple[str, str, bytes, list[int]] | None:
    """One record, or None at EOF. Raises ``ValueError`` for a malformed one (its fds
    closed)."""
    data, ancillary, flags, _ = sock.recvmsg(MAX_RECORD + 256, _ANCILLARY,
                                             socket.MSG_CMSG_CLOEXEC)
    fds: list[int] = []
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % array.array("i").itemsize
            fds.extend(array.array("i", payload[:usable]))
    if not data and not fds:
        return None
    try:
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            raise ValueError("record truncated")
        op, key, blob = msgpack.unpackb(data)
        if not (isinstance(op, str) and isinstance(key, str) and isinstance(blob, bytes)):
            raise ValueError("record fields of the wrong types")
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError,
            msgpack.StackError) as exc:
        for fd in fds:
            os.close(fd)
        raise ValueError(f"bad handover record: {exc}") from None
    return op, key, blob, fds


class Store:
    """``serve``'s side: ``put``/``drop`` records for the keeper, without blocking.

    ``watch(writable)`` is called with True when queued records wait for the socket to be
    writable, False when the queue is empty again (the server then watches the socket).
    """

    def __init__(self, link: Link) -> None:
        self.sock = link.sock
        self.flag = link.flag
        try:
            self.flag.madvise(mmap.MADV_DONTFORK)   # no worker or zygote gets the flag
        except (AttributeError, OSError):
            pass
        self.queue: collections.deque[tuple[str, str, bytes, tuple[int, ...]]] = collections.deque()
        self.gone = False
        self.watch = lambda writable: None
        self._flushed: list = []              # (record count, callback) waiting for it
        self.queued = 0                       # records ever queued ...
        self.sent = 0                         # ... and ever handed to the socket
        # Room for bursts (a record per MiB per guest inflating) between the keeper's looks.
        for option in (getattr(socket, "SO_SNDBUFFORCE", None), socket.SO_SNDBUF):
            try:
                if option is not None:
                    self.sock.setsockopt(socket.SOL_SOCKET, option, SEND_BUFFER)
                    break
            except OSError:
                continue

    @property
    def flushed(self) -> bool:
        """Everything put so far is with the keeper (or there is no keeper any more)."""
        return not self.queue

    def when_flushed(self, callback) -> None:
        """Call ``callback`` once every record put so far is with the keeper (at once if
        it is; not waiting for records put later): a reply that tells the front-end
        something is held until then."""
        if not self.queue:
            callback()
        else:
            self._flushed.append((self.queued, callback))

    def load(self) -> dict[str, tuple[bytes, list[int]]]:
        """The keeper's entries, at start-up (before the loop runs: bounded by
        ``HANDOVER_TIMEOUT``). Raises ``OSError`` or ``ValueError``."""
        entries: dict[str, tuple[bytes, list[int]]] = {}
        deadline = time.monotonic() + HANDOVER_TIMEOUT
        self.sock.setblocking(True)
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("the keeper did not hand its entries over in time")
                self.sock.settimeout(left)
                record = recv_record(self.sock)
                if record is None:
                    raise ConnectionError("the keeper closed the handover socket")
                op, key, blob, fds = record
                if op == "end":
                    return entries
                if op != "entry":
                    for fd in fds:
                        os.close(fd)
                    raise ValueError(f"unexpected handover op {op!r}")
                entries[key] = (blob, fds)
        except BaseException:
            for _, fds in entries.values():
                for fd in fds:
                    os.close(fd)
            raise
        finally:
            self.sock.setblocking(False)

    def put(self, key: str, blob: bytes = b"", fds: tuple[int, ...] = (), owned: bool = False) -> None:
        """Store ``blob`` and copies of ``fds`` (or ``fds`` themselves when ``owned``)."""
        self._queue("put", key, blob, tuple(fds) if owned else dup_all(fds))

    def drop(self, key: str) -> None:
        self._queue("drop", key, b"", ())

    def drop_prefix(self, prefix: str) -> None:
        self._queue("drop-prefix", prefix, b"", ())

    def _queue(self, op: str, key: str, blob: bytes, fds: tuple[int, ...]) -> None:
        if self.gone or len(self.queue) >= MAX_QUEUED:
            for fd in fds:
                os.close(fd)
            if not self.gone:
                self._lose("the keeper does not read what serve leaves with it")
            return
        self.queue.append((op, key, blob, fds))
        self.queued += 1
        if len(self.queue) == 1:
            self.flush()

    def flush(self) -> None:
        """Send what the socket takes now; the rest when it is writable."""
        while self.queue and not self.gone:
            op, key, blob, fds = self.queue[0]
            try:
                send_record(self.sock, op, key, blob, fds)
            except BlockingIOError:
                self.watch(True)
                return
            except OSError as exc:
                self._lose(f"the keeper is gone ({exc.strerror})")
                return
            self.queue.popleft()
            self.sent += 1
            for fd in fds:
                os.close(fd)
            if self._flushed and self._flushed[0][0] <= self.sent:
                self._run_flushed()
        self.watch(False)
        self._run_flushed()

    def _run_flushed(self) -> None:
        """Call back whoever waits for records now with the keeper (all of them once the
        keeper is given up)."""
        due = [cb for count, cb in self._flushed if self.gone or count <= self.sent]
        self._flushed = [(count, cb) for count, cb in self._flushed
                         if not (self.gone or count <= self.sent)]
        for callback in due:
            callback()

    def give_up(self, why: str) -> None:
        if not self.gone:
            self._lose(why)

    def _lose(self, why: str) -> None:
        """Give up on the keeper: set the shared flag first (it then forgets all it holds
        whatever happens next: a successor must never adopt a session that went on
        without it), then close the socket."""
        log.error("%s: a crash of this serve will now cost the guests their balloons", why)
        self.flag[0] = 1
        self.gone = True
        while self.queue:
            for fd in self.queue.popleft()[3]:
                os.close(fd)
        self.watch(False)
        self.sock.close()
        self._run_flushed()



# -- one VM's records ------------------------------------------------------------------------

def _request_key(event: vu.Request) -> str | None:
    """Where a request that sets the session up is kept (a later one of the same kind for
    the same ring replaces it); None for requests a successor needs no copy of."""
    match event:
        case vu.SetOwner():
            return "owner"
        case vu.SetFeatures():
            return "features"
        case vu.SetProtocolFeatures():
            return "protocol"
        case vu.SetBackendReqFd():
            return "backend"
        case vu.SetMemTable():
            return "mem"
        case vu.SetVringNum() | vu.SetVringBase() | vu.SetVringAddr() | vu.SetVringCall() \
                | vu.SetVringKick() | vu.SetVringEnable():
            return f"{type(event).__name__}/{event.index}"
    return None


BLOB_KINDS = ("spec", "pilot")   # kept per VM, without fds, beside its connection
RING_BASE = object()             # ``prepare``'s mark for a GET_VRING_BASE
_CONFIG = struct.Struct("<IIq")   # target, actual, poison_val (-1: not written)


class VmRecord:
    """What one VM's connection leaves with the keeper (keys ``conn/``, ``req/``, ``cfg/``,
    ``inflight/`` under the VM's name)."""

    def __init__(self, store: Store, name: str) -> None:
        self.store = store
        self.name = name
        self._config: bytes | None = None
        self._kicks: set[int] = set()       # rings whose kick request is kept
        self.abandoned = False              # keep nothing more (see give_up)

    def connected(self, conn: socket.socket) -> None:
        self.abandoned = False
        self.store.put(f"conn/{self.name}", fds=(conn.fileno(),))

    def give_up(self, why: str) -> None:
        """Something could not be kept: keep nothing more for this connection (a crash then
        costs it its balloon, as without a keeper, never a stale adoption)."""
        log.error("vm %s: %s: a crash of serve will now cost this guest its balloon",
                  self.name, why)
        self.disconnected()
        self.abandoned = True

    def disconnected(self) -> None:
        self.store.drop(f"conn/{self.name}")
        self.store.drop(f"cfg/{self.name}")
        self.store.drop(f"inflight/{self.name}")
        self.store.drop_prefix(f"req/{self.name}/")
        self._config = None
        self._kicks.clear()

    def prepare(self, event: vu.Request) -> tuple | None:
        """Before the session handles ``event``: its bytes and copies of its fds (the session
        may close its own), or None if it is not kept.

        A ring that a request stops is forgotten once the request is handled (``commit``,
        then ``rings_stopped``), not before: the front-end waits for the reply before it
        lets the ring's memory go, so a successor may start the ring again and then stop it
        properly when it answers the request. The exception is SET_FEATURES while the rings
        run, which to UML means its driver probes again: the old driver is gone and its
        rings' memory may already be reused, so the caller forgets them at once
        (``forget_kicks``)."""
        if self.abandoned:
            return None
        if isinstance(event, (vu.ResetOwner, vu.ResetDevice)):
            self.store.drop_prefix(f"req/{self.name}/")
            self._kicks.clear()
            return None
        if isinstance(event, vu.GetVringBase):
            return RING_BASE, event.index, ()
        key = _request_key(event)
        if key is None:
            return None
        data, fds = vu.FrontendConnection().send(dataclasses.replace(event, need_reply=False))
        return key, data, dup_all(fds)

    def commit(self, prepared: tuple, ok: bool, base: int | None = None) -> None:
        """After the session handled the request ``prepare`` kept: store it if it applied.
        For GET_VRING_BASE, ``base`` is the index the front-end was told: kept as the
        ring's base, which a successor answers if asked again."""
        key, data, fds = prepared
        if self.abandoned:
            for fd in fds:
                os.close(fd)
            return
        if key is RING_BASE:
            if ok and base is not None:
                self._keep_base(data, base)
            return
        if ok:
            self.store.put(f"req/{self.name}/{key}", data, fds, owned=True)
            if key.startswith("SetVringKick/"):
                self._kicks.add(int(key.rsplit("/", 1)[1]))
        else:
            for fd in fds:
                os.close(fd)

    def adopted(self, adoption: "Adoption") -> None:
        """This connection was adopted: what the keeper holds for it is what it kept."""
        self._kicks = set(adoption.kicks)

    def forget_kicks(self) -> None:
        """The driver is gone (UML's re-probe) and its rings' memory may be reused: no
        successor may start any of them, even before the stop is done."""
        self.rings_stopped([(index, None) for index in list(self._kicks)])

    def rings_stopped(self, rings: list[tuple[int, int | None]]) -> None:
        """These rings ``(index, base)`` are not served (stopped, or never started): forget
        the kick requests of those that ran, so a successor starts only what is running,
        and keep where each stopped (``base``, the used index the stop read): a successor
        asked GET_VRING_BASE answers that, not the base the ring was set up with. A ring
        starts again only with a new kick request (as in the session), kept anew."""
        if self.abandoned:
            return
        for index, base in rings:
            if index in self._kicks:
                self._kicks.discard(index)
                self.store.drop(f"req/{self.name}/SetVringKick/{index}")
                if base is not None:
                    self._keep_base(index, base)

    def _keep_base(self, index: int, base: int) -> None:
        """Ring ``index`` stands at ``base``: kept as the SET_VRING_BASE a successor replays."""
        request = vu.FrontendConnection().send(vu.SetVringBase(index, base))[0]
        self.store.put(f"req/{self.name}/SetVringBase/{index}", request)

    def in_flight(self, data: bytes, fds: list[int]) -> None:
        """A request (with fds) read and not yet answered: a successor answers it."""
        if self.abandoned:
            return
        self.store.put(f"inflight/{self.name}", data, tuple(fds))

    def answered(self) -> None:
        self.store.drop(f"inflight/{self.name}")

    def config(self, target: int, actual: int, poison: int | None) -> None:
        blob = _CONFIG.pack(target, actual, -1 if poison is None else poison)
        if blob != self._config and not self.abandoned:
            self._config = blob
            self.store.put(f"cfg/{self.name}", blob)


@dataclasses.dataclass
class Adoption:
    """A dead serve's connection of one VM, as its successor gets it."""

    conn: socket.socket
    requests: list[tuple[bytes, list[int]]]         # in the order they were made
    target: int = 0
    actual: int = 0
    poison: int | None = None
    in_flight: tuple[bytes, list[int]] | None = None   # read, never answered: answer it
    kicks: set[int] = dataclasses.field(default_factory=set)   # rings whose kick is kept


def adoptions(entries: dict[str, tuple[bytes, list[int]]]
              ) -> tuple[dict[str, Adoption], dict[str, dict[str, bytes]]]:
    """Split the keeper's entries into each VM's ``Adoption`` and the other blobs by kind
    and VM (``spec``: VMs added at runtime; ``pilot``: autopilot settings). Takes the fds;
    closes those of entries that need none."""
    adopted: dict[str, Adoption] = {}
    blobs: dict[str, dict[str, bytes]] = {kind: {} for kind in BLOB_KINDS}
    leftovers: list[int] = []
    for key, (blob, fds) in entries.items():
        kind, _, rest = key.partition("/")
        if kind == "conn" and len(fds) == 1:
            adopted[rest] = Adoption(socket.socket(fileno=fds[0]), [])
        elif kind in BLOB_KINDS:
            blobs[kind][rest] = blob
            leftovers += fds
    for key, (blob, fds) in entries.items():
        kind, _, rest = key.partition("/")
        name = rest.split("/", 1)[0]
        if kind == "req" and name in adopted:
            adopted[name].requests.append((blob, fds))
            kind_index = rest.split("/")[1:]
            if len(kind_index) == 2 and kind_index[0] == "SetVringKick" and kind_index[1].isdigit():
                adopted[name].kicks.add(int(kind_index[1]))
        elif kind == "inflight" and name in adopted:
            adopted[name].in_flight = (blob, fds)
        elif kind == "cfg" and name in adopted:
            try:
                adoption = adopted[name]
                adoption.target, adoption.actual, poison = _CONFIG.unpack(blob)
                adoption.poison = None if poison < 0 else poison
            except struct.error:
                log.warning("vm %s: the kept config is malformed: starting from zero", name)
            leftovers += fds
        elif kind != "conn" and kind not in BLOB_KINDS or (kind == "conn" and len(fds) != 1):
            leftovers += fds
    for fd in leftovers:
        os.close(fd)
    return adopted, blobs
