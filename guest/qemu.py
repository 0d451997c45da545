"""Boot and drive the vballoon QEMU test guest: x86_64 Linux under QEMU/TCG with an initramfs shell.

``guest/prepare_qemu.sh`` builds the image: sid's qemu-system-x86_64 patched to run on
this host with its own libraries, a sid kernel, and an initramfs whose ``/init`` is
``guest/qemu_init``. This module starts QEMU as an ordinary host process and talks to
the shell on the guest's first serial port over QEMU's stdin/stdout. It speaks the
same console protocol as :mod:`guest.uml` (same ready marker, same command framing).

Lifecycle of a :class:`QemuGuest`::

    created --start()--> booting --wait_ready()--> ready --stop()--> stopped
                            |                        |
                            +--- QEMU exits ---------+--> (stop() still required: it reaps
                                                           and closes the pipes)

Using it as a context manager does ``start(); wait_ready()`` and always ``stop()``.

Things the caller must know:

* With ``vhost_socket`` set, QEMU adds ``vhost-user-test-device-pci`` (virtio-id 5)
  and the vhost-user back-end must already be listening: QEMU connects once, at
  start-up, and exits if it cannot.
* Guest RAM is a memfd (``memory-backend-memfd,share=on``; vhost-user needs shared
  RAM), seen in /proc/PID/fd as ``/memfd:memory-backend-memfd (deleted)``. :meth:`QemuGuest.host_ram_bytes` is its ``st_blocks * 512``: the host memory
  the guest really costs. Pages the guest never touched cost nothing: use
  :meth:`QemuGuest.fill_memory` to dirty some.
* QEMU's own stderr (warnings such as "vhost guest set device config space failed")
  is kept apart from the console, in :meth:`QemuGuest.qemu_log`, so it never lands
  inside a command's output.
* Under TCG (no KVM) the guest is slow: ~6 s from exec to the ready marker, and
  every command costs tens of milliseconds.

Run ``python -m guest.qemu`` for a boot report (times, memory, module state).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from guest.console import ConsoleLog
from guest.errors import GuestBootError, GuestError, GuestNotPrepared
from guest.procfs import OpenFile
from guest.shell import ConsoleShell, _share

# The console protocol (ready marker, balloon line, command framing) is guest/uml.py's:
# guest/qemu_init follows guest/init line for line.
from guest.uml import (
    BALLOON_LINE,
    READY_MARKER,
    REPO_ROOT,
    VIRTIO_ID_BALLOON,
    _elf_interpreter,
    _read_versions,
)

DEFAULT_QEMU_DIR = REPO_ROOT / ".cache" / "qemu"
QEMU_BINARY = "root/usr/bin/qemu-system-x86_64"
# -L order matters: qemu-system-data's bios-256k.bin is a symlink into the host's
# /usr/share/seabios, which does not exist here.
FIRMWARE_DIRS = ("root/usr/share/seabios", "root/usr/share/qemu")
KERNEL_CMDLINE = "console=ttyS0 panic=-1 quiet"
# The readlink of QEMU's guest RAM fd. QEMU names the memfd after the backend's type,
# not its id (measured on 11.1: "/memfd:memory-backend-memfd (deleted)").
MEMFD_TARGET = "/memfd:memory-backend-memfd (deleted)"
# How long stop() waits for each step before escalating (see QemuGuest.stop).
GRACEFUL_POWEROFF_S = 2.0
SIGTERM_GRACE_S = 2.0


# ---------------------------------------------------------------------------
# The prepared image


@dataclass(frozen=True)
class QemuImage:
    """The files prepare_qemu.sh made: QEMU, firmware, kernel, initramfs and VERSIONS."""

    directory: Path
    qemu: Path
    firmware_dirs: tuple[Path, ...]
    kernel: Path
    initrd: Path
    versions: dict[str, str]

    @classmethod
    def load(cls, directory: str | os.PathLike[str] | None = None) -> QemuImage:
        """Reads the image in ``directory`` (default ``.cache/qemu`` in the repo).

        Raises GuestNotPrepared if ``.ready`` is missing or QEMU cannot run
        (prepare_qemu.sh writes absolute paths into it: moving the directory breaks it).
        """
        # Absolute: QEMU runs with the image directory as its working directory.
        d = (Path(directory) if directory is not None else DEFAULT_QEMU_DIR).absolute()
        qemu, kernel, initrd = d / QEMU_BINARY, d / "vmlinuz", d / "initrd.img"
        firmware = tuple(d / f for f in FIRMWARE_DIRS)
        hint = f"run: bash guest/prepare_qemu.sh {d}"
        if not (d / ".ready").is_file():
            raise GuestNotPrepared(f"no prepared QEMU guest in {d} ({hint})")
        for path in (qemu, kernel, initrd, d / "VERSIONS"):
            if not path.is_file():
                raise GuestNotPrepared(f"{path} is missing ({hint})")
        for path in firmware:
            if not path.is_dir():
                raise GuestNotPrepared(f"{path} is missing ({hint})")
        interpreter = _elf_interpreter(qemu)
        if interpreter is not None and not os.path.exists(interpreter):
            raise GuestNotPrepared(f"{qemu} needs {interpreter}, which is gone (was {d} moved? {hint})")
        return cls(
            directory=d,
            qemu=qemu,
            firmware_dirs=firmware,
            kernel=kernel,
            initrd=initrd,
            versions=_read_versions(d / "VERSIONS"),
        )


# ---------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class QemuConfig:
    """How to boot one guest.

    ``num_vqs`` and ``config_size`` are properties of QEMU's generic vhost-user device:
    3 queues (inflate, deflate, stats) and the 8-byte balloon config (``num_pages``,
    ``actual``). Use ``num_vqs=4`` when the back-end offers free page reporting. A
    ``config_size`` of 0 makes the guest read ``num_pages`` 0xFFFFFFFF and balloon
    itself to death.
    """

    mem_mib: int = 1024
    vhost_socket: str | None = None
    num_vqs: int = 3
    config_size: int = 8
    image_dir: str | os.PathLike[str] = DEFAULT_QEMU_DIR
    extra_args: tuple[str, ...] = ()
    kernel_args: tuple[str, ...] = ()      # appended to the guest kernel's command line
    reconnect_ms: int = 0                  # the chardev reconnects to a restarted back-end
    boot_timeout: float = 60.0

    def __post_init__(self) -> None:
        if self.mem_mib < 64:
            raise ValueError("mem_mib below 64 MiB will not boot")
        if self.num_vqs < 1:
            raise ValueError("num_vqs must be at least 1")
        if self.config_size < 0:
            raise ValueError("config_size must not be negative")

    def qemu_args(self, image: QemuImage) -> list[str]:
        """The QEMU command line (with the binary)."""
        m = f"{self.mem_mib}M"
        args = [
            str(image.qemu),
            "-accel", "tcg",
            "-cpu", "max",
            "-smp", "1",
            # Shared memfd RAM: the vhost-user back-end maps the same pages, and the
            # fd tells the host memory in use (host_ram_bytes).
            "-object", f"memory-backend-memfd,id=mem,size={m},share=on",
            "-machine", "q35,memory-backend=mem",
            "-m", m,
            "-nodefaults",
            "-display", "none",
            "-serial", "stdio",
            # Reboot or panic (panic=-1) ends QEMU instead of booting again.
            "-no-reboot",
        ]
        for firmware in image.firmware_dirs:
            args += ["-L", str(firmware)]
        args += ["-kernel", str(image.kernel), "-initrd", str(image.initrd), "-append",
                 " ".join((KERNEL_CMDLINE, *self.kernel_args))]
        if self.vhost_socket is not None:
            args += [
                "-chardev", f"socket,id=vb,path={_qemu_opt(self.vhost_socket)}"
                + (f",reconnect-ms={self.reconnect_ms}" if self.reconnect_ms else ""),
                "-device",
                f"vhost-user-test-device-pci,chardev=vb,virtio-id={VIRTIO_ID_BALLOON},"
                f"num_vqs={self.num_vqs},config_size={self.config_size}",
            ]
        args.extend(self.extra_args)
        return args


def _qemu_opt(value: str) -> str:
    """``value`` as one QEMU option value: a comma would start the next option."""
    return value.replace(",", ",,")


# ---------------------------------------------------------------------------
# The guest


@dataclass
class _Running:
    """Everything that exists only between start() and stop()."""

    proc: subprocess.Popen[bytes]
    pidfd: int
    console: ConsoleLog
    stderr: ConsoleLog
    started: float
    stdin_fd: int = field(init=False)

    def __post_init__(self) -> None:
        assert self.proc.stdin is not None
        self.stdin_fd = self.proc.stdin.fileno()


class QemuGuest(ConsoleShell):
    """One QEMU guest with a shell on its serial console.

    Not thread-safe: drive a guest from one thread. See the module docstring for
    the lifecycle.
    """

    WHO = "QEMU"

    def __init__(self, config: QemuConfig | None = None, image: QemuImage | None = None) -> None:
        self.config = config if config is not None else QemuConfig()
        self._image = image
        self._run: _Running | None = None
        self._ready_at: int | None = None  # console offset just past the ready marker
        self._boot_seconds: float | None = None
        self._balloon_state: str | None = None
        self._fills = 0
        self._final_console = ""
        self._final_stderr = ""

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        """Starts QEMU. Returns at once; call :meth:`wait_ready` next.

        Raises GuestNotPrepared (no image), GuestBootError (cannot exec, vhost
        socket missing), GuestError (already started).
        """
        if self._run is not None:
            raise GuestError("guest already started")
        image = self._image if self._image is not None else QemuImage.load(self.config.image_dir)
        self._image = image
        sock = self.config.vhost_socket
        if sock is not None and not os.path.exists(sock):
            raise GuestBootError(f"vhost-user socket {sock} does not exist (the back-end must listen first)")
        self._run = self._spawn(image)

    def _spawn(self, image: QemuImage) -> _Running:
        started = time.monotonic()
        try:
            proc = subprocess.Popen(
                self.config.qemu_args(image),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                # Apart from the console: QEMU's warnings must not land inside a
                # command's output.
                stderr=subprocess.PIPE,
                cwd=image.directory,
                close_fds=True,
                # Own session and process group: a ^C meant for the test runner
                # never reaches QEMU, and stop() can kill anything it started.
                start_new_session=True,
            )
        except OSError as exc:
            raise GuestBootError(f"cannot run {image.qemu}: {exc}") from exc
        try:
            # A pidfd lets stop() wait for exit with a deadline and without
            # reaping, so the process group id cannot be recycled before the
            # group is killed.
            pidfd = os.pidfd_open(proc.pid)
        except OSError as exc:  # kernels before 5.3
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise GuestBootError(f"pidfd_open: {exc}") from exc
        assert proc.stdout is not None and proc.stderr is not None
        # Each log owns its own fd (and closes it at EOF); Popen's copies go now so
        # nothing else can close the number under the reader thread.
        console = ConsoleLog(os.dup(proc.stdout.fileno()), name=f"qemu-console-{proc.pid}")
        stderr = ConsoleLog(os.dup(proc.stderr.fileno()), limit=1024 * 1024, name=f"qemu-stderr-{proc.pid}")
        proc.stdout.close()
        proc.stderr.close()
        console.start()
        stderr.start()
        return _Running(proc=proc, pidfd=pidfd, console=console, stderr=stderr, started=started)

    def wait_ready(self, timeout: float | None = None) -> None:
        """Waits for guest/qemu_init's ready marker, at most ``timeout`` s (default: config.boot_timeout).

        Guarantees on return: the shell reads commands, the console is quiet
        (kernel messages go to dmesg only), and :attr:`boot_seconds` and
        :attr:`balloon_state` are set. Raises GuestBootError with the console and
        QEMU's stderr if QEMU exits first or ``timeout`` seconds pass.
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
            raise GuestBootError(f"guest {why}", self._diagnosis(run))
        self._boot_seconds = time.monotonic() - run.started
        self._ready_at = match.end()
        state = BALLOON_LINE.search(run.console.text(0))
        self._balloon_state = state.group(1) if state else None

    @staticmethod
    def _diagnosis(run: _Running) -> str:
        text = run.console.text(tail=4000)
        err = run.stderr.text(tail=2000)
        return f"{text}\n--- QEMU stderr (tail) ---\n{err}" if err else text

    def stop(self, timeout: float = 10.0) -> int | None:
        """Powers the guest off, or kills QEMU, and cleans up. Idempotent.

        Escalates within ``timeout`` seconds: ``poweroff -f`` on the console (if
        the guest got ready), then SIGTERM to QEMU (a clean exit, unless its main
        loop is stuck, e.g. waiting on a mute vhost-user back-end), then SIGKILL to
        its whole process group.

        Guarantees on return: QEMU is reaped and no process of its group is alive
        (raises GuestError if one is after ``timeout``), and the pipes are closed.
        Returns QEMU's exit status (negative: killed by that signal), or None if it
        was never started.
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
                    # ~0.1 s under TCG; a guest stuck in a command never reads it.
                    exited = self._exited(run, min(_share(deadline, 0.5), GRACEFUL_POWEROFF_S))
                except GuestError:  # console stuck or closed: escalate
                    pass
            if not exited:
                with contextlib.suppress(ProcessLookupError):  # defensive: reaped only below
                    os.kill(run.proc.pid, signal.SIGTERM)
                exited = self._exited(run, min(_share(deadline, 0.5), SIGTERM_GRACE_S))
            # Until the leader is reaped its pid still names the group, so the
            # number cannot have been recycled: safe to signal stragglers now.
            with contextlib.suppress(ProcessLookupError):  # the group is already empty
                os.killpg(run.proc.pid, signal.SIGKILL)
            try:
                status = run.proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired as exc:
                raise GuestError(f"QEMU (pid {run.proc.pid}) survived SIGKILL for {timeout} s") from exc
            self._wait_group_gone(run, deadline)
        finally:
            self._release(run)
        return status

    def _release(self, run: _Running) -> None:
        if run.proc.stdin is not None:
            with contextlib.suppress(BrokenPipeError):  # the guest is gone; nothing to flush
                run.proc.stdin.close()
        # Every writer of the pipes is dead, so the readers are at EOF.
        run.console.join(2.0)
        run.stderr.join(2.0)
        self._final_console = run.console.text(tail=64 * 1024)
        self._final_stderr = run.stderr.text(tail=64 * 1024)
        os.close(run.pidfd)
        self._run = None
        self._ready_at = None

    # -- state -------------------------------------------------------------------

    def qemu_log(self, tail: int = 64 * 1024) -> str:
        """The last ``tail`` bytes of QEMU's own stderr, including after stop()."""
        if self._run is None:
            return self._final_stderr[-tail:]
        return self._run.stderr.text(tail=tail)

    def ram_files(self) -> list[OpenFile]:
        """QEMU's guest RAM memfd(s), one per open fd, largest first.

        Each :attr:`OpenFile.path` (/proc/PID/fd/N) can be opened to get a new fd
        on the same memory. Raises GuestError if QEMU has exited.
        """
        run = self._require_started()
        fd_dir = f"/proc/{run.proc.pid}/fd"
        found = []
        try:
            names = os.listdir(fd_dir)
        except OSError as exc:
            raise GuestError(f"cannot read QEMU's open files: {exc}") from exc
        for name in names:
            path = f"{fd_dir}/{name}"
            try:
                target = os.readlink(path)
                if target != MEMFD_TARGET:
                    continue
                st = os.stat(path)
            except FileNotFoundError:  # closed since listdir
                continue
            found.append(OpenFile(path=path, target=target, size=st.st_size, allocated=st.st_blocks * 512))
        found.sort(key=lambda f: f.size, reverse=True)
        return found

    def _ram_file(self) -> OpenFile:
        files = self.ram_files()
        if not files:
            raise GuestError(f"QEMU (pid {self.pid}) holds no {MEMFD_TARGET!r} fd")
        return files[0]

    def host_ram_bytes(self) -> int:
        """Host memory behind the guest RAM now: st_blocks * 512 of QEMU's memfd.

        Raises GuestError if QEMU has no such fd open.
        """
        return self._ram_file().allocated

    def ram_file_size(self) -> int:
        """The size of QEMU's guest RAM memfd: the guest's memory size, in bytes."""
        return self._ram_file().size

    # -- helpers -----------------------------------------------------------------



