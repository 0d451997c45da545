"""The device package's exceptions, split by who is at fault.

``DeviceError`` is the base of everything ``device/`` raises on purpose:

- ``GuestError``: the guest driver broke the VIRTIO contract (a bad descriptor, an address
  outside guest memory, a ring index jump). The device skips or stops the affected queue;
  it never lets guest input crash the worker.
- ``HostError``: the host side (VMM, proxy, operator) misused the device: an invalid memory
  table, unknown feature bits, a target beyond guest memory.
"""

from __future__ import annotations


class DeviceError(Exception):
    """Base of all errors raised on purpose by ``device/``."""


class GuestError(DeviceError):
    """The guest broke the VIRTIO contract."""


class AddressOutOfRange(GuestError):
    """A guest-physical range is not wholly inside one guest memory region."""


class MisalignedAddress(GuestError):
    """A ring address does not have the alignment the VIRTIO spec requires."""


class DescriptorIndexOutOfRange(GuestError):
    """A descriptor index is not below the queue (or indirect table) size."""


class DescriptorLoop(GuestError):
    """A descriptor chain is longer than the table it lives in: it must loop."""


class NestedIndirect(GuestError):
    """An indirect descriptor table contains another indirect descriptor."""


class InvalidIndirect(GuestError):
    """An indirect descriptor has a bad length, or was used without the feature."""


class ReadableAfterWritable(GuestError):
    """A device-readable descriptor follows a device-writable one in a chain."""


class BadBufferLayout(GuestError):
    """A buffer's direction or length does not fit the queue it was put on."""


class AvailIndexJump(GuestError):
    """The driver moved avail.idx by more than the queue size: the queue is stopped."""


class HostError(DeviceError):
    """The host side (VMM, proxy, operator) misused the device."""


class InvalidMemoryTable(HostError):
    """A guest memory region table is empty, unsorted, overlapping or unmappable."""


class InvalidQueueConfig(HostError):
    """A queue size or ring address set by the VMM is invalid."""


class FeatureError(HostError):
    """Features acknowledged that the device never offered."""


class ConfigAccessError(GuestError):
    """A config space write outside the fields the driver may touch (the driver's doing,
    relayed by the VMM): refused, nothing written."""


class InvalidTarget(HostError):
    """A balloon target that is negative or larger than guest memory."""
