"""Run a long Arrow read under the system allocator, so its RSS is what it holds.

Why: pyarrow's default pool is mimalloc (3.4.1 in pyarrow 26). It commits arena memory eagerly
and gives freed pages back to the OS only after ``purge_delay`` (1,000 ms). A read that allocates
and frees one day of the log after another, faster than that, keeps the freed pages resident: the
training catalogue read of a 160-day, 1.6M-row log held ~65-90 MiB there, 25x the ~3.7 MiB of
Arrow buffers alive at its peak (``pa.default_memory_pool().max_memory()``), and the excess grew
with the days read (``docs/scaling.md``, "100M training rows in bounded memory"). The same read
under ``MIMALLOC_PURGE_DELAY=0 MIMALLOC_ARENA_EAGER_COMMIT=0``, or under the system allocator,
stayed within ~15-30 MiB. Those mimalloc options are read from the environment once, when pyarrow
loads, so a library cannot set them; it can choose the pool.

Arrow has one process-wide default pool (``pa.set_memory_pool``) and every compute kernel,
``take`` and ``concat_tables`` allocates from it; passing ``memory_pool=`` to each call would miss
the ones that take none. So the block swaps the default pool and puts the old one back. Each
buffer remembers its own pool, so buffers made inside and freed outside (the returned table)
are freed correctly; other threads that allocate meanwhile use the system pool too, which is
only slower.

Example::

    with system_memory_pool():
        catalogue = build_catalogue(iter_days(log_dir, columns=...), vocabs)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pyarrow as pa


@contextmanager
def system_memory_pool() -> Iterator[pa.MemoryPool]:
    """Arrow's default memory pool is the system allocator inside the block (restored after)."""
    previous = pa.default_memory_pool()
    pool = pa.system_memory_pool()
    pa.set_memory_pool(pool)
    try:
        yield pool
    finally:
        pa.set_memory_pool(previous)
