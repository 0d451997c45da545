"""The ``vballoon`` command line: ``serve``, ``set``, ``adjust``, ``status``, ``stats``,
``reset``, ``list``, ``add``, ``remove``. Requests name their VM with ``--vm NAME``
(optional while the server holds exactly one).

Exit status: 0 success, 1 an error (refused request, no server, timeout, stalled guest),
2 bad usage (argparse's own convention).
"""

from __future__ import annotations

import argparse
import re
import sys
import time

from control.client import ControlClient
from control.errors import ControlError, RequestError

DEFAULT_CONTROL = "/run/vballoon.sock"
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``512M``, ``1G``, ``1GiB``, ``1.5g``, ``0`` or plain bytes -> bytes (binary units).

    Raises ``ValueError`` with a readable message for anything else, negatives included.
    """
    match = _SIZE.match(text)
    if not match or len(text) > 64 or \
            (match.group(3) and not match.group(2) and match.group(3).lower() == "ib"):
        raise ValueError(f"bad size {text[:40]!r}: use bytes or a number with K, M, G or T "
                         f"(binary: 1G = 1GiB = 1073741824 bytes)")
    number, unit = match.group(1), match.group(2).lower()
    whole, _, fraction = number.partition(".")
    # Exact arithmetic (no float): 1.5G is exactly 1610612736 bytes.
    size = (int(whole) * 10 ** len(fraction) + int(fraction or 0)) * _UNITS[unit] \
        // 10 ** len(fraction)
    if size >= 2 ** 63:
        raise ValueError(f"size {text[:40]!r} is too large")
    return size


def human(size: int | None) -> str:
    if size is None:
        return "-"
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(size) >= factor:
            return f"{size / factor:.1f} {unit}"
    return f"{size} B"


def _id_range(text: str) -> tuple[int, int]:
    from control.worker_ids import parse_range
    try:
        return parse_range(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vballoon", description="A virtio-balloon device "
                                     "for VMMs (vhost-user), its worker jailed.")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    serve = sub.add_parser("serve", help="run the vhost-user balloon device")
    serve.add_argument("--socket", help="vhost-user socket of the VM named 'default'")
    serve.add_argument("--vm", action="append", default=[], metavar="NAME=SOCKET[,OPTION...]",
                       help="serve a VM on its own vhost-user socket (repeatable); options: "
                            "deflate-on-oom, free-page-reporting, no-page-poison, no-stats, "
                            "stats-interval=S (others as on this command line)")
    serve.add_argument("--control", default=DEFAULT_CONTROL, help="control socket path")
    serve.add_argument("--deflate-on-oom", action="store_true",
                       help="let the guest take pages back under memory pressure")
    serve.add_argument("--free-page-reporting", action="store_true",
                       help="release pages the guest reports free")
    serve.add_argument("--no-page-poison", action="store_true",
                       help="with --free-page-reporting, do not offer PAGE_POISON (guests "
                            "booted with init_on_free=1 or page_poison=1 then turn "
                            "reporting off)")
    serve.add_argument("--no-stats", action="store_true", help="do not offer the stats queue")
    serve.add_argument("--stats-interval", type=float, default=0.0, metavar="SECONDS",
                       help="ask the guest for fresh stats this often (0: only on request)")
    serve.add_argument("--seccomp", choices=("kill", "log"), default="kill",
                       help="kill the worker on a denied syscall, or log it (policy writing)")
    serve.add_argument("--worker-ids", type=_id_range, default=None, metavar="FIRST-LAST",
                       help="the uid/gid range each jailed worker gets an id of its own "
                            "from, one no other process uses (as root, default "
                            "2113929216-2113994751, 0x7E000000-0x7E00FFFF; unprivileged, "
                            "narrows your subordinate ids in /etc/subuid and /etc/subgid)")
    serve.add_argument("--no-jail", action="store_true",
                       help="DEBUG ONLY: run the worker unjailed, as a thread")
    serve.add_argument("--host-budget", metavar="SIZE", default=None,
                       help="autopilot: the memory all guests together may hold; past it the "
                            "host counts as short")
    serve.add_argument("--keeper", action="store_true",
                       help="run serve under a small keeper process that holds the guests' "
                            "connections and starts a new serve, which carries on serving "
                            "them, if serve dies")
    serve.add_argument("--log-level", default="info",
                       choices=("debug", "info", "warning", "error"))

    pilot = sub.add_parser("autopilot", help="let the balloon size itself")
    pilot_sub = pilot.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, text in (("enable", "put a VM under autopilot"),
                         ("disable", "take a VM off autopilot"),
                         ("status", "what the autopilot sees and decided")):
        p = pilot_sub.add_parser(action, help=text)
        p.add_argument("--control", default=DEFAULT_CONTROL, help="control socket path")
        if action == "status":
            p.add_argument("name", nargs="?", help="one VM (default: all)")
            p.add_argument("--json", action="store_true", help="machine-readable output")
        else:
            p.add_argument("name", help="the VM")
        if action == "enable":
            p.add_argument("--floor", metavar="SIZE",
                           help="memory the guest always keeps (default: a quarter, >= 64M)")
            p.add_argument("--reserve", metavar="SIZE",
                           help="available memory inflating leaves the guest (default: an "
                                "eighth, >= 32M)")
            p.add_argument("--ceiling", metavar="SIZE", help="the largest balloon")
            p.add_argument("--dry-run", action="store_true",
                           help="decide and log, change nothing")

    for verb, text in (("set", "set the balloon size"), ("adjust", "move the target by pages"),
                       ("status", "show the balloon's state"), ("stats", "show guest stats"),
                       ("reset", "restart a failed device's worker (its rings resume)"),
                       ("list", "list the server's VMs"), ("add", "serve one more VM"),
                       ("remove", "stop serving a VM")):
        p = sub.add_parser(verb, help=text)
        p.add_argument("--control", default=DEFAULT_CONTROL, help="control socket path")
        if verb in ("set", "adjust", "status", "stats", "reset"):
            p.add_argument("--vm", metavar="NAME",
                           help="the VM (needed when the server serves more than one)")
        if verb == "set":
            p.add_argument("size", nargs="+", metavar="SIZE | NAME=SIZE",
                           help="512M, 1G, 1GiB, 0, or bytes; or several NAME=SIZE")
            p.add_argument("--wait", action="store_true", help="wait, with a progress bar")
            p.add_argument("--timeout", type=float, default=60.0, metavar="S")
            p.add_argument("--stall", type=float, default=5.0, metavar="S",
                           help="with --wait: give up when the guest makes no progress this long")
        elif verb == "adjust":
            p.add_argument("pages", type=int, help="pages to add (negative: remove)")
        elif verb == "add":
            p.add_argument("name", help="the VM's name")
            p.add_argument("--socket", required=True, help="its vhost-user socket path")
            p.add_argument("--deflate-on-oom", action="store_true")
            p.add_argument("--free-page-reporting", action="store_true")
            p.add_argument("--no-page-poison", action="store_true")
            p.add_argument("--no-stats", action="store_true")
            p.add_argument("--stats-interval", type=float, default=None, metavar="SECONDS")
        elif verb == "remove":
            p.add_argument("name", help="the VM's name")
        else:
            p.add_argument("--json", action="store_true", help="machine-readable output")
            if verb == "stats":
                p.add_argument("--refresh", action="store_true",
                               help="ask the guest for fresh stats and wait for them")
                p.add_argument("--timeout", type=float, default=2.0, metavar="S",
                               help="with --refresh: how long to wait (default 2)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.verb == "serve":
        return _serve(args)
    try:
        if args.verb == "set":
            args.targets = _targets(args.size, args.vm)   # bad sizes: said before connecting
        if args.verb == "autopilot" and args.action == "enable":
            for key in ("floor", "reserve", "ceiling"):
                value = getattr(args, key)
                setattr(args, key, None if value is None else parse_size(value))
        with ControlClient(args.control) as client:
            return _VERBS[args.verb](client, args)
    except (ControlError, TimeoutError, ValueError) as exc:
        print(f"vballoon {args.verb}: {exc}", file=sys.stderr)
        return 1


def _targets(words: list[str], vm: str | None) -> dict[str | None, int]:
    """``set``'s arguments: one SIZE (for ``--vm`` or the only VM), or NAME=SIZE pairs."""
    if len(words) == 1 and "=" not in words[0]:
        return {vm: parse_size(words[0])}
    if vm is not None:
        raise ValueError("give either --vm NAME with one SIZE, or NAME=SIZE pairs")
    targets: dict[str | None, int] = {}
    for word in words:
        name, sep, size = word.partition("=")
        if not sep or not name:
            raise ValueError(f"bad target {word[:40]!r}: use SIZE alone, or NAME=SIZE for each VM")
        if name in targets:
            raise ValueError(f"VM {name!r} given twice")
        targets[name] = parse_size(size)
    return targets


