"""The guest's console shell, shared by the User-Mode Linux and the QEMU test guests.

Both guests run ``guest/init`` (``guest/qemu_init`` for QEMU, the same protocol): after the
ready marker the console is a shell with no echo, no prompt and no CR/LF translation. A
command is framed by two markers carrying a random token (``_command_line``), so its output
and exit status are found in the console log whatever else the guest prints.

``ConsoleShell`` needs from its subclass: ``start``, ``wait_ready`` and ``stop``; ``_run``
(the running guest: ``console``, a ``ConsoleLog``; ``proc``; ``pidfd``; ``stdin_fd``) or
``_final_console`` once stopped; ``_fills``, ``_image``, ``_ready_at``, ``_boot_seconds``
and ``_balloon_state``; ``WHO`` names the process in errors.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import select
import shlex
import time

from types import TracebackType

from guest.errors import GuestCommandError, GuestError
from guest.procfs import group_members

FILL_PREFIX = "/tmp/vballoon-fill"
# The console is a tty in canonical mode: a line longer than its 4095-byte buffer would be
# cut, so commands are refused well before that.
MAX_COMMAND_LINE = 3500


class ConsoleShell:
    """Commands, memory filling and console output of a booted guest, and the parts of its
    process's lifecycle both guests share (see the module)."""

    WHO = "the guest"

    def __enter__(self):
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- the process -----------------------------------------------------------------

    @staticmethod
    def _exited(run, timeout: float) -> bool:
        """Waits up to ``timeout`` s for the guest's process to exit, without reaping it."""
        poller = select.poll()
        poller.register(run.pidfd, select.POLLIN)
        return bool(poller.poll(max(timeout, 0.0) * 1000))

    def _wait_group_gone(self, run, deadline: float) -> None:
        # A helper SIGKILLed with the guest is re-parented to init and exits a moment
        # later; a pidfd per straggler turns that exit into an event to wait on.
        while True:
            left = group_members(run.proc.pid)
            if not left:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise GuestError(f"{self.WHO} processes {left} still alive after stop()")
            _wait_any_exit(left, remaining)

    @property
    def pid(self) -> int | None:
        """The guest's main process id while started, else None."""
        return self._run.proc.pid if self._run is not None else None

    @property
    def running(self) -> bool:
        """True between start() and stop() while the guest's process has not exited."""
        return self._run is not None and self._run.proc.poll() is None

    @property
    def boot_seconds(self) -> float | None:
        """Seconds from exec to the ready marker, once ready."""
        return self._boot_seconds

    @property
    def balloon_state(self) -> str | None:
        """What init reported for virtio_balloon: "loaded", "builtin", "absent" or "insmod-failed rc=N"."""
        return self._balloon_state

    @property
    def image(self):
        """The image booted (set by start())."""
        return self._image

    def _require_started(self):
        if self._run is None:
            raise GuestError("guest not started")
        return self._run

    def _require_ready(self):
        run = self._require_started()
        if self._ready_at is None:
            raise GuestError("guest not ready: call wait_ready() first")
        return run

    def console_log(self, tail: int = 64 * 1024) -> str:
        """The last ``tail`` bytes of the console, including after stop()."""
        if self._run is None:
            return self._final_console[-tail:]
        return self._run.console.text(tail=tail)

    # -- commands ----------------------------------------------------------------

    def run(self, command: str, timeout: float = 10.0, check: bool = True) -> str:
        """Runs ``command`` in the guest shell and returns its output (stdout+stderr).

        The command runs in a subshell (``exit``, ``cd`` and variables do not
        carry over to the next command) with /dev/null as stdin. With ``check``,
        a non-zero exit status raises GuestCommandError; see also :meth:`run_status`. A
        timeout or a guest that exits raises GuestCommandError (returncode None);
        after a timeout the command is interrupted with ^C, and later commands
        still work because each one is matched by its own random marker.
        Raises ValueError for a command the console cannot carry.
        """
        status, output = self.run_status(command, timeout)
        if check and status != 0:
            raise GuestCommandError(command, status, output, f"exit status {status}")
        return output

    def run_status(self, command: str, timeout: float = 10.0) -> tuple[int, str]:
        """Like :meth:`run` but returns ``(exit status, output)`` instead of raising on failure."""
        run = self._require_ready()
        token = secrets.token_hex(8)
        line = _command_line(command, token)
        start = run.console.end
        deadline = time.monotonic() + timeout
        self._send(run, line, deadline)
        # The markers are printed by printf from parts, so an echoed command line
        # could never match them.
        tok = token.encode()
        done = re.compile(rb"vb-begin-" + tok + rb"\r?\n(.*?)\r?\nvb-end-" + tok + rb" (\d+)\r?\n", re.DOTALL)
        match = run.console.wait_for(done, start, deadline)
        if match is None:
            partial = run.console.text(start)
            if run.console.eof or run.proc.poll() is not None:
                raise GuestCommandError(command, None, partial, "guest exited")
            self._interrupt(run)
            raise GuestCommandError(command, None, partial, f"timed out after {timeout:.1f} s")
        output = match.group(1).decode("utf-8", errors="replace").replace("\r\n", "\n")
        return int(match.group(2)), output

    def _interrupt(self, run) -> None:
        # ^C reaches the foreground job because init gave the shell a controlling tty.
        # Best effort: the caller is already reporting a timeout.
        with contextlib.suppress(GuestError):
            self._send(run, b"\x03", time.monotonic() + 1.0)

    def _send(self, run, data: bytes, deadline: float) -> None:
        """Writes all of ``data`` to the console before ``deadline`` or raises GuestError."""
        os.set_blocking(run.stdin_fd, False)
        view = memoryview(data)
        poller = select.poll()
        poller.register(run.stdin_fd, select.POLLOUT)
        while view:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise GuestError("guest console not accepting input (is the guest hung?)")
            if not poller.poll(remaining * 1000):
                continue
            try:
                written = os.write(run.stdin_fd, view)
            except BlockingIOError:
                continue
            except BrokenPipeError as exc:
                raise GuestError(f"guest console closed ({self.WHO} has exited)") from exc
            view = view[written:]

    # -- memory --------------------------------------------------------------------

    def meminfo(self) -> dict[str, int]:
        """/proc/meminfo of the guest: values in kB (counts such as HugePages_Total as-is)."""
        info = {}
        for line in self.run("cat /proc/meminfo").splitlines():
            key, sep, rest = line.partition(":")
            fields = rest.split()
            if sep and fields and fields[0].isdigit():
                info[key.strip()] = int(fields[0])
        if "MemTotal" not in info:
            raise GuestError("guest /proc/meminfo has no MemTotal")
        return info

    def fill_memory(self, mib: int, timeout: float | None = None) -> None:
        """Makes the guest allocate and keep ``mib`` MiB: a file of zeros on its tmpfs /tmp.

        tmpfs pages are ordinary guest RAM that stays in use until
        :meth:`free_memory`, so the host memory behind the guest grows by about ``mib`` MiB (less
        for pages the guest had dirtied before). Raises GuestCommandError if the
        guest runs out of space (/tmp may hold 90% of guest RAM) or memory.
        """
        if mib <= 0:
            raise ValueError("mib must be positive")
        self._fills += 1
        path = f"{FILL_PREFIX}.{self._fills}"
        # Measured ~450 MiB/s (UML), ~100 MiB/s (QEMU, TCG); allowing 20 MiB/s plus 10 s
        # covers a slow CI machine.
        limit = timeout if timeout is not None else 10.0 + mib / 20
        self.run(f"dd if=/dev/zero of={path} bs=1M count={mib}", timeout=limit)

    def free_memory(self) -> None:
        """Removes everything :meth:`fill_memory` wrote; the guest sees that memory free again.

        The host memory does not shrink by itself: freed guest pages stay
        allocated on the host until a balloon (or free page reporting) gives them back.
        """
        self.run(f"rm -f {FILL_PREFIX}.*")


