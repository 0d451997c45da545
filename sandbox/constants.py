"""Symbolic constants a policy file may use in argument expressions (x86_64 Linux).

The table is written out rather than taken from the `os`/`mmap`/`socket` modules
so that what a policy means does not depend on which names the running Python
happens to export, and so that a reviewer can check each value against the
kernel's uapi headers in one place. Values are those of x86_64; the policy
compiler refuses to run on another architecture (see `policy.check_architecture`).

Errno names for `return ERRNO` come from the `errno` module, which is generated
from the C library of this very machine.
"""

from __future__ import annotations

import errno
import re
from types import MappingProxyType
from typing import Mapping

_PROT = {
    "PROT_NONE": 0x0,
    "PROT_READ": 0x1,
    "PROT_WRITE": 0x2,
    "PROT_EXEC": 0x4,
    "PROT_SEM": 0x8,
    "PROT_GROWSDOWN": 0x01000000,
    "PROT_GROWSUP": 0x02000000,
}

_MAP = {
    "MAP_SHARED": 0x01,
    "MAP_PRIVATE": 0x02,
    "MAP_SHARED_VALIDATE": 0x03,
    "MAP_FIXED": 0x10,
    "MAP_ANONYMOUS": 0x20,
    "MAP_ANON": 0x20,
    "MAP_32BIT": 0x40,
    "MAP_GROWSDOWN": 0x0100,
    "MAP_DENYWRITE": 0x0800,
    "MAP_EXECUTABLE": 0x1000,
    "MAP_LOCKED": 0x2000,
    "MAP_NORESERVE": 0x4000,
    "MAP_POPULATE": 0x8000,
    "MAP_NONBLOCK": 0x10000,
    "MAP_STACK": 0x20000,
    "MAP_HUGETLB": 0x40000,
    "MAP_SYNC": 0x80000,
    "MAP_FIXED_NOREPLACE": 0x100000,
    "MREMAP_MAYMOVE": 0x1,
    "MREMAP_FIXED": 0x2,
    "MREMAP_DONTUNMAP": 0x4,
    "MS_ASYNC": 0x1,
    "MS_INVALIDATE": 0x2,
    "MS_SYNC": 0x4,
}

_MADV = {
    "MADV_NORMAL": 0,
    "MADV_RANDOM": 1,
    "MADV_SEQUENTIAL": 2,
    "MADV_WILLNEED": 3,
    "MADV_DONTNEED": 4,
    "MADV_FREE": 8,
    "MADV_REMOVE": 9,
    "MADV_DONTFORK": 10,
    "MADV_DOFORK": 11,
    "MADV_MERGEABLE": 12,
    "MADV_UNMERGEABLE": 13,
    "MADV_HUGEPAGE": 14,
    "MADV_NOHUGEPAGE": 15,
    "MADV_DONTDUMP": 16,
    "MADV_DODUMP": 17,
    "MADV_WIPEONFORK": 18,
    "MADV_KEEPONFORK": 19,
    "MADV_COLD": 20,
    "MADV_PAGEOUT": 21,
    "MADV_POPULATE_READ": 22,
    "MADV_POPULATE_WRITE": 23,
    "MADV_DONTNEED_LOCKED": 24,
    "MADV_COLLAPSE": 25,
    "MADV_HWPOISON": 100,
}

_FALLOC = {
    "FALLOC_FL_KEEP_SIZE": 0x01,
    "FALLOC_FL_PUNCH_HOLE": 0x02,
    "FALLOC_FL_NO_HIDE_STALE": 0x04,
    "FALLOC_FL_COLLAPSE_RANGE": 0x08,
    "FALLOC_FL_ZERO_RANGE": 0x10,
    "FALLOC_FL_INSERT_RANGE": 0x20,
    "FALLOC_FL_UNSHARE_RANGE": 0x40,
}

_OPEN = {
    "O_RDONLY": 0o0,
    "O_WRONLY": 0o1,
    "O_RDWR": 0o2,
    "O_ACCMODE": 0o3,
    "O_CREAT": 0o100,
    "O_EXCL": 0o200,
    "O_NOCTTY": 0o400,
    "O_TRUNC": 0o1000,
    "O_APPEND": 0o2000,
    "O_NONBLOCK": 0o4000,
    "O_DSYNC": 0o10000,
    "O_ASYNC": 0o20000,
    "O_DIRECT": 0o40000,
    "O_LARGEFILE": 0o100000,
    "O_DIRECTORY": 0o200000,
    "O_NOFOLLOW": 0o400000,
    "O_NOATIME": 0o1000000,
    "O_CLOEXEC": 0o2000000,
    "O_SYNC": 0o4010000,
    "O_PATH": 0o10000000,
    "O_TMPFILE": 0o20200000,
}