def _vm(args: argparse.Namespace) -> dict:
    return {"vm": args.vm} if getattr(args, "vm", None) else {}


def _serve(args: argparse.Namespace) -> int:
    import logging

    from control.autopilot import Tuning
    from control.server import ServeOptions, serve
    from control.supervisor import ProxyOptions
    from control.vm import parse_vm
    from device.balloon import BalloonOptions
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.no_jail:
        logging.getLogger("vballoon").warning(
            "--no-jail: the worker runs UNJAILED in this process; for debugging only")
    balloon = BalloonOptions(stats=not args.no_stats, deflate_on_oom=args.deflate_on_oom,
                             free_page_reporting=args.free_page_reporting,
                             page_poison=not args.no_page_poison,
                             stats_interval=args.stats_interval)
    try:
        options = ServeOptions(
            socket_path=args.socket, control_path=args.control, balloon=balloon,
            proxy=ProxyOptions(jail=not args.no_jail, seccomp_mode=args.seccomp,
                               worker_ids=args.worker_ids),
            vms=tuple(parse_vm(text, balloon) for text in args.vm),
            autopilot=Tuning(host_budget=None if args.host_budget is None
                             else parse_size(args.host_budget)))
        if not options.specs():
            logging.getLogger("vballoon").info("no VM yet: add them with `vballoon add`")
        if args.keeper:
            from control.keeper import CONFIG_ERROR, Keeper

            def child(link) -> int:
                try:
                    serve(options, link)
                except (RequestError, ValueError) as exc:
                    print(f"vballoon serve: {exc}", file=sys.stderr)
                    return CONFIG_ERROR
                return 0
            return Keeper(child).run()
        serve(options)
    except (RequestError, ValueError) as exc:
        print(f"vballoon serve: {exc}", file=sys.stderr)
        return 1
    return 0


