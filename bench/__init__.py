"""vballoon's benchmarks: ``python -m bench.run [--quick]`` (``make bench``).

Everything is measured side by side in one run, because absolute times on shared
machines are noise and only ratios within one run mean something:

- ``throughput``: device throughput with the fake driver, per worker mode and PFN pattern,
  next to the kernel's own limit for the same PFNs (``kernel``), and its scaling with
  guest size;
- ``startup``: ``vballoon serve`` to ready, and activation of a worker;
- ``footprint``: the worker's and the parent's unique memory;
- ``realguest``: a User-Mode Linux guest inflating and deflating its balloon.

``results`` collects the numbers and writes the table, ``results.json``, ``RESULTS.md``
and ``plot.png``; ``system`` reads the facts about processes (CPU time, memory, placement)
from ``/proc``.
"""
