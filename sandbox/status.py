"""How a jailed child ended, in numbers and in words."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

EXIT_CALLABLE_RAISED = 70
"""The callable raised (EX_SOFTWARE). No traceback is printed: formatting one
reads source files, which the jail forbids."""
EXIT_SETUP_FAILED = 71
"""A set-up step failed; the parent got a JailSetupError with the details."""
EXIT_PARENT_GONE = 72
"""The process that forked it died during set-up, so it stopped."""


@dataclass(frozen=True)
class ExitStatus:
    """Exactly one of `code` (normal exit) and `signal` (killed) is set."""

    code: int | None = None
    signal: int | None = None

    def __post_init__(self) -> None:
        if (self.code is None) == (self.signal is None):
            raise ValueError("ExitStatus needs exactly one of code and signal")

    @classmethod
    def from_wait_status(cls, status: int) -> ExitStatus:
        """From a waitpid() status of a process that has ended."""
        if os.WIFSIGNALED(status):
            return cls(signal=os.WTERMSIG(status))
        if os.WIFEXITED(status):
            return cls(code=os.WEXITSTATUS(status))
        raise ValueError(f"wait status {status:#x} is not an ending")

    @property
    def killed_by_seccomp(self) -> bool:
        """SIGSYS: what SECCOMP_RET_KILL_PROCESS ends a process with."""
        return self.signal == signal.SIGSYS

    def describe(self) -> str:
        """"exited with code N", "killed by signal SIGTERM" or
        "killed by seccomp (SIGSYS)"."""
        if self.code is not None:
            return f"exited with code {self.code}"
        if self.killed_by_seccomp:
            return "killed by seccomp (SIGSYS)"
        assert self.signal is not None
        try:
            name = signal.Signals(self.signal).name
        except ValueError:
            name = str(self.signal)
        return f"killed by signal {name}"

    def __str__(self) -> str:
        return self.describe()
