"""The control package's exceptions, split by who is at fault (see ``device.errors``)."""

from __future__ import annotations


class ControlError(Exception):
    """Base of all errors raised on purpose by ``control/``."""


class RequestError(ControlError):
    """An operator or VMM request that is invalid: it was refused and changed nothing."""


class WorkerError(ControlError):
    """The jailed worker failed: it refused a request, did not answer in time, or died."""
