"""Boot and drive the vballoon test guest: User-Mode Linux with an initramfs shell.

``guest/prepare.sh`` builds the image (kernel, patched to run on this host, and an
initramfs whose ``/init`` is ``guest/init``). This module starts it as an ordinary
host process and talks to the shell on its console over two pipes.

Lifecycle of a :class:`UmlGuest`::

    created --start()--> booting --wait_ready()--> ready --stop()--> stopped
                            |                        |
                            +--- guest exits --------+--> (stop() still required: it reaps
                                                           and removes the run directory)

Using it as a context manager does ``start(); wait_ready()`` and always ``stop()``.

Things the caller must know:

* With ``vhost_socket`` set, the vhost-user backend must already be listening:
  UML connects once, while it boots, and never retries.
* Guest RAM is an unlinked file in the run directory (UML's ``$TMPDIR``); on
  tmpfs (``/dev/shm``, the default) it is host memory, so ``host_ram_bytes()``
  measures what the guest really costs the host. Pages the guest never touched
  cost nothing: use :meth:`UmlGuest.fill_memory` to dirty some.
* UML forks helper processes. The guest runs in its own session and process
  group, and :meth:`UmlGuest.stop` kills and waits for the whole group.

Run ``python -m guest.uml`` for a boot report (times, memory, module state).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from guest.console import ConsoleLog
from guest.errors import GuestBootError, GuestError, GuestNotPrepared
from guest.shell import ConsoleShell, _share
from guest.procfs import OpenFile, deleted_files_under

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_IMAGE_DIR = REPO_ROOT / ".cache" / "guest"

# Printed by guest/init once the shell is about to read commands.
READY_MARKER = b"vballoon-guest: ready"
BALLOON_LINE = re.compile(r"vballoon-guest: balloon ([^\r\n]*)")

VIRTIO_ID_BALLOON = 5
# How long stop() waits for each step before escalating (see UmlGuest.stop).
GRACEFUL_POWEROFF_S = 2.0
SIGTERM_GRACE_S = 1.0


# ---------------------------------------------------------------------------
# The prepared image


@dataclass(frozen=True)
class GuestImage:
    """The files prepare.sh made: kernel, initramfs, and the VERSIONS record."""

    directory: Path
    kernel: Path
    initrd: Path
    versions: dict[str, str]

    @classmethod
    def load(cls, directory: str | os.PathLike[str] | None = None) -> GuestImage:
        """Reads the image in ``directory`` (default ``.cache/guest`` in the repo).

        Raises GuestNotPrepared if ``.ready`` is missing or the kernel cannot run
        (prepare.sh writes absolute paths into it: moving the directory breaks it).
        """
        d = Path(directory) if directory is not None else DEFAULT_IMAGE_DIR
        kernel, initrd = d / "linux.uml", d / "initrd.img"
        hint = f"run: bash guest/prepare.sh {d}"
        if not (d / ".ready").is_file():
            raise GuestNotPrepared(f"no prepared guest in {d} ({hint})")
        for path in (kernel, initrd, d / "VERSIONS"):
            if not path.is_file():
                raise GuestNotPrepared(f"{path} is missing ({hint})")
        interpreter = _elf_interpreter(kernel)
        if interpreter is not None and not os.path.exists(interpreter):
            raise GuestNotPrepared(f"{kernel} needs {interpreter}, which is gone (was {d} moved? {hint})")
        return cls(directory=d, kernel=kernel, initrd=initrd, versions=_read_versions(d / "VERSIONS"))


def _read_versions(path: Path) -> dict[str, str]:
    versions = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep:
            versions[key.strip()] = value.strip()
    return versions


def _elf_interpreter(path: Path) -> str | None:
    """The PT_INTERP path of a 64-bit little-endian ELF file, or None if it has none."""
    with open(path, "rb") as f:
        header = f.read(64)
        if header[:4] != b"\x7fELF" or header[4] != 2 or header[5] != 1:
            return None
        phoff = int.from_bytes(header[32:40], "little")
        phentsize = int.from_bytes(header[54:56], "little")
        phnum = int.from_bytes(header[56:58], "little")
        f.seek(phoff)
        table = f.read(phentsize * min(phnum, 64))  # bounded: real kernels have ~10
        for i in range(0, len(table) - phentsize + 1, phentsize):
            if int.from_bytes(table[i : i + 4], "little") == 3:  # PT_INTERP
                offset = int.from_bytes(table[i + 8 : i + 16], "little")
                size = int.from_bytes(table[i + 32 : i + 40], "little")
                f.seek(offset)
                return f.read(min(size, 4096)).rstrip(b"\0").decode()
    return None


# ---------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class GuestConfig:
    """How to boot one guest.

    ``workdir`` is the parent of the per-guest run directory (UML's ``uml_dir``
    and ``$TMPDIR``, where the RAM file lives); None picks ``/dev/shm`` when it is
    usable, else the system temp directory. It must not be mounted noexec: UML
    maps its RAM file executable.
    """

    mem_mib: int = 512
    vhost_socket: str | None = None
    virtio_id: int = VIRTIO_ID_BALLOON
    extra_args: tuple[str, ...] = ()
    workdir: str | None = None
    image_dir: str | None = None
    boot_timeout: float = 30.0

    def __post_init__(self) -> None:
        if self.mem_mib < 32:
            raise ValueError("mem_mib below 32 MiB will not boot")
        if self.vhost_socket is not None and ":" in self.vhost_socket:
            # virtio_uml.device= separates the socket from the device id with ':'.
            raise ValueError(f"vhost socket path may not contain ':': {self.vhost_socket}")

    def kernel_args(self, image: GuestImage, run_dir: str) -> list[str]:
        """The UML command line (without the binary)."""
        args = [
            f"mem={self.mem_mib}M",
            f"initrd={image.initrd}",
            # Only the first console, on our pipes; others would grab the host tty.
            "con=null",
            "con0=fd:0,fd:1",
            # The raid6 algorithm benchmark alone costs ~0.85 s of every boot.
            "initcall_blacklist=raid6_init",
            f"uml_dir={run_dir}",
            "umid=guest",
        ]
        if self.vhost_socket is not None:
            args.append(f"virtio_uml.device={self.vhost_socket}:{self.virtio_id}")
        args.extend(self.extra_args)
        return args


def default_workdir() -> str:
    """/dev/shm if it is a writable directory without noexec, else the temp dir."""
    for candidate in ("/dev/shm", tempfile.gettempdir()):
        if os.path.isdir(candidate) and os.access(candidate, os.W_OK | os.X_OK) and not _noexec(candidate):
            return candidate
    raise GuestError("no writable directory without noexec for the guest RAM file")


def _noexec(path: str) -> bool:
    return bool(os.statvfs(path).f_flag & os.ST_NOEXEC)


# ---------------------------------------------------------------------------
# The guest


@dataclass
class _Running:
    """Everything that exists only between start() and stop()."""

    proc: subprocess.Popen[bytes]
    pidfd: int
    console: ConsoleLog
    run_dir: str
    started: float
    stdin_fd: int = field(init=False)

    def __post_init__(self) -> None:
        assert self.proc.stdin is not None
        self.stdin_fd = self.proc.stdin.fileno()


class UmlGuest(ConsoleShell):
    """One User-Mode Linux guest with a shell on its console.

    Not thread-safe: drive a guest from one thread. See the module docstring for
    the lifecycle.
    """

    WHO = "UML"

    def __init__(self, config: GuestConfig | None = None, image: GuestImage | None = None) -> None:
        self.config = config if config is not None else GuestConfig()
        self._image = image
        self._run: _Running | None = None
        self._ready_at: int | None = None  # console offset just past the ready marker
        self._boot_seconds: float | None = None
        self._balloon_state: str | None = None
        self._fills = 0
        self._final_console = ""

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        """Starts UML. Returns at once; call :meth:`wait_ready` next.

        Raises GuestNotPrepared (no image), GuestBootError (cannot exec, vhost
        socket missing), GuestError (already started, no usable workdir).
        """
        if self._run is not None:
            raise GuestError("guest already started")
        image = self._image if self._image is not None else GuestImage.load(self.config.image_dir)
        self._image = image
        sock = self.config.vhost_socket
        if sock is not None and not os.path.exists(sock):
            raise GuestBootError(f"vhost-user socket {sock} does not exist (the backend must listen first)")
        parent = self.config.workdir if self.config.workdir is not None else default_workdir()
        if _noexec(parent):
            raise GuestError(f"{parent} is mounted noexec: UML cannot map its RAM file there")
        run_dir = tempfile.mkdtemp(prefix="vballoon-uml-", dir=parent)
        try:
            self._run = self._spawn(image, run_dir)
        except BaseException:
            _remove_tree(run_dir)
            raise

    def _spawn(self, image: GuestImage, run_dir: str) -> _Running:
        env = dict(os.environ, TMPDIR=run_dir)
        started = time.monotonic()
        try:
            proc = subprocess.Popen(
                [str(image.kernel), *self.config.kernel_args(image, run_dir)],
                stdin=subprocess.PIPE,
                # A pipe, not a file: UML's fd console fails on a regular file.
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                cwd=run_dir,
                env=env,
                close_fds=True,
                # Own session and process group: stop() kills UML's helpers with
                # it, and a ^C meant for the test runner never reaches the guest.
                start_new_session=True,
            )
        except OSError as exc:
            raise GuestBootError(f"cannot run {image.kernel}: {exc}") from exc
        try:
            # A pidfd lets stop() wait for exit with a deadline and without
            # reaping, so the process group id cannot be recycled before the
            # group is killed.
            pidfd = os.pidfd_open(proc.pid)
        except OSError as exc:  # kernels before 5.3
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise GuestBootError(f"pidfd_open: {exc}") from exc
        assert proc.stdout is not None
        # The console log owns its own fd (and closes it at EOF); Popen's copy
        # goes now so nothing else can close the number under the reader thread.
        console = ConsoleLog(os.dup(proc.stdout.fileno()), name=f"uml-console-{proc.pid}")
        proc.stdout.close()
        console.start()
        return _Running(proc=proc, pidfd=pidfd, console=console, run_dir=run_dir, started=started)

    def wait_ready(self, timeout: float | None = None) -> None:
        """Waits for guest/init's ready marker, at most ``timeout`` s (default: config.boot_timeout).

        Guarantees on return: the shell reads commands, the console is quiet
        (kernel messages go to dmesg only), and :attr:`boot_seconds` and
        :attr:`balloon_state` are set. Raises GuestBootError with the console
        tail if the guest exits first or ``timeout`` seconds pass.
        """
        run = self._require_started()
        if self._ready_at is not None:
            return
        if timeout is None:
            timeout = self.config.boot_timeout
        ready = re.compile(re.escape(READY_MARKER) + rb"\r?\n")
        match = run.console.wait_for(ready, 0, time.monotonic() + timeout)
        if match is None:
            status = run.proc.poll()
            why = f"exited with status {status}" if status is not None else f"not ready after {timeout:.1f} s"
            raise GuestBootError(f"guest {why}", run.console.text(tail=4000))
        self._boot_seconds = time.monotonic() - run.started
        self._ready_at = match.end()
        state = BALLOON_LINE.search(run.console.text(0))
        self._balloon_state = state.group(1) if state else None

    def stop(self, timeout: float = 10.0) -> int | None:
        """Powers the guest off, or kills it, and cleans up. Idempotent.

        Escalates within ``timeout`` seconds: ``poweroff -f`` on the console (if
        the guest got ready), then SIGTERM to UML (its emergency exit, which still
        reaps its helpers), then SIGKILL to the whole process group.

        Guarantees on return: UML is reaped and no process of its group is alive
        (raises GuestError if one is after ``timeout``; a killed helper may remain
        a zombie until init reaps it), the pipes are closed and the run directory
        is removed. Returns UML's exit status (negative: killed by that signal),
        or None if it was never started.
        """
        run = self._run
        if run is None:
            return None
        deadline = time.monotonic() + timeout
        try:
            exited = self._exited(run, 0)
            if not exited and self._ready_at is not None:
                try:
                    self._send(run, b"poweroff -f\n", min(deadline, time.monotonic() + 1.0))
                    # It takes ~10 ms; a guest stuck in a command never reads it.
                    exited = self._exited(run, min(_share(deadline, 0.5), GRACEFUL_POWEROFF_S))
                except GuestError:  # console stuck or closed: escalate
                    pass
            if not exited:
                self._signal_leader(run, signal.SIGTERM)
                # ~50 ms normally; UML blocked on a mute vhost-user backend never
                # handles it, so do not wait long.
                exited = self._exited(run, min(_share(deadline, 0.5), SIGTERM_GRACE_S))
            # Until the leader is reaped its pid still names the group, so the
            # number cannot have been recycled: safe to signal stragglers now.
            self._signal_group(run, signal.SIGKILL)
            self._exited(run, _share(deadline, 1.0))
            try:
                status = run.proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired as exc:
                raise GuestError(f"UML (pid {run.proc.pid}) survived SIGKILL for {timeout} s") from exc
            self._wait_group_gone(run, deadline)
        finally:
            self._release(run)
        return status

    def _release(self, run: _Running) -> None:
        if run.proc.stdin is not None:
            with contextlib.suppress(BrokenPipeError):  # the guest is gone; nothing to flush
                run.proc.stdin.close()
        # Every writer of the console pipe is dead, so the reader is at EOF.
        run.console.join(2.0)
        self._final_console = run.console.text(tail=64 * 1024)
        os.close(run.pidfd)
        self._run = None
        self._ready_at = None
        _remove_tree(run.run_dir)

    @staticmethod
    def _signal_leader(run: _Running, sig: signal.Signals) -> None:
        # ProcessLookupError is defensive: we reap the leader only after signalling.
        with contextlib.suppress(ProcessLookupError):
            os.kill(run.proc.pid, sig)

    @staticmethod
    def _signal_group(run: _Running, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):  # the group is already empty
            os.killpg(run.proc.pid, sig)

    # -- state -------------------------------------------------------------------

    @property
    def run_dir(self) -> str | None:
        """The per-guest directory (uml_dir and $TMPDIR) while started."""
        return self._run.run_dir if self._run is not None else None

    def ram_files(self) -> list[OpenFile]:
        """The guest RAM file(s) UML holds open, largest first.

        Each :attr:`OpenFile.path` (/proc/PID/fd/N) can be opened to get a new
        fd on the same memory. Raises GuestError if UML has exited.
        """
        run = self._require_started()
        try:
            return deleted_files_under(run.proc.pid, run.run_dir)
        except OSError as exc:
            raise GuestError(f"cannot read UML's open files: {exc}") from exc

    def host_ram_bytes(self) -> int:
        """Host memory (or disk) the guest RAM file really uses now: st_blocks * 512.

        Raises GuestError if UML has no RAM file open in its run directory.
        """
        files = self.ram_files()
        if not files:
            raise GuestError(f"UML (pid {self.pid}) holds no deleted file in {self.run_dir}")
        return files[0].allocated

    # -- helpers -----------------------------------------------------------------



def _remove_tree(path: str) -> None:
    """Removes ``path`` and everything in it; raises GuestError if it cannot.

    UML deletes its own uml_dir/umid on exit; if that races with us, an entry
    vanishes mid-walk (FileNotFoundError), so the walk is simply repeated.
    """
    for _ in range(3):
        try:
            shutil.rmtree(path)
            return
        except FileNotFoundError:
            if not os.path.lexists(path):
                return
        except OSError as exc:
            raise GuestError(f"cannot remove the guest run directory {path}: {exc}") from exc
    raise GuestError(f"cannot remove the guest run directory {path}: entries keep vanishing")


# ---------------------------------------------------------------------------
# python -m guest.uml: boot once and report


def _report() -> None:
    """Boots a guest without devices and prints the facts tests rely on."""
    config = GuestConfig()
    with UmlGuest(config) as guest:
        t0 = time.monotonic()
        guest.run("true")
        round_trip = time.monotonic() - t0
        info = guest.meminfo()
        before = guest.host_ram_bytes()
        guest.fill_memory(128)
        after = guest.host_ram_bytes()
        guest.free_memory()
        assert guest.image is not None
        print(f"versions:        {guest.image.versions}")
        print(f"uname:           {guest.run('uname -r').strip()}")
        print(f"boot to ready:   {guest.boot_seconds:.3f} s")
        print(f"command rtt:     {round_trip * 1000:.1f} ms")
        print(f"balloon:         {guest.balloon_state}")
        print(f"MemTotal:        {info['MemTotal']} kB at mem={config.mem_mib}M")
        print(f"MemFree:         {info['MemFree']} kB")
        print(f"host RAM file:   {before >> 20} MiB -> {after >> 20} MiB after fill_memory(128)")
        t1 = time.monotonic()
    print(f"stop:            {time.monotonic() - t1:.3f} s")


if __name__ == "__main__":
    _report()