def _command_line(command: str, token: str) -> bytes:
    """The console input that runs ``command`` between two markers carrying ``token``.

    Raises ValueError for commands the tty would mangle: control characters
    (^C, ^D... are signals and line editing to the tty) or lines that are too long.
    """
    bad = [c for c in command if (ord(c) < 32 and c not in "\t\n") or ord(c) == 127]
    if bad:
        raise ValueError(f"control characters in guest command: {bad!r}")
    # A subshell: a syntax error (which aborts the rest of an interactive line),
    # "exit" or "cd" in the command cannot affect the end marker or the next command.
    line = (
        f"printf '%s-%s\\n' vb-begin {token}; "
        f"( eval {shlex.quote(command)} ) </dev/null 2>&1; "
        f"printf '\\n%s-%s %d\\n' vb-end {token} \"$?\"\n"
    )
    data = line.encode()
    if max(len(part) for part in data.split(b"\n")) > MAX_COMMAND_LINE:
        raise ValueError(f"guest command line longer than {MAX_COMMAND_LINE} bytes")
    return data


def _wait_any_exit(pids: list[int], timeout: float) -> None:
    """Returns when one of ``pids`` has exited (or is already gone), or after ``timeout`` s."""
    fds = []
    try:
        for pid in pids:
            try:
                fds.append(os.pidfd_open(pid))
            except ProcessLookupError:  # gone between the scan and now
                return
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        poller.poll(timeout * 1000)
    finally:
        for fd in fds:
            os.close(fd)


def _share(deadline: float, fraction: float) -> float:
    """Seconds to wait: ``fraction`` of the time left before ``deadline``."""
    return max(deadline - time.monotonic(), 0.0) * fraction