_FCNTL = {
    "AT_SYMLINK_NOFOLLOW": 0x100,
    "AT_REMOVEDIR": 0x200,
    "AT_SYMLINK_FOLLOW": 0x400,
    "AT_NO_AUTOMOUNT": 0x800,
    "AT_EMPTY_PATH": 0x1000,
    "F_DUPFD": 0,
    "F_GETFD": 1,
    "F_SETFD": 2,
    "F_GETFL": 3,
    "F_SETFL": 4,
    "F_GETLK": 5,
    "F_SETLK": 6,
    "F_SETLKW": 7,
    "F_DUPFD_CLOEXEC": 1030,
    "F_ADD_SEALS": 1033,
    "F_GET_SEALS": 1034,
    "FD_CLOEXEC": 1,
}

_FD_FLAGS = {
    "EFD_SEMAPHORE": 0o1,
    "EFD_NONBLOCK": 0o4000,
    "EFD_CLOEXEC": 0o2000000,
    "MFD_CLOEXEC": 0x1,
    "MFD_ALLOW_SEALING": 0x2,
    "MFD_HUGETLB": 0x4,
    "MFD_NOEXEC_SEAL": 0x8,
    "MFD_EXEC": 0x10,
    "EPOLL_CLOEXEC": 0o2000000,
    "EPOLL_CTL_ADD": 1,
    "EPOLL_CTL_DEL": 2,
    "EPOLL_CTL_MOD": 3,
}

_SOCKET = {
    "AF_UNSPEC": 0,
    "AF_UNIX": 1,
    "AF_LOCAL": 1,
    "AF_INET": 2,
    "AF_INET6": 10,
    "AF_NETLINK": 16,
    "AF_PACKET": 17,
    "AF_VSOCK": 40,
    "SOCK_STREAM": 1,
    "SOCK_DGRAM": 2,
    "SOCK_RAW": 3,
    "SOCK_SEQPACKET": 5,
    "SOCK_NONBLOCK": 0o4000,
    "SOCK_CLOEXEC": 0o2000000,
    "MSG_OOB": 0x1,
    "MSG_PEEK": 0x2,
    "MSG_DONTROUTE": 0x4,
    "MSG_CTRUNC": 0x8,
    "MSG_TRUNC": 0x20,
    "MSG_DONTWAIT": 0x40,
    "MSG_EOR": 0x80,
    "MSG_WAITALL": 0x100,
    "MSG_NOSIGNAL": 0x4000,
    "MSG_CMSG_CLOEXEC": 0x40000000,
    "SHUT_RD": 0,
    "SHUT_WR": 1,
    "SHUT_RDWR": 2,
}

_FUTEX = {
    "FUTEX_WAIT": 0,
    "FUTEX_WAKE": 1,
    "FUTEX_FD": 2,
    "FUTEX_REQUEUE": 3,
    "FUTEX_CMP_REQUEUE": 4,
    "FUTEX_WAKE_OP": 5,
    "FUTEX_LOCK_PI": 6,
    "FUTEX_UNLOCK_PI": 7,
    "FUTEX_TRYLOCK_PI": 8,
    "FUTEX_WAIT_BITSET": 9,
    "FUTEX_WAKE_BITSET": 10,
    "FUTEX_WAIT_REQUEUE_PI": 11,
    "FUTEX_CMP_REQUEUE_PI": 12,
    "FUTEX_LOCK_PI2": 13,
    "FUTEX_PRIVATE_FLAG": 128,
    "FUTEX_CLOCK_REALTIME": 256,
    "FUTEX_WAIT_PRIVATE": 128,
    "FUTEX_WAKE_PRIVATE": 129,
    "FUTEX_WAIT_BITSET_PRIVATE": 137,
    "FUTEX_WAKE_BITSET_PRIVATE": 138,
}

