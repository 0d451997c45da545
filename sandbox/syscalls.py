"""Thin ctypes wrappers for the system calls Python 3.11's `os` module lacks.

Every wrapper raises OSError with the kernel's errno on failure. Syscall numbers
are looked up through libseccomp for this architecture instead of being written
down, so a wrong table cannot silently call the wrong syscall.
"""

from __future__ import annotations

import ctypes
import errno
import os

import pyseccomp

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.prctl.restype = ctypes.c_int
_libc.prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
_libc.unshare.argtypes = (ctypes.c_int,)


def _nr(name: str) -> int:
    number = pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name)
    if number < 0:
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS), name)
    return number


NR_PIVOT_ROOT = _nr("pivot_root")
NR_CLOSE_RANGE = _nr("close_range")
NR_SECCOMP = _nr("seccomp")
NR_CAPGET = _nr("capget")
NR_CAPSET = _nr("capset")

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MNT_DETACH = 0x2

PR_GET_SECUREBITS = 27
PR_SET_SECUREBITS = 28
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3

_LINUX_CAPABILITY_VERSION_3 = 0x20080522
UINT_MAX = 0xFFFFFFFF


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), what)
    return result


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def _c_string(text: str | None) -> bytes | None:
    return None if text is None else text.encode()


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    result = _libc.mount(_c_string(source), _c_string(target), _c_string(fstype), flags, _c_string(data))
    _check(result, f"mount {target}")


def umount2(target: str, flags: int) -> None:
    _check(_libc.umount2(target.encode(), flags), f"umount {target}")


def pivot_root(new_root: str, put_old: str) -> None:
    _check(_libc.syscall(ctypes.c_long(NR_PIVOT_ROOT), new_root.encode(), put_old.encode()), "pivot_root")


def close_range(first: int, last: int) -> None:
    """Close fds first..last inclusive (last may be UINT_MAX: "all above").

    Called directly rather than through os.closerange, whose closerange(0, 0)
    becomes close_range(0, UINT_MAX) and closes everything.
    """
    if not 0 <= first <= last <= UINT_MAX:
        raise ValueError(f"bad fd range {first}..{last}")
    _check(
        _libc.syscall(ctypes.c_long(NR_CLOSE_RANGE), ctypes.c_uint(first), ctypes.c_uint(last), ctypes.c_uint(0)),
        "close_range",
    )


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    return _check(_libc.prctl(option, arg2, arg3, arg4, arg5), f"prctl({option})")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def capset_clear() -> None:
    """Clear the effective, permitted and inheritable sets, every capability number
    the kernel has (unlike libcap wrappers, which only know the ones named at build)."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_libc.syscall(ctypes.c_long(NR_CAPSET), ctypes.byref(header), ctypes.byref(data)), "capset")


def capget() -> tuple[int, int, int]:
    """(effective, permitted, inheritable) of this thread as 64-bit masks."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_libc.syscall(ctypes.c_long(NR_CAPGET), ctypes.byref(header), ctypes.byref(data)), "capget")
    low, high = data[0], data[1]  # capabilities 0..31 and 32..63
    return (
        low.effective | high.effective << 32,
        low.permitted | high.permitted << 32,
        low.inheritable | high.inheritable << 32,
    )


class SockFprog(ctypes.Structure):
    """`struct sock_fprog`: the BPF program handed to seccomp()."""

    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class LoadableFilter:
    """A BPF program kept in memory ready to load, built in the parent before fork
    so the child only makes the one seccomp() call."""

    def __init__(self, bpf: bytes) -> None:
        if not bpf or len(bpf) % 8:
            raise ValueError("a BPF program is a non-empty array of 8-byte instructions")
        self.instructions = len(bpf) // 8
        self._buffer = ctypes.create_string_buffer(bpf, len(bpf))
        self._prog = SockFprog(min(self.instructions, 0xFFFF), ctypes.addressof(self._buffer))

    def load(self, flags: int) -> int:
        """seccomp(SECCOMP_SET_MODE_FILTER, flags, prog); the listener fd with
        SECCOMP_FILTER_FLAG_NEW_LISTENER, else 0. Needs no_new_privs first."""
        return _check(
            _libc.syscall(
                ctypes.c_long(NR_SECCOMP),
                ctypes.c_ulong(SECCOMP_SET_MODE_FILTER),
                ctypes.c_ulong(flags),
                ctypes.byref(self._prog),
            ),
            "seccomp",
        )
