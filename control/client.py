"""A client for the control socket (what the CLI uses; other Python tools may too)."""

from __future__ import annotations

import socket
import time
from typing import Any

from control.errors import ControlError, RequestError
from control.wire import FrameDecoder, encode_frame


class ServerUnavailable(ControlError):
    """Nothing is listening on the control socket."""


class ControlClient:
    """One connection to ``vballoon serve --control PATH``.

    ``request`` raises ``ServerUnavailable`` if the server is gone, ``RequestError`` if it
    refused the request (with its message), ``TimeoutError`` past ``timeout``.
    """

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self.sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            self.sock.close()
            raise ServerUnavailable(f"no vballoon server is listening on {path}") from exc
        except PermissionError as exc:
            self.sock.close()
            raise ServerUnavailable(f"no permission to use {path}") from exc
        self.timeout = timeout
        self.decoder = FrameDecoder()
        self._next_id = 1

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "ControlClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, cmd: str, /, **args: Any) -> dict[str, Any]:
        """Send ``{"cmd": cmd, **args}`` and return the reply's fields (without id and ok).

        The answer may take ``self.timeout`` seconds, plus a ``wait`` request's own timeout.
        """
        ident = self._next_id
        self._next_id += 1
        self.sock.sendall(encode_frame({"id": ident, "cmd": cmd, **args}))
        budget = args.get("timeout", 0) if cmd == "wait" else 0
        deadline = time.monotonic() + self.timeout + (budget if type(budget) in (int, float) else 0)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no answer to {cmd!r} in time")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except socket.timeout as exc:
                raise TimeoutError(f"no answer to {cmd!r} in time") from exc
            if not data:
                raise ServerUnavailable("the server closed the connection")
            for reply in self.decoder.feed(data):
                if reply.get("id") not in (ident, None):
                    continue
                if not reply.get("ok"):
                    raise RequestError(str(reply.get("error", "refused")))
                reply.pop("ok", None)
                reply.pop("id", None)
                return reply
