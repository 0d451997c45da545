"""Run any callable in a jailed child process (knows nothing about balloons).

Public API::

    from sandbox import JailConfig, Limits, Policy, spawn
    child = spawn(target, JailConfig(keep_fds=[...], seccomp=Policy.from_file(path)))
    status = child.wait(timeout=5.0); print(status.describe())

See `sandbox.jail` for what the jail guarantees and `sandbox.policy` for the
policy-file syntax.
"""

from sandbox.errors import JailError, JailSetupError, PolicyError, WaitTimeout
from sandbox.jail import JailConfig, JailedChild, Limits, spawn
from sandbox.policy import Policy
from sandbox.status import EXIT_CALLABLE_RAISED, EXIT_PARENT_GONE, EXIT_SETUP_FAILED, ExitStatus

__all__ = [
    "EXIT_CALLABLE_RAISED",
    "EXIT_PARENT_GONE",
    "EXIT_SETUP_FAILED",
    "ExitStatus",
    "JailConfig",
    "JailError",
    "JailSetupError",
    "JailedChild",
    "Limits",
    "Policy",
    "PolicyError",
    "WaitTimeout",
    "spawn",
]