def _set(client: ControlClient, args: argparse.Namespace) -> int:
    if None in args.targets:
        vm = {"vm": args.vm} if args.vm else {}
        statuses = {args.vm: client.request("set", size=args.targets[None], **vm)}
    else:
        statuses = client.request("set", targets=args.targets)["vms"]
    for name, status in statuses.items():
        print(f"{name + ': ' if name else ''}target {human(status['target_bytes'])}")
        if status.get("autopilot"):
            print(f"{name + ': ' if name else ''}autopilot {status['autopilot']}")
    if not args.wait:
        return 0
    deadline = time.monotonic() + args.timeout
    worst = 0
    for name, status in statuses.items():       # they all move at once: waits overlap
        worst = max(worst, _wait(client, args.timeout, args.stall, scale=status["actual_bytes"],
                                 vm=name, deadline=deadline))
    return worst


def _wait(client: ControlClient, timeout: float, stall: float, scale: int = 0,
          vm: str | None = None, deadline: float | None = None) -> int:
    """Draw actual vs target until settled; 1 on timeout or a stalled guest.

    Asks the server in short ``wait`` slices (so the bar moves) and tracks progress
    across them: the guest has stalled when ``actual`` has not moved for ``stall`` s.
    """
    start = time.monotonic()
    deadline = start + timeout if deadline is None else deadline
    tty = sys.stdout.isatty()
    last_actual, last_move = None, start
    while True:
        now = time.monotonic()
        window = max(0.0, min(0.25, deadline - now))
        reply = client.request("wait", timeout=window, stall=max(stall, 0.1),
                               **({"vm": vm} if vm else {}))
        now = time.monotonic()
        if reply["actual_bytes"] != last_actual:
            last_actual, last_move = reply["actual_bytes"], now
        outcome = reply["outcome"]
        if outcome == "timeout":
            if now - last_move >= stall:
                outcome = "stalled"
            elif now < deadline:
                outcome = None
        scale = max(scale, reply["actual_bytes"], reply["target_bytes"])
        bar = (f"{vm}: " if vm else "") + _bar(reply["actual_bytes"], reply["target_bytes"],
                                               scale, reply.get("guest_memory_bytes"))
        if tty:
            print(f"\r{bar}", end="", flush=True)
        if outcome is None:
            continue
        print() if tty else print(bar)
        if outcome == "settled":
            return 0
        reason = {"stalled": f"the guest made no progress for {stall:g} s",
                  "timeout": f"not settled after {timeout:g} s",
                  "disconnected": "the guest disconnected"}[outcome]
        print(f"vballoon set: {vm + ': ' if vm else ''}{reason} (actual "
              f"{human(reply['actual_bytes'])}, "
              f"target {human(reply['target_bytes'])})", file=sys.stderr)
        return 1


