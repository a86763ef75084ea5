"""The local disk tier: one payload file per node, a byte budget, LRU, atomic writes.

Layout: ``root/<namespace hex>/<chain hex>.safetensors``; a tenant's entries are
one directory, so ``delete_namespace`` is one ``rmtree``. A write goes to
``.tmp-<chain hex>-<random>`` in the same directory, is fsynced, renamed over
the final name and the directory is fsynced: a reader (or a restarted server)
sees the whole file or none. A write killed half way leaves only a temporary
file, which the next start deletes.

Start-up rebuilds the index from each file's safetensors *header* (8 bytes +
~1 KB of JSON), never its tensors: the header's key must match the file's
place, its format version be current and the file size be what the header
says, or the file is deleted and counted (``rejected``). LRU order starts from
the files' mtimes and then follows ``get``/``put`` in memory.

Failures: a file corrupted or truncated after start is caught by ``get`` (size
and checksum, in ``payload.decode``), deleted, counted and reported as a miss.
A failing write (a full disk, a read-only or vanished directory) disables
writes with one warning and ``stats().disabled``; reads go on serving what is
on disk. See ``segcache.kv.tiers.base`` for the contract.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from segcache.kv.integrity import require
from segcache.kv.tiers.base import Tier, log
from segcache.kv.tiers.buffers import BufferReserve, read_buffer
from segcache.kv.tiers.keys import CacheKey
from segcache.kv.tiers.payload import MAX_HEADER_BYTES, PayloadRejected, read_metadata

SUFFIX = ".safetensors"
TMP_PREFIX = ".tmp-"
_HEX = set("0123456789abcdef")

Slot = tuple[str, str]  # (namespace hex, chain hex)


@dataclass
class StartupReport:
    """What the start-up scan found: entries indexed, files deleted, seconds taken."""

    entries: int = 0
    bytes: int = 0
    removed_tmp: int = 0
    removed_bad: int = 0
    seconds: float = 0.0


class DiskTier(Tier):
    """Payload files under ``root`` within ``budget_bytes``.

    ``fsync=False`` skips the fsyncs (tests on tmpfs; never in production:
    a power cut could then leave a renamed but empty file, which the size
    check at start-up or ``get`` still refuses).
    """

    name = "disk"

    def __init__(self, root: str | os.PathLike, budget_bytes: int, *, queue_size: int = 64,
                 queue_bytes: int = 256 << 20, fsync: bool = True) -> None:
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        super().__init__(queue_size, queue_bytes)
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.budget_bytes = budget_bytes
        self._fsync = fsync
        self._index: OrderedDict[Slot, int] = OrderedDict()  # slot -> file size, LRU first
        self._bytes = 0
        self.startup = self._scan()

    # ------------------------------------------------------------------ start-up
    def _scan(self) -> StartupReport:
        t0 = time.perf_counter()
        report = StartupReport()
        found: list[tuple[float, Slot, int]] = []
        for ns_dir in self.root.iterdir():
            if not ns_dir.is_dir() or not _is_hex(ns_dir.name):
                continue
            for path in ns_dir.iterdir():
                if path.name.startswith(TMP_PREFIX):
                    _unlink(path)
                    report.removed_tmp += 1
                    continue
                if not path.name.endswith(SUFFIX):
                    continue
                entry = self._check_file(ns_dir.name, path)
                if entry is None:
                    report.removed_bad += 1
                    continue
                found.append(entry)
        found.sort()
        for _, slot, size in found:
            self._index[slot] = size
            self._bytes += size
        self._evict_to(self.budget_bytes)
        report.entries, report.bytes = len(self._index), self._bytes
        report.seconds = time.perf_counter() - t0
        if report.removed_tmp or report.removed_bad:
            log.warning("disk tier %s: deleted %d unfinished and %d invalid files at start",
                        self.root, report.removed_tmp, report.removed_bad)
        return report

    def _check_file(self, ns_hex: str, path: Path) -> tuple[float, Slot, int] | None:
        """(mtime, slot, size) of a valid entry file; None after deleting a bad one."""
        chain_hex = path.name[:-len(SUFFIX)]
        try:
            st = path.stat()
            meta = read_metadata(_read_header(path))
            if (meta.get("namespace") != "sha256:" + ns_hex or meta.get("chain") != "sha256:" + chain_hex):
                raise PayloadRejected("key", "header names another entry than its path")
            if int(meta["_size"]) != st.st_size:
                raise PayloadRejected("truncated", f"{st.st_size} of {meta['_size']} bytes")
        except PayloadRejected as e:
            log.info("disk tier: deleting %s: %s", path, e)
            _unlink(path)
            with self._lock:
                self._rejected[e.reason] += 1
            return None
        except OSError as e:
            log.warning("disk tier: cannot read %s: %s", path, e)
            self._count("errors")
            return None
        return st.st_mtime, (ns_hex, chain_hex), st.st_size

    # ------------------------------------------------------------------ storage
    def _path(self, slot: Slot) -> Path:
        return self.root / slot[0] / (slot[1] + SUFFIX)

    def _read(self, key: CacheKey) -> memoryview | None:
        slot = (key.ns_hex, key.chain_hex)
        with self._lock:
            if slot not in self._index:
                return None
            self._index.move_to_end(slot)
        try:
            return _read_file(self._path(slot), self.buffers)
        except FileNotFoundError:  # deleted behind our back: forget it
            self._forget(slot)
            return None
        except OSError as e:
            log.warning("disk tier: read failed: %s", e)
            self._count("errors")
            return None

    def _write(self, key: CacheKey, payload: bytes | memoryview, gen: int) -> bool:
        size = memoryview(payload).nbytes
        if size > self.budget_bytes:
            self._count("dropped")
            return False
        slot = (key.ns_hex, key.chain_hex)
        final = self._path(slot)
        tmp = final.with_name(f"{TMP_PREFIX}{slot[1]}-{secrets.token_hex(4)}")
        try:
            final.parent.mkdir(exist_ok=True)
            self._write_file(tmp, payload)
            with self._lock:
                if gen != self._gen[key.namespace]:  # purged since it was queued
                    _unlink(tmp)
                    return False
                os.replace(tmp, final)
                self._account(slot, size)
            if self._fsync:
                _fsync_dir(final.parent)
        except OSError as e:
            _unlink(tmp)
            if gen != self.generation(key.namespace):
                return False  # the namespace directory went away under a purge
            self._count("errors")
            self._disable(f"write failed: {errno.errorcode.get(e.errno, e.errno)} {e.strerror}")
            return False
        return True

    def _write_file(self, path: Path, payload: bytes | memoryview) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view):]
            if self._fsync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def _account(self, slot: Slot, size: int) -> None:
        """Index a just-renamed file and evict LRU files to the budget (lock held)."""
        self._bytes += size - self._index.pop(slot, 0)
        self._index[slot] = size
        self._evict_to(self.budget_bytes, keep=slot)

    def _evict_to(self, budget: int, keep: Slot | None = None) -> None:
        while self._bytes > budget and self._index:
            slot = next(iter(self._index))
            if slot == keep:  # only the new file is left (it fits: checked before writing)
                break
            self._bytes -= self._index.pop(slot)
            _unlink(self._path(slot))

    def _forget(self, slot: Slot) -> None:
        """Drop a slot whose file vanished (unless a write has just put it back)."""
        with self._lock:
            if not self._path(slot).exists():
                self._bytes -= self._index.pop(slot, 0)

    def _remove(self, key: CacheKey) -> None:
        slot = (key.ns_hex, key.chain_hex)
        with self._lock:
            self._bytes -= self._index.pop(slot, 0)
            _unlink(self._path(slot))

    def _remove_namespace(self, namespace: str) -> None:
        ns_hex = namespace.split(":", 1)[1]
        with self._lock:
            for slot in [s for s in self._index if s[0] == ns_hex]:
                self._bytes -= self._index.pop(slot)
            shutil.rmtree(self.root / ns_hex, ignore_errors=True)

    def _has(self, key: CacheKey) -> bool:
        with self._lock:
            return (key.ns_hex, key.chain_hex) in self._index

    def _sizes(self) -> tuple[int, int]:
        with self._lock:
            return self._bytes, len(self._index)

    def check_integrity(self) -> None:
        """Raise ``IntegrityError`` unless the index and the files agree (tests)."""
        with self._lock:
            require(self._bytes == sum(self._index.values()), "disk bytes != sum of sizes")
            require(self._bytes <= self.budget_bytes or len(self._index) <= 1, "disk over budget")
            on_disk = {(p.parent.name, p.name[:-len(SUFFIX)]): p.stat().st_size
                       for p in self.root.glob(f"*/*{SUFFIX}")}
            require(on_disk == dict(self._index), "index differs from the files on disk")


def _read_file(path: Path, buffers: BufferReserve | None = None) -> memoryview:
    """The whole file, read straight into a buffer of its own (one copy out of the
    page cache; a ready one from ``buffers`` where it fits), which the engine then
    wraps as the node's KV tensor as is."""
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        view = read_buffer(size, buffers)
        done = 0
        while done < size:
            n = f.readinto(view[done:])
            if not n:  # shrunk since fstat: the payload check refuses what is there
                return view[:done]
            done += n
        return view


def _read_header(path: Path) -> bytes:
    """The first 8 + header-length bytes of a file: never its tensors."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return head
        n = int.from_bytes(head, "little")
        return head + f.read(min(n, MAX_HEADER_BYTES + 1))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("disk tier: cannot delete %s: %s", path, e)


def _is_hex(name: str) -> bool:
    return len(name) == 64 and set(name) <= _HEX
