"""Host-side views of a UML guest through /proc: its process group and its RAM file."""

from __future__ import annotations

import os
from dataclasses import dataclass

DELETED_SUFFIX = " (deleted)"


@dataclass(frozen=True)
class OpenFile:
    """A file a process holds open: ``path`` (/proc/PID/fd/N) opens it again."""

    path: str
    target: str  # what readlink shows, e.g. "/dev/shm/vballoon-x/#1234 (deleted)"
    size: int  # st_size: for guest RAM, the guest's memory size
    allocated: int  # st_blocks * 512: host memory (tmpfs) or disk really in use


def group_members(pgid: int, include_zombies: bool = False) -> list[int]:
    """PIDs whose process group is ``pgid``, read from /proc.

    Zombies are left out unless ``include_zombies``: a zombie runs nothing, and
    one re-parented to init is init's to reap (some container inits only do so
    about once a second). Processes that vanish during the scan are skipped.
    """
    members = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read(4096)
        except OSError:  # exited since listdir
            continue
        # comm may contain spaces and parentheses: fields resume after the last ')'.
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) < 3 or int(fields[2]) != pgid:
            continue
        if fields[0] == b"Z" and not include_zombies:
            continue
        members.append(int(name))
    return sorted(members)


def deleted_files_under(pid: int, directory: str) -> list[OpenFile]:
    """Unlinked files inside ``directory`` that process ``pid`` holds open, largest first.

    UML's guest RAM is such a file (an O_TMPFILE in $TMPDIR). Raises OSError
    (ProcessLookupError/FileNotFoundError) if the process is gone.
    """
    prefix = os.path.join(os.path.realpath(directory), "")
    found = []
    fd_dir = f"/proc/{pid}/fd"
    for name in os.listdir(fd_dir):
        path = f"{fd_dir}/{name}"
        try:
            target = os.readlink(path)
            if not (target.startswith(prefix) and target.endswith(DELETED_SUFFIX)):
                continue
            st = os.stat(path)
        except FileNotFoundError:  # closed since listdir
            continue
        found.append(OpenFile(path=path, target=target, size=st.st_size, allocated=st.st_blocks * 512))
    found.sort(key=lambda f: f.size, reverse=True)
    return found
