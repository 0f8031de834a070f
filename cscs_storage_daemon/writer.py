"""The only module that touches an output directory: atomic writes and snapshot retention."""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import mmap
import os
import tempfile
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

from cscs_storage_daemon.envelope import is_snapshot_file_name


class OutputWriter:
    """Writes files into one directory so that a reader never sees a partial file.

    Each write goes to a temporary file in the same directory, is flushed and fsynced, then renamed over the
    target with `os.replace`, and the directory is fsynced so the rename survives a power cut.
    """

    def __init__(self, directory: str | os.PathLike[str], *, file_mode: int = 0o640, dir_mode: int = 0o750):
        self.directory = Path(directory)
        self.file_mode = file_mode
        self.dir_mode = dir_mode

    def ensure_directory(self) -> None:
        if not self.directory.is_dir():
            self.directory.mkdir(parents=True, exist_ok=True)
            os.chmod(self.directory, self.dir_mode)

    def path_of(self, name: str) -> Path:
        """The path of `name` inside the directory; refuses anything that is not a plain file name."""
        if not name or name in {".", ".."} or "/" in name or "\x00" in name or name.startswith("."):
            raise ValueError(f"refusing unsafe output file name {name!r}")
        return self.directory / name

    def exists(self, name: str) -> bool:
        return self.path_of(name).exists()

    def write(self, name: str, data: bytes) -> Path:
        return self._write_atomically(name, (data,), behind=False)

    def write_pieces(self, name: str, pieces: Iterable[bytes | memoryview]) -> Path:
        """`write` of the pieces joined (`render_pieces` makes them), streamed: the whole of a 190 MB all.json is
        never in memory. An exception while the pieces are produced leaves the target as it was, no temporary file.

        Where `write` is replaced (a subclass that records or replays writes, a test's stand-in), the joined bytes go
        through it instead.
        """
        if getattr(self.write, "__func__", None) is not OutputWriter.write:
            return self.write(name, b"".join(pieces))
        return self._write_atomically(name, pieces, behind=True)

    def _write_atomically(self, name: str, pieces: Iterable[bytes | memoryview], *, behind: bool) -> Path:
        target = self.path_of(name)
        self.ensure_directory()
        fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", suffix=".part", dir=self.directory)
        try:
            with os.fdopen(fd, "wb") as handle:
                if behind:
                    _write_behind(handle, pieces)
                else:
                    for piece in pieces:
                        handle.write(piece)
                handle.flush()
                os.fchmod(handle.fileno(), self.file_mode)
                os.fsync(handle.fileno())
            os.replace(tmp_name, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
            raise
        self._fsync_directory()
        return target

    def _fsync_directory(self) -> None:
        dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def snapshot_names(self) -> list[str]:
        """all.json files in the directory, oldest first (names sort by time)."""
        if not self.directory.is_dir():
            return []
        return sorted(entry.name for entry in os.scandir(self.directory) if is_snapshot_file_name(entry.name))

    def prune_snapshots(self, keep: int) -> list[str]:
        """Delete all but the newest `keep` all.json files; order files are never touched."""
        names = self.snapshot_names()
        doomed = names[: max(0, len(names) - keep)]
        for name in doomed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.directory / name)
        return doomed


def _write_behind(handle: BinaryIO, pieces: Iterable[bytes | memoryview]) -> None:
    """Write each piece from a helper thread while the caller's iterator makes the next one.

    The write system call releases the GIL, so rendering pieces and writing earlier ones run on two cores at once.
    Up to `WRITE_AHEAD_BYTES` of pieces wait for the writing thread (a direct write of a whole chunk takes a few
    milliseconds, in which the renderer goes on); an error of either side ends the loop and propagates (a producer's
    once the pieces handed over are written). The pieces go out through `_ChunkedOutput`: a big file bypasses the
    page cache.
    """
    output = _ChunkedOutput(handle.fileno())
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="output-writer") as pool:
            in_flight: collections.deque[tuple[Future[None], int]] = collections.deque()
            queued = 0  # bytes handed over and not yet written
            for piece in pieces:
                while in_flight and queued >= WRITE_AHEAD_BYTES:
                    future, size = in_flight.popleft()
                    future.result()
                    queued -= size
                size = piece.nbytes if isinstance(piece, memoryview) else len(piece)
                in_flight.append((pool.submit(output.write, piece), size))
                queued += size
            for future, _ in in_flight:
                future.result()
        output.finish()
    finally:
        output.release()