# ---------------------------------------------------------------------------
# python -m guest.qemu: boot once and report


def _report() -> None:
    """Boots a guest without devices and prints the facts tests rely on."""
    config = QemuConfig()
    with QemuGuest(config) as guest:
        t0 = time.monotonic()
        guest.run("true")
        round_trip = time.monotonic() - t0
        info = guest.meminfo()
        before = guest.host_ram_bytes()
        t1 = time.monotonic()
        guest.fill_memory(256)
        fill = time.monotonic() - t1
        after = guest.host_ram_bytes()
        guest.free_memory()
        assert guest.image is not None
        print(f"versions:        {guest.image.versions.get('qemu_version')}, "
              f"kernel {guest.image.versions.get('kernel_release')}")
        print(f"uname:           {guest.run('uname -r').strip()}")
        print(f"boot to ready:   {guest.boot_seconds:.3f} s")
        print(f"command rtt:     {round_trip * 1000:.1f} ms")
        print(f"balloon:         {guest.balloon_state}")
        print(f"MemTotal:        {info['MemTotal']} kB at -m {config.mem_mib}M")
        print(f"MemFree:         {info['MemFree']} kB")
        print(f"host memfd:      {guest.ram_file_size() >> 20} MiB, "
              f"{before >> 20} MiB -> {after >> 20} MiB after fill_memory(256) ({fill:.2f} s)")
        t2 = time.monotonic()
    print(f"stop:            {time.monotonic() - t2:.3f} s")


if __name__ == "__main__":
    _report()