def _bar(actual: int, target: int, scale: int, total: int | None, width: int = 30) -> str:
    """A text bar of ``actual`` out of ``scale`` (the largest size seen while waiting)."""
    done = min(width, round(width * actual / max(scale, 1)))
    return (f"[{'#' * done}{'.' * (width - done)}] balloon {human(actual)} of "
            f"{human(target)} target" + (f" (guest has {human(total)})" if total else ""))


def _adjust(client: ControlClient, args: argparse.Namespace) -> int:
    status = client.request("adjust", pages=args.pages, **_vm(args))
    print(f"target {human(status['target_bytes'])}")
    return 0


def _reset(client: ControlClient, args: argparse.Namespace) -> int:
    status = client.request("reset", **_vm(args))
    print(f"state {status['state']}")
    return 0


def _status(client: ControlClient, args: argparse.Namespace) -> int:
    status = client.request("status", **_vm(args))
    if args.json:
        _print_json(status)
        return 0
    rows = [("state", status["state"]),
            ("target", human(status["target_bytes"])),
            ("actual", human(status["actual_bytes"])),
            ("guest memory", human(status.get("guest_memory_bytes"))),
            ("worker pid", status["worker_pid"] or "-"),
            ("worker restarts", status["worker_restarts"]),
            ("features", ", ".join(status["features"]) or "-")]
    if status.get("last_worker_exit"):
        rows.append(("last worker exit", status["last_worker_exit"]))
    if status.get("poison_val") is not None:
        rows.append(("page poison", f"{status['poison_val']:#x}"))
    rows.extend(("warning", text) for text in status.get("warnings") or [])
    _table(rows)
    return 0