#: Bytes of pieces handed to the writing thread and not yet written, at most (then the renderer waits).
WRITE_AHEAD_BYTES = 16 << 20
#: Bytes gathered before a direct write (a big all.json is ~190 MB; a file smaller than this is written as usual).
DIRECT_CHUNK_BYTES = 8 << 20
#: O_DIRECT where the platform has it (Linux), else 0: no direct writes.
O_DIRECT: int = getattr(os, "O_DIRECT", 0)


class _ChunkedOutput:
    """Writes a stream of pieces to a file descriptor, each full `DIRECT_CHUNK_BYTES` with O_DIRECT.

    A direct write goes from the process's buffer to the disk, not through the page cache: writing a 190 MB
    all.json neither allocates 190 MB of cache (on a virtual machine whose free memory went back to the host, each
    fresh page is a fault on the host: measured 0.45 s for 190 MB, against 0.04 s into recycled pages; the direct
    writes took 0.11-0.18 s) nor pushes other files out of it, and the fsync at the end has only the last, short
    part to wait for. O_DIRECT wants the buffer, the length and the file offset aligned to the device's block: the
    pieces are copied into a page-aligned chunk (an anonymous mmap) written whole at offsets that are multiples of
    it; the tail (less than a chunk) is written through the page cache, O_DIRECT cleared first. A file system that
    refuses O_DIRECT (tmpfs on older kernels, some network file systems) gets every byte through the page cache
    instead; the bytes written are the same either way.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._chunk: mmap.mmap | None = None
        self._view: memoryview | None = None
        self._filled = 0
        self._direct = bool(O_DIRECT)  # until refused
        self._direct_on = False  # O_DIRECT set on the descriptor

    def write(self, piece: bytes | memoryview) -> None:
        data = memoryview(piece).cast("B")
        at = 0
        while at < len(data):
            view = self._chunk_view()
            room = len(view) - self._filled
            count = min(room, len(data) - at)
            view[self._filled : self._filled + count] = data[at : at + count]
            self._filled += count
            at += count
            if self._filled == len(view):
                self._write_out(view)
                self._filled = 0

    def finish(self) -> None:
        """Write what is left (less than a chunk) through the page cache."""
        self._direct = False
        if self._direct_on:
            self._set_direct(False)
        if self._view is not None and self._filled:
            self._write_out(self._view[: self._filled])
            self._filled = 0

    def release(self) -> None:
        view, chunk = self._view, self._chunk
        self._view = self._chunk = None
        with contextlib.suppress(BufferError):
            if view is not None:
                view.release()
            if chunk is not None:
                chunk.close()  # else a slice is still held (by an error's traceback): unmapped once it is freed

    def _chunk_view(self) -> memoryview:
        if self._view is None:
            self._chunk = mmap.mmap(-1, DIRECT_CHUNK_BYTES)
            self._view = memoryview(self._chunk)
        return self._view

    def _write_out(self, view: memoryview) -> None:
        """Write ``view`` whole: directly while that is on and taken, else through the page cache."""
        if self._direct and not self._direct_on:
            try:
                self._set_direct(True)
            except OSError:
                self._direct = False  # the file system refuses it: through the page cache
        at = 0
        while at < len(view):
            try:
                at += os.write(self._fd, view[at:])
            except OSError as error:
                if not (self._direct_on and error.errno == errno.EINVAL):
                    raise
                # Accepted by fcntl, refused by the write (a block size the chunk does not fit, say): nothing of
                # this call was written; the rest goes through the page cache, from where the file offset is.
                self._set_direct(False)
                self._direct = False

    def _set_direct(self, on: bool) -> None:
        flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
        fcntl.fcntl(self._fd, fcntl.F_SETFL, flags | O_DIRECT if on else flags & ~O_DIRECT)
        self._direct_on = on
