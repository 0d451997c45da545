"""Errors raised by the guest driver. Everything it raises on purpose is a GuestError."""

from __future__ import annotations


class GuestError(Exception):
    """Base class: something about the test guest went wrong."""


class GuestNotPrepared(GuestError):
    """The guest image is missing or stale: run ``bash guest/prepare.sh .cache/guest``."""


class GuestBootError(GuestError):
    """UML could not be started, exited during boot, or did not reach the ready marker in time.

    ``console`` holds the tail of the console log for diagnosis.
    """

    def __init__(self, message: str, console: str = "") -> None:
        super().__init__(f"{message}\n--- guest console (tail) ---\n{console}" if console else message)
        self.console = console


class GuestCommandError(GuestError):
    """A shell command in the guest failed, timed out, or the guest died while it ran.

    ``returncode`` is the command's exit status, or None when it never finished
    (timeout or guest exit); ``output`` is what it printed (stdout and stderr), as
    far as it got.
    """

    def __init__(self, command: str, returncode: int | None, output: str, reason: str) -> None:
        super().__init__(f"guest command {command!r}: {reason}\n--- output ---\n{output[-2000:]}")
        self.command = command
        self.returncode = returncode
        self.output = output


class ConsoleOverrun(GuestError):
    """The console bytes a reader asked for were dropped to keep the log bounded."""
