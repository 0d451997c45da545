"""Mapping a child's user namespace to subordinate ids, as an unprivileged parent.

An unprivileged process may map only its own uid into a user namespace it creates. To run
the jailed child as some *other* host uid — one no other process uses — the parent asks the
setuid helpers ``newuidmap``/``newgidmap`` (Debian package ``uidmap``), which write the
child's maps if the ids are among the caller's subordinate ids (``/etc/subuid``,
``/etc/subgid``). They check that the target process belongs to the caller, so they are run
while the child is still the caller's uid (just after it unshared its user namespace).
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess

from sandbox.errors import JailSetupError

HELPERS = {"uid": "newuidmap", "gid": "newgidmap"}
MAX_DETAIL = 200


def helpers_available() -> bool:
    """Whether both setuid helpers are installed."""
    return all(shutil.which(tool) for tool in HELPERS.values())


def write_maps(pid: int, uid: int, gid: int, timeout: float) -> None:
    """Map root inside the user namespace of ``pid`` to host ``uid``/``gid`` (one id each).

    As root the maps are written directly; otherwise by the helpers. Raises
    ``JailSetupError("user-namespace", ...)`` naming the helper and what it said. Never
    waits longer than ``timeout`` seconds in all.
    """
    if os.geteuid() == 0:
        for kind, host_id in (("uid", uid), ("gid", gid)):
            try:
                fd = os.open(f"/proc/{pid}/{kind}_map", os.O_WRONLY | os.O_CLOEXEC)
                try:
                    os.write(fd, f"0 {host_id} 1".encode())
                finally:
                    os.close(fd)
            except OSError as exc:
                raise JailSetupError("user-namespace", exc.errno or 0, f"writing {kind}_map: {exc.strerror}") from None
        return
    for kind, host_id in (("uid", uid), ("gid", gid)):
        tool = HELPERS[kind]
        path = shutil.which(tool)
        if path is None:
            raise JailSetupError("user-namespace", errno.ENOENT,
                                 f"{tool} is not installed (Debian package uidmap)")
        try:
            done = subprocess.run([path, str(pid), "0", str(host_id), "1"], stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  timeout=max(timeout, 0.001), close_fds=True)
        except subprocess.TimeoutExpired:
            raise JailSetupError("user-namespace", errno.ETIMEDOUT, f"{tool} did not finish in time") from None
        except OSError as exc:
            raise JailSetupError("user-namespace", exc.errno or 0, f"{tool}: {exc.strerror}") from None
        if done.returncode != 0:
            said = done.stderr.decode(errors="replace").strip()[:MAX_DETAIL]
            raise JailSetupError("user-namespace", errno.EPERM,
                                 f"{tool} {pid} 0 {host_id} 1 failed: {said or done.returncode}")
