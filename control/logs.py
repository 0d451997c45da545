"""Log lines that name their VM: one ``serve`` holds many, and an operator reading "worker
4242 ended" must know whose it was."""

from __future__ import annotations

import logging
from typing import Any


class VmLog(logging.LoggerAdapter):
    """``logger``'s lines prefixed ``vm NAME: `` (nothing for an unnamed VM)."""

    def __init__(self, logger: logging.Logger, name: str = "") -> None:
        super().__init__(logger, {"vm": name})
        self.prefix = f"vm {name}: " if name else ""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return (f"{self.prefix}{msg}" if self.prefix else msg), kwargs