def _stats(client: ControlClient, args: argparse.Namespace) -> int:
    if args.refresh:
        if not 0 <= args.timeout <= 60:
            raise RequestError("--timeout must be 0..60 seconds")
        client.timeout = max(client.timeout, args.timeout + 5)
        stats = client.request("stats", refresh=True, timeout=args.timeout, **_vm(args))
    else:
        stats = client.request("stats", **_vm(args))
    if args.json:
        _print_json(stats)
        return 0
    memory = {"free_memory", "total_memory", "available_memory", "disk_caches"}
    rows = [(name, human(value) if name in memory and value is not None else
             ("-" if value is None else value))
            for name, value in stats.items()
            if name not in ("updated_at", "age_seconds", "refresh_requested")]
    age = stats.get("age_seconds")
    rows.append(("updated", "never" if age is None else f"{age:.1f} s ago"))
    _table(rows)
    return 0


def _print_json(value: object) -> None:
    import json                      # only here: every import costs each CLI start
    print(json.dumps(value, indent=2, sort_keys=True))


def _table(rows: list[tuple[str, object]]) -> None:
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def _list(client: ControlClient, args: argparse.Namespace) -> int:
    vms = client.request("list")["vms"]
    if args.json:
        _print_json(vms)
        return 0
    header = ("NAME", "STATE", "TARGET", "ACTUAL", "MEMORY", "WORKER", "RESTARTS")
    rows = [header] + [(vm["name"], vm["state"], human(vm["target_bytes"]),
                        human(vm["actual_bytes"]), human(vm["guest_memory_bytes"]),
                        str(vm["worker_pid"] or "-"), str(vm["worker_restarts"]))
                       for vm in vms]
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(f"{cell:<{w}}" for cell, w in zip(row, widths)).rstrip())
    return 0


def _add(client: ControlClient, args: argparse.Namespace) -> int:
    options = {key: True for key in ("deflate_on_oom", "free_page_reporting")
               if getattr(args, key)}
    if args.no_page_poison:
        options["page_poison"] = False
    if args.no_stats:
        options["stats"] = False
    if args.stats_interval is not None:
        options["stats_interval"] = args.stats_interval
    vm = client.request("add", name=args.name, socket=args.socket, options=options)
    print(f"{vm['name']}: serving on {vm['socket']}")
    return 0


def _remove(client: ControlClient, args: argparse.Namespace) -> int:
    client.request("remove", name=args.name)
    print(f"{args.name}: removed")
    return 0


def _autopilot(client: ControlClient, args: argparse.Namespace) -> int:
    if args.action == "status":
        reply = client.request("autopilot", action="status", **({"vm": args.name} if args.name else {}))
        if args.json:
            _print_json(reply)
            return 0
        for vm in reply["vms"]:
            state = ("on (dry run)" if vm["dry_run"] else "on") if vm["enabled"] else "off"
            rows = [("vm", vm["name"]), ("autopilot", state),
                    ("target", human(vm["target_bytes"])), ("actual", human(vm["actual_bytes"]))]
            if vm["enabled"]:
                rows += [("floor / reserve", f"{human(vm['floor_bytes'])} / "
                                              f"{human(vm['reserve_bytes'])}"),
                         ("last decision", vm["last_decision"] or "-"),
                         ("pressure", ", ".join(vm["pressure"]) or "none"),
                         ("available", human(vm["signals"].get("available_memory")))]
            _table(rows)
            print()
        return 0
    extra = {}
    if args.action == "enable":
        extra = {key: getattr(args, key) for key in ("floor", "reserve", "ceiling")
                 if getattr(args, key) is not None}
        extra["dry_run"] = args.dry_run
    reply = client.request("autopilot", action=args.action, vm=args.name, **extra)
    print(f"{args.name}: autopilot {'on' if reply['enabled'] else 'off'}"
          + (" (dry run)" if reply.get("dry_run") else ""))
    return 0


_VERBS = {"set": _set, "adjust": _adjust, "status": _status, "stats": _stats, "reset": _reset,
          "list": _list, "add": _add, "remove": _remove, "autopilot": _autopilot}


if __name__ == "__main__":
    sys.exit(main())
