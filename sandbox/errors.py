"""The errors `sandbox` raises: one base class, split by who is at fault.

- `PolicyError`: the policy text is wrong (the author of the policy file).
- `JailSetupError`: a step of jailing the child failed (the host: kernel, limits,
  a keep fd that is not open, a filter the kernel refuses).
- `WaitTimeout`: the child did not end within the caller's deadline.

Misuse of the API itself (a negative fd, two keep fds mapped to one number) raises
`ValueError` when the configuration is built, before anything is forked.
"""

from __future__ import annotations

import os


class JailError(Exception):
    """Base class of every error raised by `sandbox`."""


class PolicyError(JailError):
    """A policy file could not be parsed or compiled.

    `file` and `line` locate the offending line (line is 1-based, 0 when the error
    concerns the file as a whole, e.g. it cannot be read).
    """

    def __init__(self, file: str, line: int, message: str) -> None:
        self.file = file
        self.line = line
        self.message = message
        super().__init__(f"{file}:{line}: {message}")


class JailSetupError(JailError):
    """A set-up step failed before the callable ran; the child is gone.

    `step` names the step ("fds", "namespaces", "seccomp", ...), `errno` is the
    kernel's error number (0 when the failure was not a failed system call) and
    `detail` says what was being done.
    """

    def __init__(self, step: str, errno: int, detail: str = "") -> None:
        self.step = step
        self.errno = errno
        self.detail = detail
        reason = os.strerror(errno) if errno else "error"
        text = f"jail set-up failed at step '{step}': [errno {errno}] {reason}"
        super().__init__(f"{text}: {detail}" if detail else text)


class WaitTimeout(JailError, TimeoutError):
    """The jailed child was still running when the wait deadline passed."""
