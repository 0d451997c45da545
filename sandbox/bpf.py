"""Run seccomp BPF in Python, to check what libseccomp produced.

libseccomp 2.5.4 compiles some rule sets wrongly (a call the rules allow is
killed, or the other way round; shown on the real kernel). So every compiled
policy is run here on representative calls and compared with what the policy
text means before the filter is ever loaded. `run` covers the classic-BPF
subset libseccomp emits.
"""

from __future__ import annotations

import itertools
import random
import struct
from typing import Callable, Iterable, Iterator, Sequence

import pyseccomp

AUDIT_ARCH_X86_64 = 0xC000003E
MASK32 = 0xFFFFFFFF
MASK64 = (1 << 64) - 1
MAX_POINTS = 4096
"""Calls checked per syscall; larger argument spaces are sampled (seeded)."""

_INSN = struct.Struct("=HBBI")
_DATA = struct.Struct("=iIQ6Q")


def run(program: bytes, nr: int, args: Sequence[int], arch: int = AUDIT_ARCH_X86_64) -> int:
    """The seccomp return value of `program` for one call. Raises ValueError for
    an instruction outside the subset, or a program that runs off its end."""
    data = _DATA.pack(nr, arch, 0, *args)
    insns = [_INSN.unpack_from(program, offset) for offset in range(0, len(program), _INSN.size)]
    acc = index = pc = 0
    scratch = [0] * 16
    for _ in range(len(insns)):  # jumps only go forward: each instruction runs at most once
        code, jt, jf, k = insns[pc]
        pc += 1
        if code == 0x06:  # ret #k
            return k
        if code & 0x07 == 0x05:  # jumps
            pc += _jump(code, jt, jf, k, acc, index)
            continue
        acc, index = _step(code, k, acc, index, data, scratch)
    raise ValueError("BPF program ran off its end")


def _jump(code: int, jt: int, jf: int, k: int, acc: int, index: int) -> int:
    if code == 0x05:  # ja
        return k
    operand = index if code & 0x08 else k
    tests = {0x10: acc == operand, 0x20: acc > operand, 0x30: acc >= operand, 0x40: bool(acc & operand)}
    if code & 0xF0 not in tests:
        raise ValueError(f"unsupported BPF jump {code:#x}")
    return jt if tests[code & 0xF0] else jf


def _step(code: int, k: int, acc: int, index: int, data: bytes, scratch: list[int]) -> tuple[int, int]:
    if code == 0x20:  # ld [k]
        acc = struct.unpack_from("=I", data, k)[0]
    elif code == 0x00:  # ld #k
        acc = k
    elif code == 0x60:  # ld M[k]
        acc = scratch[k]
    elif code == 0x61:  # ldx M[k]
        index = scratch[k]
    elif code == 0x02:  # st M[k]
        scratch[k] = acc
    elif code == 0x03:  # stx M[k]
        scratch[k] = index
    elif code == 0x54:  # and #k
        acc &= k
    elif code == 0x07:  # tax
        index = acc
    elif code == 0x87:  # txa
        acc = index
    else:
        raise ValueError(f"unsupported BPF instruction {code:#x}")
    return acc & MASK32, index


# ---------------------------------------------------------------------------
# Representative calls
# ---------------------------------------------------------------------------

Comparison = tuple[int, int, int, int]
"""(argument index, libseccomp op, datum_a, datum_b), as in policy.SeccompCmp."""


def representative_args(comparisons: Iterable[Comparison], seed: int = 0) -> Iterator[tuple[int, ...]]:
    """Argument tuples that exercise every comparison both ways: for each value
    a comparison uses, the value and its neighbours (also across the 32-bit word
    boundary libseccomp splits at), combined with flipping one bit of each class
    of mask bits. All combinations across arguments, sampled above MAX_POINTS."""
    per_arg: dict[int, set[int]] = {}
    masks: dict[int, list[tuple[int, int]]] = {}
    for arg, op, a, b in comparisons:
        values = per_arg.setdefault(arg, {0, MASK64})
        if op == pyseccomp.MASKED_EQ:
            masks.setdefault(arg, []).append((a, b))
            values.update((b, b | (~a & MASK64)))
        else:
            values.update(_neighbours(a))
    columns = []
    for arg in sorted(per_arg):
        flips = _bit_representatives(masks.get(arg, []))
        columns.append(sorted({v ^ flip for v in per_arg[arg] for flip in [0, *flips]}))
    args = sorted(per_arg)
    total = 1
    for column in columns:
        total *= len(column)
    combos: Iterable[tuple[int, ...]]
    if total <= MAX_POINTS:
        combos = itertools.product(*columns)
    else:
        rng = random.Random(seed)
        combos = (tuple(rng.choice(column) for column in columns) for _ in range(MAX_POINTS))
    for combo in combos:
        full = [0] * 6
        for arg, value in zip(args, combo):
            full[arg] = value
        yield tuple(full)


def _neighbours(value: int) -> set[int]:
    high, low = value >> 32, value & MASK32
    candidates = {value - 1, value, value + 1, high << 32, (high << 32) | MASK32, low, (MASK32 << 32) | low}
    candidates |= {((high + d) << 32) | low for d in (-1, 1)}
    return {c for c in candidates if 0 <= c <= MASK64}


def _bit_representatives(masks: list[tuple[int, int]]) -> list[int]:
    """One bit per class of bits that every mask treats alike (same word, same
    membership in each mask and its wanted value): flipping any bit of a class
    changes the same comparisons."""
    classes: dict[tuple[object, ...], int] = {}
    for bit in range(64):
        signature = (bit >= 32, *((bool(m >> bit & 1), bool(v >> bit & 1)) for m, v in masks))
        classes.setdefault(signature, 1 << bit)
    return sorted(classes.values())


def first_disagreement(
    program: bytes, nr: int, comparisons: Iterable[Comparison], expected: Callable[[tuple[int, ...]], int]
) -> tuple[int, ...] | None:
    """The first representative call where `program` does not return
    `expected(args)`, or None when they agree on all of them."""
    for args in representative_args(comparisons):
        if run(program, nr, args) != expected(args):
            return args
    return None
