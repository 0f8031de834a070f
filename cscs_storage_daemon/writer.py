"""The only module that touches an output directory: atomic writes and snapshot retention."""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import tempfile
from collections.abc import Callable, Iterable
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

    The write system call releases the GIL, so rendering a piece and copying the previous one into the page cache
    run on two cores at once. One piece in flight at a time; an error of either side ends the loop and propagates
    (a producer's once the piece in flight is written). Each `WRITEBACK_BYTES` written, the kernel is asked to start
    writing them to disk (`_Writeback`), so the fsync at the end waits for little more than the last of them.
    """
    write = _Writeback(handle)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="output-writer") as pool:
        in_flight: Future[None] | None = None
        for piece in pieces:
            if in_flight is not None:
                in_flight.result()
            in_flight = pool.submit(write, piece)
        if in_flight is not None:
            in_flight.result()


#: Bytes written between two requests to start writing back (a big all.json is ~190 MB).
WRITEBACK_BYTES = 8 << 20
_SYNC_FILE_RANGE_WRITE = 2  # <fcntl.h>: start writing dirty pages of the range, do not wait


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """Linux's sync_file_range(2) (the os module lacks it), or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function  # type: ignore[no-any-return]


#: Called without the GIL (a ctypes foreign function releases it).
start_writeback = _sync_file_range()


class _Writeback:
    """Writes pieces to a file, asking the kernel to start writing each `WRITEBACK_BYTES` to disk as they fill.

    Only a request (SYNC_FILE_RANGE_WRITE): it neither waits nor makes anything durable; the fsync that follows the
    last piece does. A file system that refuses it (or a platform without it) is written the same, the fsync doing
    all the work.
    """

    def __init__(self, handle: BinaryIO) -> None:
        self._handle = handle
        self._written = 0
        self._started = 0  # bytes whose writeback was requested
        self._request = start_writeback

    def __call__(self, piece: bytes | memoryview) -> None:
        self._handle.write(piece)
        self._written += len(piece) if isinstance(piece, bytes) else piece.nbytes
        if self._request is not None and self._written - self._started >= WRITEBACK_BYTES:
            self._handle.flush()
            if self._request(
                self._handle.fileno(), self._started, self._written - self._started, _SYNC_FILE_RANGE_WRITE
            ):
                self._request = None  # refused (EINVAL, ENOSYS, ESPIPE): the fsync does it all
            self._started = self._written