_SIGNALS = {
    "SIG_BLOCK": 0,
    "SIG_UNBLOCK": 1,
    "SIG_SETMASK": 2,
    "SIGHUP": 1,
    "SIGINT": 2,
    "SIGQUIT": 3,
    "SIGILL": 4,
    "SIGTRAP": 5,
    "SIGABRT": 6,
    "SIGBUS": 7,
    "SIGFPE": 8,
    "SIGKILL": 9,
    "SIGUSR1": 10,
    "SIGSEGV": 11,
    "SIGUSR2": 12,
    "SIGPIPE": 13,
    "SIGALRM": 14,
    "SIGTERM": 15,
    "SIGCHLD": 17,
    "SIGCONT": 18,
    "SIGSTOP": 19,
    "SIGSYS": 31,
}

_CLOCK = {
    "CLOCK_REALTIME": 0,
    "CLOCK_MONOTONIC": 1,
    "CLOCK_PROCESS_CPUTIME_ID": 2,
    "CLOCK_THREAD_CPUTIME_ID": 3,
    "CLOCK_MONOTONIC_RAW": 4,
    "CLOCK_REALTIME_COARSE": 5,
    "CLOCK_MONOTONIC_COARSE": 6,
    "CLOCK_BOOTTIME": 7,
    "GRND_NONBLOCK": 0x1,
    "GRND_RANDOM": 0x2,
    "GRND_INSECURE": 0x4,
}

_CLONE = {
    "CLONE_VM": 0x00000100,
    "CLONE_FS": 0x00000200,
    "CLONE_FILES": 0x00000400,
    "CLONE_SIGHAND": 0x00000800,
    "CLONE_PIDFD": 0x00001000,
    "CLONE_PTRACE": 0x00002000,
    "CLONE_VFORK": 0x00004000,
    "CLONE_PARENT": 0x00008000,
    "CLONE_THREAD": 0x00010000,
    "CLONE_NEWNS": 0x00020000,
    "CLONE_SYSVSEM": 0x00040000,
    "CLONE_SETTLS": 0x00080000,
    "CLONE_PARENT_SETTID": 0x00100000,
    "CLONE_CHILD_CLEARTID": 0x00200000,
    "CLONE_DETACHED": 0x00400000,
    "CLONE_UNTRACED": 0x00800000,
    "CLONE_CHILD_SETTID": 0x01000000,
    "CLONE_NEWCGROUP": 0x02000000,
    "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWIPC": 0x08000000,
    "CLONE_NEWUSER": 0x10000000,
    "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000,
    "CLONE_IO": 0x80000000,
}

_IOCTL = {
    "TCGETS": 0x5401,
    "TCSETS": 0x5402,
    "TIOCGWINSZ": 0x5413,
    "FIONREAD": 0x541B,
    "FIONBIO": 0x5421,
    "FIONCLEX": 0x5450,
    "FIOCLEX": 0x5451,
}

_PRCTL = {
    "PR_SET_PDEATHSIG": 1,
    "PR_GET_PDEATHSIG": 2,
    "PR_GET_DUMPABLE": 3,
    "PR_SET_DUMPABLE": 4,
    "PR_SET_NAME": 15,
    "PR_GET_NAME": 16,
    "PR_GET_SECCOMP": 21,
    "PR_SET_NO_NEW_PRIVS": 38,
    "PR_GET_NO_NEW_PRIVS": 39,
    "PR_SET_VMA": 0x53564D41,
}

CONSTANTS: Mapping[str, int] = MappingProxyType(
    {
        **_PROT,
        **_MAP,
        **_MADV,
        **_FALLOC,
        **_OPEN,
        **_FCNTL,
        **_FD_FLAGS,
        **_SOCKET,
        **_FUTEX,
        **_SIGNALS,
        **_CLOCK,
        **_CLONE,
        **_IOCTL,
        **_PRCTL,
    }
)
"""Name -> value for argument expressions (`arg2 in PROT_READ|PROT_WRITE`)."""

ERRNOS: Mapping[str, int] = MappingProxyType(
    {name: getattr(errno, name) for name in dir(errno) if re.fullmatch(r"E[A-Z0-9]+", name)}
)
"""Errno name -> number for `return ERRNO`, e.g. `return EPERM`."""

MAX_ERRNO = 4095
"""The kernel reports errors as -1..-4095; SECCOMP_RET_ERRNO carries 16 bits but
values above this are not errors to the C library."""
