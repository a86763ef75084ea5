"""The buffers a tier load reads a payload into, and a reserve of them kept ready.

``read_buffer(n)`` gives a writable buffer of its own; the node's KV tensor is
later made over it as is (``payload.decode`` returns a view, the engine wraps it).
From ``MMAP_BYTES`` on it is anonymous memory from ``mmap``, not a numpy array:
numpy asks for transparent huge pages on arrays of 4 MB and more, and faulting
those in made a read ~4x slower on the 2-core VM host (540 vs 125 ms per 100 MB,
the cores shared with other work; asking for them by ``madvise`` made a whole
disk hit 2.4x slower again on 2026-12-02); nor a bytearray, which zeroes its pages
first. Below it a bytearray: a mapping per small node could run into the kernel's
limit on mappings (vm.max_map_count). A fresh mapping is populated when it is
made (``MAP_POPULATE``, Linux): one call maps every page, where the read would
take a page fault per 4 KB (a 26 MB read ~13 ms against ~7 ms populated).

Even populated, a fresh mapping costs the kernel work per page (zeroing it,
mapping it), and on this VM host that was most of a load: four 26 MB payloads read
out of the page cache into fresh mappings took 56-72 ms, into mappings made
earlier 27-35 ms (2026-12-02, one thread). ``BufferReserve`` therefore keeps a few
populated mappings ready, made at start-up and then by a background thread at the
lowest CPU priority once loads have stopped taking them for ``REFILL_AFTER_S`` (so,
in practice, between requests), and a load that fits one takes it, shrunk to its
size (``mremap``: the pages it keeps stay mapped, the rest go back). A load it
cannot serve (too small, too big, or none ready) gets a fresh mapping as before.
"""

from __future__ import annotations

import mmap
import os
import threading
import time
from collections import Counter

MMAP_BYTES = 4 << 20  # payloads read into a mapping of their own from this size on
# that mapping: private, anonymous, every page mapped in by the call (Linux; elsewhere faulted in)
_ANON_FLAGS = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
# A refill waits until no load has taken a buffer for this long: making a mapping holds
# the process's memory-map lock, which the loads' own mappings (and shrinking) wait for.
REFILL_AFTER_S = 0.25


class BufferReserve:
    """Up to ``pieces`` populated mappings of ``piece_bytes`` each, ready for loads of
    ``MMAP_BYTES`` .. ``piece_bytes``; made by ``start``, then remade by a background
    thread at nice 19 once no load has taken one for ``REFILL_AFTER_S``. Thread-safe;
    ``close`` stops the thread and drops the mappings not taken (a taken one lives as
    long as the buffer made over it)."""

    def __init__(self, pieces: int, piece_bytes: int) -> None:
        if pieces < 0 or piece_bytes < MMAP_BYTES:
            raise ValueError(f"need pieces >= 0 and piece_bytes >= {MMAP_BYTES}, got {pieces}, {piece_bytes}")
        self.pieces, self.piece_bytes = pieces, piece_bytes
        self._ready: list[mmap.mmap] = []
        self._cond = threading.Condition()
        self._closed = False
        self._last_take = 0.0  # time.monotonic() of the last take
        self.counts: Counter[str] = Counter()  # taken, fresh (no piece ready), made
        self._thread = threading.Thread(target=self._fill, name="segcache-tier-buffers", daemon=True)

    def start(self) -> None:
        """Make the pieces now (the first loads then find them ready), then keep
        them made in the background. Idempotent."""
        with self._cond:
            if not self.pieces or self._closed or self._thread.is_alive():
                return
            missing = self.pieces - len(self._ready)
        made = [self._new_piece() for _ in range(missing)]
        with self._cond:
            if self._closed:  # closed meanwhile
                for buf in made:
                    buf.close()
                return
            self._ready += made
            self.counts["made"] += len(made)
            if not self._thread.is_alive():
                self._thread.start()

    def take(self, nbytes: int) -> memoryview | None:
        """A ready mapping of exactly ``nbytes``, or None (the caller makes its own)."""
        if not MMAP_BYTES <= nbytes <= self.piece_bytes or not self.pieces:
            return None
        with self._cond:
            if not self._ready:
                self.counts["fresh"] += 1
                return None
            buf = self._ready.pop()
            self.counts["taken"] += 1
            self._last_take = time.monotonic()
            self._cond.notify()
        try:
            buf.resize(nbytes)
        except (OSError, SystemError):  # no mremap here: the caller makes a fresh one
            buf.close()
            return None
        return memoryview(buf)

    def ready(self) -> int:
        with self._cond:
            return len(self._ready)

    def wait_ready(self, timeout_s: float) -> bool:
        """Block until every piece is ready (tests, benchmarks); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self._ready) >= self.pieces or self._closed, timeout_s)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            ready, self._ready = self._ready, []
            self._cond.notify_all()
        for buf in ready:
            buf.close()
        if self._thread.is_alive():
            self._thread.join()

    def _new_piece(self) -> mmap.mmap:
        return mmap.mmap(-1, self.piece_bytes, flags=_ANON_FLAGS)

    def _fill(self) -> None:
        try:  # this thread only (Linux: a thread's id is a process id for setpriority)
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except (AttributeError, OSError):
            pass
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or len(self._ready) < self.pieces)
                while not self._closed and (wait := self._last_take + REFILL_AFTER_S - time.monotonic()) > 0:
                    self._cond.wait(wait)  # loads are still taking buffers: let them finish
                if self._closed:
                    return
            buf = self._new_piece()
            with self._cond:
                if self._closed:
                    buf.close()
                    return
                self._ready.append(buf)
                self.counts["made"] += 1
                self._cond.notify_all()


def read_buffer(nbytes: int, reserve: BufferReserve | None = None) -> memoryview:
    """A writable buffer of its own of ``nbytes`` for a tier to read a payload into:
    from ``reserve`` when it has one ready, else a fresh one (see the module docstring)."""
    if nbytes < MMAP_BYTES:
        return memoryview(bytearray(nbytes))
    if reserve is not None and (ready := reserve.take(nbytes)) is not None:
        return ready
    return memoryview(mmap.mmap(-1, nbytes, flags=_ANON_FLAGS))
