"""Seccomp policies written in minijail's policy-file syntax, compiled with pyseccomp.

A policy is a text file of one rule per line::

    # comment
    read: 1                                    # always allowed
    ioctl: return ENOTTY                       # always fails with ENOTTY
    mmap: arg2 in ~PROT_EXEC                   # allowed unless PROT_EXEC is set
    madvise: arg2 == MADV_REMOVE || arg2 == MADV_DONTNEED
    fallocate: arg1 == FALLOC_FL_PUNCH_HOLE|FALLOC_FL_KEEP_SIZE
    fcntl: arg1 == F_GETFL; return EPERM       # allowed when true, else EPERM
    @include common.policy

Expressions are a disjunction (``||``) of conjunctions (``&&``) of atoms
``argN OP VALUE`` with N in 0..5 and OP one of:

    ``== != < <= > >=``   unsigned 64-bit comparison
    ``&``                 at least one of the bits of VALUE is set
    ``& MASK == VALUE``   the bits of MASK equal VALUE (not in minijail; handy for
                          "this bit is clear": ``arg2 & PROT_EXEC == 0``)
    ``in``                every set bit is one of VALUE's (the argument is a subset)

VALUE is ``|``-joined terms, each a number (decimal, 0x hex, 0-prefixed octal) or a
name from `sandbox.constants.CONSTANTS`, optionally negated with ``~`` (64-bit).
A syscall the policy does not name, or a call that matches no condition (and has no
``; return``), gets the filter's default action: KILL_PROCESS, or NOTIFY in log mode.

Differences from minijail, all rejected loudly rather than compiled differently:
- libseccomp cannot compare one argument twice in one rule, so ``arg0 >= 1 &&
  arg0 <= 5`` is an error. ``; return ERRNO`` after an expression is compiled by
  negating the expression; a negation that would need such a rule is an error too.
- ``@include`` paths that are relative resolve against the including file's
  directory (minijail: the working directory); includes may nest up to 8 deep.
- Each syscall may have one rule in the whole policy, includes counted, so an
  included file can never silently widen or replace a rule.
- Attributes after the expression and ``@frequency`` are not supported.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, NoReturn, Sequence, Union, cast

import pyseccomp

from sandbox.bpf import first_disagreement
from sandbox.bpf import run as run_bpf
from sandbox.constants import CONSTANTS, ERRNOS, MAX_ERRNO
from sandbox.errors import JailError, PolicyError
from sandbox.isolate import IsolatedError, run_isolated

MASK64 = (1 << 64) - 1
MAX_ARG = 5
MAX_FILE_BYTES = 1 << 20
"""Policy files are small; the cap keeps a wrong @include (a log file) cheap to reject."""
MAX_INCLUDE_DEPTH = 8
COMPILE_TIMEOUT = 10.0
"""Seconds libseccomp may take for one policy (2.5 needs ~1 s per 2000 rules)."""
MAX_RULES_PER_SYSCALL = 64
"""Bound on the libseccomp rules one line may expand to (``&`` with many bits, negation)."""

# ---------------------------------------------------------------------------
# Atoms: the meaning of one ``argN OP VALUE``.
# ---------------------------------------------------------------------------

_COMPARE_OPS = {
    "==": (pyseccomp.EQ, "!="),
    "!=": (pyseccomp.NE, "=="),
    "<": (pyseccomp.LT, ">="),
    "<=": (pyseccomp.LE, ">"),
    ">": (pyseccomp.GT, "<="),
    ">=": (pyseccomp.GE, "<"),
}

SeccompCmp = tuple[int, int, int, int]
"""One libseccomp comparison: (argument index, op, datum_a, datum_b)."""

Lowered = tuple[tuple[SeccompCmp, ...], ...]
"""A disjunction of conjunctions of libseccomp comparisons: one rule per conjunction.
``((),)`` is always true, ``()`` never."""

TRUE: Lowered = ((),)
FALSE: Lowered = ()


@dataclass(frozen=True)
class Compare:
    """``argN OP value`` for OP in == != < <= > >= (unsigned, 64-bit)."""

    arg: int
    op: str
    value: int

    def holds(self, args: Sequence[int]) -> bool:
        a = args[self.arg]
        return {
            "==": a == self.value,
            "!=": a != self.value,
            "<": a < self.value,
            "<=": a <= self.value,
            ">": a > self.value,
            ">=": a >= self.value,
        }[self.op]

    def negated(self) -> tuple[Atom, ...]:
        return (Compare(self.arg, _COMPARE_OPS[self.op][1], self.value),)

    def lowered(self) -> Lowered:
        return (((self.arg, _COMPARE_OPS[self.op][0], self.value, 0),),)


@dataclass(frozen=True)
class AnyBits:
    """``argN & mask``: at least one bit of `mask` is set."""

    arg: int
    mask: int

    def holds(self, args: Sequence[int]) -> bool:
        return args[self.arg] & self.mask != 0

    def negated(self) -> tuple[Atom, ...]:
        return (Masked(self.arg, self.mask, 0),)

    def lowered(self) -> Lowered:
        # libseccomp has no "any bit" test: one MASKED_EQ rule per bit, ORed.
        return tuple(((self.arg, pyseccomp.MASKED_EQ, bit, bit),) for bit in _bits(self.mask))


@dataclass(frozen=True)
class Masked:
    """``(argN & mask) == value``; ``argN in allowed`` is ``Masked(N, ~allowed, 0)``."""

    arg: int
    mask: int
    value: int

    def holds(self, args: Sequence[int]) -> bool:
        return args[self.arg] & self.mask == self.value

    def negated(self) -> tuple[Atom, ...]:
        # Some bit of the mask differs from the wanted value.
        return tuple(Masked(self.arg, bit, ~self.value & bit) for bit in _bits(self.mask))

    def lowered(self) -> Lowered:
        if self.mask == 0:
            return TRUE
        return (((self.arg, pyseccomp.MASKED_EQ, self.mask, self.value),),)


Atom = Union[Compare, AnyBits, Masked]
Expr = tuple[tuple[Atom, ...], ...]
"""A condition in disjunctive normal form over atoms; ``((),)`` is always true."""


def _bits(mask: int) -> Iterator[int]:
    while mask:
        low = mask & -mask
        yield low
        mask ^= low


def expr_holds(expr: Expr, args: Sequence[int]) -> bool:
    """The reference meaning of an expression, used to test the compiled filter."""
    return any(all(atom.holds(args) for atom in conj) for conj in expr)


# ---------------------------------------------------------------------------
# Rules and policies.
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """What the policy says about one syscall.

    The call is allowed when `allow` holds; otherwise it fails with `errno`, or
    gets the filter's default action when `errno` is None. ``name: 1`` is
    ``allow=((),)``; ``name: return EPERM`` is ``allow=()`` with errno EPERM.
    """

    syscall: str
    number: int
    allow: Expr
    errno: int | None
    file: str
    line: int

    def decide(self, args: Sequence[int]) -> str | int:
        """"allow", an errno, or "default" for a call with these arguments."""
        if expr_holds(self.allow, args):
            return "allow"
        return "default" if self.errno is None else self.errno


@dataclass(frozen=True)
class Policy:
    """A parsed policy: at most one `Rule` per syscall, in file order.

    Build one with `Policy.from_file` or `Policy.from_text` (both raise
    `PolicyError` with file and line for anything they cannot parse), then
    `compile` it.
    """

    rules: tuple[Rule, ...]
    source: str = "<policy>"

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Policy:
        """Parse the policy file at `path`. Raises PolicyError."""
        parser = _Parser()
        parser.parse_file(Path(path), depth=0, origin=(str(path), 0))
        return cls(tuple(parser.rules), str(path))

    @classmethod
    def from_text(
        cls, text: str, name: str = "<policy>", base_dir: str | os.PathLike[str] | None = None
    ) -> Policy:
        """Parse policy text; relative @include paths resolve against `base_dir`
        (default: the working directory). Raises PolicyError."""
        parser = _Parser()
        parser.parse_text(text, name, Path(base_dir) if base_dir is not None else Path.cwd(), 0)
        return cls(tuple(parser.rules), name)

    @property
    def syscalls(self) -> frozenset[str]:
        return frozenset(rule.syscall for rule in self.rules)

    def rule_for(self, syscall: str) -> Rule | None:
        return next((rule for rule in self.rules if rule.syscall == syscall), None)

    def decide(self, syscall: str, args: Sequence[int] = (0,) * 6) -> str | int:
        """The reference decision for one call: "allow", an errno or "default"."""
        rule = self.rule_for(syscall)
        return "default" if rule is None else rule.decide(args)

    def with_allowed(self, syscall: str, expr: Expr, origin: str = "<jail>") -> Policy:
        """This policy, with calls of `syscall` matching `expr` allowed as well.

        Used by the jail to let the worker finish its hand-shake; an existing rule
        for the syscall keeps its errno for everything else.
        """
        number = resolve_syscall(syscall, origin, 0)
        rules = list(self.rules)
        for index, rule in enumerate(rules):
            if rule.syscall == syscall:
                rules[index] = dataclasses.replace(rule, allow=rule.allow + expr)
                break
        else:
            rules.append(Rule(syscall, number, expr, None, origin, 0))
        return Policy(tuple(rules), self.source)

    def compile(self, default_action: int) -> pyseccomp.SyscallFilter:
        """A pyseccomp filter for this policy with `default_action` for everything
        else (pyseccomp.KILL_PROCESS, or NOTIFY for log mode). A call from another
        architecture (i386, x32) kills the process. Raises PolicyError when
        libseccomp rejects a rule, JailError on a machine that is not x86_64.

        Runs libseccomp in this process, where some rule sets make version 2.5
        loop forever; `to_bpf` is the safe entry point.
        """
        check_architecture()
        filt = pyseccomp.SyscallFilter(default_action)
        filt.set_attr(pyseccomp.Attr.ACT_BADARCH, pyseccomp.KILL_PROCESS)
        for rule in self.rules:
            _add_rule(filt, rule)
        return filt

    def _compile_and_verify(self, default_action: int) -> bytes:
        program = export_bpf(self.compile(default_action))
        verify_bpf(self, program, default_action)
        return program

    def to_bpf(self, default_action: int, timeout: float = COMPILE_TIMEOUT) -> bytes:
        """The compiled filter as the kernel's `struct sock_filter` array.

        libseccomp runs in a forked helper with a deadline (2.5.4 loops forever
        on some rule combinations), and its output is run on representative calls
        of every rule and compared with the policy's meaning (2.5.4 miscompiles
        some rule sets; see `verify_bpf`). Raises PolicyError for a bad rule, a
        rule libseccomp got wrong, or when the deadline passes.
        """
        check_architecture()
        try:
            return run_isolated(
                functools.partial(self._compile_and_verify, default_action),
                timeout,
                expected=(PolicyError,),
                describe=_policy_error_fields,
            )
        except TimeoutError:
            raise PolicyError(self.source, 0, f"libseccomp did not compile this policy within {timeout} s") from None
        except IsolatedError as exc:
            if exc.kind == "expected":
                file, line, message = exc.fields
                raise PolicyError(str(file), cast(int, line), str(message)) from None
            raise JailError(f"the policy compiler crashed: {exc.fields[0]}") from None


def _policy_error_fields(exc: Exception) -> list[object]:
    assert isinstance(exc, PolicyError)
    return [exc.file, exc.line, exc.message]


def check_architecture() -> None:
    """Raise JailError unless this is x86_64, the only ABI the constants describe."""
    if pyseccomp.system_arch() != pyseccomp.Arch.X86_64:
        raise JailError("sandbox policies are only defined for x86_64")


def export_bpf(filt: pyseccomp.SyscallFilter) -> bytes:
    """Export a pyseccomp filter as raw BPF (8 bytes per instruction)."""
    # A memfd, not a pipe: a large filter would fill a pipe before we read it.
    fd = os.memfd_create("seccomp-bpf", os.MFD_CLOEXEC)
    try:
        with os.fdopen(os.dup(fd), "wb") as sink:
            filt.export_bpf(sink)
        size = os.fstat(fd).st_size
        return os.pread(fd, size, 0)
    finally:
        os.close(fd)


def resolve_syscall(name: str, file: str, line: int) -> int:
    """The x86_64 number of `name`. Raises PolicyError for an unknown name."""
    number = pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name)
    # libseccomp answers -1 for unknown names and a negative pseudo-number for
    # syscalls that exist only on other architectures (socketcall, mmap2).
    if number < 0:
        raise PolicyError(file, line, f"unknown syscall {name!r} on this architecture")
    return number


# ---------------------------------------------------------------------------
# Lowering to libseccomp rules.
# ---------------------------------------------------------------------------


def _and(left: Lowered, right: Lowered, rule: Rule) -> Lowered:
    if len(left) * len(right) > MAX_RULES_PER_SYSCALL:
        raise PolicyError(rule.file, rule.line, f"expression expands to more than {MAX_RULES_PER_SYSCALL} rules")
    return tuple(a + b for a in left for b in right)


def lower(expr: Expr, rule: Rule) -> Lowered:
    """Libseccomp comparisons equivalent to `expr`. Raises PolicyError when one
    rule would compare the same argument twice or the expansion is too large."""
    result: list[tuple[SeccompCmp, ...]] = []
    for conj in expr:
        lowered = TRUE
        for atom in conj:
            lowered = _and(lowered, atom.lowered(), rule)
        result.extend(lowered)
        if len(result) > MAX_RULES_PER_SYSCALL:
            raise PolicyError(rule.file, rule.line, f"expression expands to more than {MAX_RULES_PER_SYSCALL} rules")
    return _normalise(result, rule)


def _normalise(conjunctions: Iterable[tuple[SeccompCmp, ...]], rule: Rule) -> Lowered:
    out: list[tuple[SeccompCmp, ...]] = []
    for conj in conjunctions:
        unique = tuple(sorted(set(conj)))
        if not unique:
            return TRUE  # one conjunction is always true: so is the whole
        args = [cmp[0] for cmp in unique]
        if len(set(args)) != len(args):
            raise PolicyError(
                rule.file,
                rule.line,
                f"{rule.syscall}: an && group (after expansion) compares one argument twice, "
                "which libseccomp cannot express; split the condition differently",
            )
        if unique not in out:
            out.append(unique)
    return tuple(out)


def negate(expr: Expr, rule: Rule) -> Expr:
    """not (C1 or C2 ...) == (not C1) and (not C2) ..., back into DNF, bounded."""
    result: Expr = ((),)
    for conj in expr:
        alternatives = tuple(neg for atom in conj for neg in atom.negated())
        if len(result) * len(alternatives) > MAX_RULES_PER_SYSCALL:
            raise PolicyError(rule.file, rule.line, "'; return' needs too many rules for this expression")
        result = tuple(done + (alt,) for done in result for alt in alternatives)
    return result


def _lowered_rule(rule: Rule) -> tuple[Lowered, Lowered]:
    """(conjunctions to allow, conjunctions to fail with rule.errno); each
    conjunction becomes one libseccomp rule."""
    allow = lower(rule.allow, rule)
    if allow == TRUE or rule.errno is None:
        return allow, FALSE
    # libseccomp lets an unconditional rule override conditional ones for the same
    # syscall, so "else return E" must be spelled out as the negated condition.
    return allow, lower(negate(rule.allow, rule), rule)


_EXACT_OPS = (pyseccomp.EQ, pyseccomp.MASKED_EQ)


def _check_libseccomp_can(rule: Rule, allow: Lowered) -> None:
    """Refuse the shapes libseccomp 2.5.4 compiles wrongly.

    Measured (tests/test_policy.py runs the BPF): one && group, with or without
    '; return', is right; so is any number of || branches using only ==, & and
    in. Several branches that use <, <=, >, >= or != are merged wrongly (calls
    allowed by one branch get killed) or make libseccomp loop forever.
    """
    ordered = any(op not in _EXACT_OPS for conj in allow for _, op, _, _ in conj)
    if ordered and len(allow) > 1:
        raise PolicyError(
            rule.file,
            rule.line,
            f"{rule.syscall}: libseccomp 2.5 miscompiles several || branches (or a multi-bit '&') "
            "combined with <, <=, >, >= or !=; use ==, & and in, or a single && group",
        )


def _add_rule(filt: pyseccomp.SyscallFilter, rule: Rule) -> None:
    allow, deny = _lowered_rule(rule)
    if allow == TRUE:
        _add(filt, rule, pyseccomp.ALLOW, ())
        return
    _check_libseccomp_can(rule, allow)
    for conj in allow:
        _add(filt, rule, pyseccomp.ALLOW, conj)
    if rule.errno is not None:
        for conj in deny:
            _add(filt, rule, pyseccomp.ERRNO(rule.errno), conj)


def verify_bpf(policy: Policy, program: bytes, default_action: int) -> None:
    """Run `program` on representative calls of every rule (and on a syscall the
    policy does not name) and raise PolicyError at the first rule whose decision
    differs from what the policy text means."""
    for rule in policy.rules:
        allow, deny = _lowered_rule(rule)
        comparisons = [cmp for conj in allow + deny for cmp in conj]
        expected = functools.partial(_expected_return, rule, default_action)
        wrong = first_disagreement(program, rule.number, comparisons, expected)
        if wrong is not None:
            raise PolicyError(
                rule.file, rule.line, f"libseccomp compiled the rule for {rule.syscall} wrongly (for arguments "
                f"{', '.join(hex(a) for a in wrong)}); simplify the expression"
            )
    named = {rule.number for rule in policy.rules}
    unnamed = next(nr for nr in range(512) if nr not in named)
    if run_bpf(program, unnamed, (0,) * 6) != default_action:
        raise PolicyError(policy.source, 0, "libseccomp did not apply the default action")


def _expected_return(rule: Rule, default_action: int, args: tuple[int, ...]) -> int:
    decision = rule.decide(args)
    if decision == "allow":
        return pyseccomp.ALLOW
    if decision == "default":
        return default_action
    return pyseccomp.ERRNO(int(decision))


def _add(filt: pyseccomp.SyscallFilter, rule: Rule, action: int, conj: tuple[SeccompCmp, ...]) -> None:
    args = [pyseccomp.Arg(arg, op, a, b) for arg, op, a, b in conj]
    try:
        filt.add_rule_exactly(action, rule.number, *args)
    except OSError as exc:
        raise PolicyError(rule.file, rule.line, f"libseccomp rejected the rule for {rule.syscall}: {exc}") from exc


# ---------------------------------------------------------------------------
# Parsing.
# ---------------------------------------------------------------------------

_TOKEN = re.compile(
    r"\s*(?:(?P<op>\|\||&&|==|!=|<=|>=|<|>|&|\||~)"
    r"|(?P<num>0[xX][0-9a-fA-F]+|[0-9]+)"
    r"|(?P<name>[A-Za-z_][A-Za-z0-9_]*))",
    re.ASCII,
)
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*", re.ASCII)
_ARG = re.compile(r"arg([0-9]+)", re.ASCII)
_DECIMAL = re.compile(r"[0-9]+", re.ASCII)


class _Tokens:
    """A cursor over the tokens of one expression; errors carry file and line."""

    def __init__(self, text: str, file: str, line: int) -> None:
        self.file, self.line = file, line
        self.items: list[tuple[str, str]] = []
        pos = 0
        text = text.rstrip()
        while pos < len(text):
            match = _TOKEN.match(text, pos)
            if match is None or match.end() == pos:
                self.fail(f"unexpected text {text[pos:].strip()[:20]!r}")
            kind = match.lastgroup
            assert kind is not None
            self.items.append((kind, match.group(kind)))
            pos = match.end()
        self.index = 0

    def fail(self, message: str) -> NoReturn:
        raise PolicyError(self.file, self.line, message)

    def peek(self) -> str | None:
        return self.items[self.index][1] if self.index < len(self.items) else None

    def take(self) -> tuple[str, str]:
        if self.index >= len(self.items):
            self.fail("expression ends too early")
        item = self.items[self.index]
        self.index += 1
        return item

    def done(self) -> bool:
        return self.index >= len(self.items)


def _parse_number(text: str, tokens: _Tokens) -> int:
    if text[:2] in ("0x", "0X"):
        value = int(text, 16)
    elif len(text) > 1 and text[0] == "0":
        if not set(text) <= set("01234567"):
            tokens.fail(f"bad octal number {text!r}")
        value = int(text, 8)
    else:
        value = int(text, 10)
    if value > MASK64:
        tokens.fail(f"number {text} does not fit in 64 bits")
    return value


def _parse_value(tokens: _Tokens) -> int:
    """term ('|' term)*, term = '~'* (number | CONSTANT)."""
    value = _parse_term(tokens)
    while tokens.peek() == "|":
        tokens.take()
        value |= _parse_term(tokens)
    return value


def _parse_term(tokens: _Tokens) -> int:
    invert = False
    while tokens.peek() == "~":
        tokens.take()
        invert = not invert
    kind, text = tokens.take()
    if kind == "num":
        value = _parse_number(text, tokens)
    elif kind == "name" and text in CONSTANTS:
        value = CONSTANTS[text]
    elif kind == "name":
        tokens.fail(f"unknown constant {text!r}")
    else:
        tokens.fail(f"expected a number or a constant, found {text!r}")
    return value ^ MASK64 if invert else value


def _parse_atom(tokens: _Tokens) -> Atom:
    kind, text = tokens.take()
    match = _ARG.fullmatch(text) if kind == "name" else None
    if match is None:
        tokens.fail(f"expected arg0..arg{MAX_ARG}, found {text!r}")
    arg = int(match.group(1))
    if arg > MAX_ARG:
        tokens.fail(f"syscalls have arguments arg0..arg{MAX_ARG}, not {text}")
    _, op = tokens.take()
    if op in _COMPARE_OPS:
        return Compare(arg, op, _parse_value(tokens))
    if op == "in":
        return Masked(arg, _parse_value(tokens) ^ MASK64, 0)
    if op == "&":
        mask = _parse_value(tokens)
        if tokens.peek() != "==":
            return AnyBits(arg, mask)
        tokens.take()
        value = _parse_value(tokens)
        if value & ~mask:
            tokens.fail(f"'{text} & {mask:#x} == {value:#x}' can never be true")
        return Masked(arg, mask, value)
    tokens.fail(f"expected a comparison operator after {text}, found {op!r}")


def parse_expression(text: str, file: str = "<expr>", line: int = 0) -> Expr:
    """Parse ``conj ('||' conj)*``, ``conj = atom ('&&' atom)*``. Raises PolicyError."""
    tokens = _Tokens(text, file, line)
    if tokens.done():
        tokens.fail("empty expression")
    disjunction: list[tuple[Atom, ...]] = []
    conjunction: list[Atom] = [_parse_atom(tokens)]
    while not tokens.done():
        _, joiner = tokens.take()
        if joiner == "||":
            disjunction.append(tuple(conjunction))
            conjunction = []
        elif joiner != "&&":
            tokens.fail(f"expected '||' or '&&', found {joiner!r}")
        conjunction.append(_parse_atom(tokens))
    disjunction.append(tuple(conjunction))
    return tuple(disjunction)


def _parse_errno(text: str, file: str, line: int) -> int:
    text = text.strip()
    if text in ERRNOS:
        return ERRNOS[text]
    if _DECIMAL.fullmatch(text) and 1 <= int(text) <= MAX_ERRNO:
        return int(text)
    raise PolicyError(file, line, f"'return' needs an errno name or 1..{MAX_ERRNO}, found {text!r}")


def _parse_body(body: str, file: str, line: int) -> tuple[Expr, int | None]:
    body = body.strip()
    if body == "1":
        return ((),), None
    if body.split(maxsplit=1)[:1] == ["return"]:
        return (), _parse_errno(body[len("return") :], file, line)
    expr_text, semicolon, tail = body.partition(";")
    errno_value = None
    if semicolon:
        words = tail.split(maxsplit=1)
        if len(words) != 2 or words[0] != "return":
            raise PolicyError(file, line, "after ';' only 'return ERRNO' may follow")
        errno_value = _parse_errno(words[1], file, line)
    return parse_expression(expr_text, file, line), errno_value


def _logical_lines(text: str) -> Iterator[tuple[int, str]]:
    """(first line number, text) with comments removed and '\\' continuations joined."""
    pending: list[str] = []
    first = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        content = raw.split("#", 1)[0].rstrip()
        if not pending:
            first = number
        if content.endswith("\\"):
            pending.append(content[:-1])
            continue
        pending.append(content)
        yield first, " ".join(pending).strip()
        pending = []
    if pending:
        yield first, " ".join(pending).strip()


class _Parser:
    """Collects rules from a file and its includes, checking one rule per syscall."""

    def __init__(self) -> None:
        self.rules: list[Rule] = []
        self.seen: dict[str, Rule] = {}
        self.stack: list[Path] = []

    def parse_file(self, path: Path, depth: int, origin: tuple[str, int]) -> None:
        text = _read_policy_file(path, origin)
        real = path.resolve()
        if real in self.stack:
            raise PolicyError(origin[0], origin[1], f"@include cycle through {path}")
        self.stack.append(real)
        try:
            self.parse_text(text, str(path), path.parent, depth)
        finally:
            self.stack.pop()

    def parse_text(self, text: str, file: str, base: Path, depth: int) -> None:
        for line, content in _logical_lines(text):
            if not content:
                continue
            if content.startswith("@"):
                self._directive(content, file, line, base, depth)
            else:
                self._rule(content, file, line)

    def _directive(self, content: str, file: str, line: int, base: Path, depth: int) -> None:
        name, _, argument = content.partition(" ")
        if name != "@include":
            raise PolicyError(file, line, f"unknown directive {name!r}")
        argument = argument.strip()
        if not argument:
            raise PolicyError(file, line, "@include needs a path")
        if depth + 1 > MAX_INCLUDE_DEPTH:
            raise PolicyError(file, line, f"@include nested more than {MAX_INCLUDE_DEPTH} deep")
        self.parse_file(base / argument, depth + 1, (file, line))

    def _rule(self, content: str, file: str, line: int) -> None:
        head, colon, body = content.partition(":")
        if not colon:
            raise PolicyError(file, line, "expected 'syscall: expression'")
        head = head.strip()
        if _DECIMAL.fullmatch(head):
            name = _syscall_name(int(head), file, line)
        elif _IDENT.fullmatch(head):
            name = head
        else:
            raise PolicyError(file, line, f"bad syscall name {head!r}")
        number = resolve_syscall(name, file, line)
        if name in self.seen:
            earlier = self.seen[name]
            raise PolicyError(file, line, f"{name} already has a rule at {earlier.file}:{earlier.line}")
        allow, errno_value = _parse_body(body, file, line)
        rule = Rule(name, number, allow, errno_value, file, line)
        self.seen[name] = rule
        self.rules.append(rule)


def _syscall_name(number: int, file: str, line: int) -> str:
    try:
        return pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, number).decode()
    except ValueError:
        raise PolicyError(file, line, f"unknown syscall number {number}") from None


def _read_policy_file(path: Path, origin: tuple[str, int]) -> str:
    """The text of a regular file of at most MAX_FILE_BYTES, or PolicyError."""
    try:
        # O_NONBLOCK: opening a FIFO by mistake must not block the caller.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise PolicyError(origin[0], origin[1], f"cannot open policy {str(path)!r}: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise PolicyError(origin[0], origin[1], f"policy {str(path)!r} is not a regular file")
        data = _read_at_most(fd, MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise PolicyError(origin[0], origin[1], f"cannot read policy {str(path)!r}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_FILE_BYTES:
        raise PolicyError(str(path), 0, f"policy file larger than {MAX_FILE_BYTES} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyError(str(path), 0, f"policy file is not UTF-8: {exc.reason}") from None


def _read_at_most(fd: int, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = os.read(fd, min(65536, limit - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)
