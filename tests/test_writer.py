"""The output writer: atomic files, modes, safe names, retention, and what a concurrent reader sees."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
import sys
import tempfile
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cscs_storage_daemon import writer as writer_module
from cscs_storage_daemon.envelope import render, render_pieces, snapshot_envelope, snapshot_file_name
from cscs_storage_daemon.mapping import MappingSettings, map_resource
from cscs_storage_daemon.testing.sample_data import generate_resources
from cscs_storage_daemon.writer import OutputWriter

ORDER_NAME = "2025-03-14-09-26-create_0a1b2c3d4e5f40718293a4b5c6d7e8f9.json"
START = datetime(2025, 3, 14, 9, 0, tzinfo=UTC)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def leftovers(directory: Path) -> list[str]:
    """Anything in the directory that is not a finished file: temporary files of the writer."""
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".") or p.name.endswith(".part"))


@pytest.fixture
def umask_077() -> Iterator[None]:
    """A strict umask must not change the modes the spec asks for."""
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


# ---------------------------------------------------------------------------------------------------- writing


def test_write_creates_the_file_with_the_exact_bytes(tmp_path: Path) -> None:
    out = OutputWriter(tmp_path / "out")
    path = out.write("2025-03-14-09-26-all.json", b'{"a": 1}\n')
    assert path == tmp_path / "out" / "2025-03-14-09-26-all.json"
    assert path.read_bytes() == b'{"a": 1}\n'
    assert out.exists("2025-03-14-09-26-all.json")
    assert not out.exists("2025-03-14-09-27-all.json")
    assert leftovers(tmp_path / "out") == []


def test_a_second_write_replaces_the_first(tmp_path: Path) -> None:
    out = OutputWriter(tmp_path)
    out.write("2025-03-14-09-26-all.json", b"first\n")
    out.write("2025-03-14-09-26-all.json", b"second\n")
    assert (tmp_path / "2025-03-14-09-26-all.json").read_bytes() == b"second\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["2025-03-14-09-26-all.json"]


@pytest.mark.usefixtures("umask_077")
def test_default_modes(tmp_path: Path) -> None:
    directory = tmp_path / "feeds" / "capstor"
    path = OutputWriter(directory).write("x.json", b"{}\n")
    assert mode_of(path) == 0o640
    assert mode_of(directory) == 0o750


@pytest.mark.usefixtures("umask_077")
@pytest.mark.parametrize(("file_mode", "dir_mode"), [(0o600, 0o700), (0o644, 0o755)])
def test_configured_modes(tmp_path: Path, file_mode: int, dir_mode: int) -> None:
    directory = tmp_path / "out"
    out = OutputWriter(directory, file_mode=file_mode, dir_mode=dir_mode)
    path = out.write("x.json", b"{}\n")
    assert mode_of(path) == file_mode
    assert mode_of(directory) == dir_mode
    out.write("x.json", b"[]\n")  # a replaced file gets the mode too
    assert mode_of(path) == file_mode


def test_an_existing_directory_keeps_its_mode(tmp_path: Path) -> None:
    directory = tmp_path / "out"
    directory.mkdir()
    os.chmod(directory, 0o755)
    OutputWriter(directory).write("x.json", b"{}\n")
    assert mode_of(directory) == 0o755


@pytest.mark.parametrize(
    "name",
    ["", ".", "..", "../escape.json", "a/b.json", "/etc/passwd", "x\x00.json", ".hidden.json", ".tmp-x.part"],
)
def test_unsafe_names_are_refused(tmp_path: Path, name: str) -> None:
    out = OutputWriter(tmp_path / "out")
    with pytest.raises(ValueError, match="unsafe"):
        out.write(name, b"{}\n")
    assert list(tmp_path.iterdir()) == []  # nothing written anywhere, not even the directory


# ---------------------------------------------------------------------------------------------------- failures


def test_failed_rename_leaves_no_temp_file_and_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = OutputWriter(tmp_path)
    out.write("2025-03-14-09-26-all.json", b"old\n")

    def broken_replace(src: Any, dst: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="No space"):
        out.write("2025-03-14-09-26-all.json", b"new\n")
    with pytest.raises(OSError):
        out.write("2025-03-14-09-27-all.json", b"new\n")
    assert leftovers(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["2025-03-14-09-26-all.json"]
    assert (tmp_path / "2025-03-14-09-26-all.json").read_bytes() == b"old\n"


def test_failed_fsync_leaves_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = OutputWriter(tmp_path)

    def broken_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="Input/output"):
        out.write("x.json", b"{}\n")
    assert list(tmp_path.iterdir()) == []


def test_interrupted_write_leaves_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Even a KeyboardInterrupt between the temp file and the rename cleans up."""
    out = OutputWriter(tmp_path)

    def interrupted(src: Any, dst: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        out.write("x.json", b"{}\n")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------- retention


def snapshot_name(minute: int) -> str:
    return snapshot_file_name(START + timedelta(minutes=minute))


def test_prune_keeps_the_newest_and_never_touches_order_files(tmp_path: Path) -> None:
    out = OutputWriter(tmp_path)
    out.write(ORDER_NAME, b"{}\n")
    out.write("notes.txt", b"not ours\n")
    for minute in (5, 1, 3, 2, 4):  # written out of order: the name decides, not the write time
        out.write(snapshot_name(minute), b"{}\n")
    pruned = out.prune_snapshots(2)
    assert pruned == [snapshot_name(1), snapshot_name(2), snapshot_name(3)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [ORDER_NAME, "notes.txt", snapshot_name(4), snapshot_name(5)]
    )
    assert out.prune_snapshots(2) == []
    assert out.prune_snapshots(0) == [snapshot_name(4), snapshot_name(5)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([ORDER_NAME, "notes.txt"])


def test_prune_of_a_missing_directory(tmp_path: Path) -> None:
    out = OutputWriter(tmp_path / "never-written")
    assert out.snapshot_names() == []
    assert out.prune_snapshots(1) == []


# ---------------------------------------------------------------------------------------------------- the reader


RESOURCES = 60


def snapshot_bytes(generation: int) -> bytes:
    """A realistic all.json of a few kB whose every resource carries its generation."""
    resources = [
        {"itemId": f"{i:032x}", "generation": generation, "name": f"resource-{i}-é", "quota": i * 1.5}
        for i in range(RESOURCES)
    ]
    return render(snapshot_envelope(resources, date=START + timedelta(seconds=generation)))


def check_document(document: Any) -> None:
    assert list(document) == ["status", "code", "meta", "result"]
    assert document["status"] == "success" and document["code"] == 200
    resources = document["result"]["storageResources"]
    assert document["result"]["paginate"]["total"] == RESOURCES == len(resources)
    generation = resources[0]["generation"]
    assert all(r["generation"] == generation for r in resources)
    assert resources[-1]["itemId"] == f"{RESOURCES - 1:032x}"
    assert document["meta"]["date"] == (START + timedelta(seconds=generation)).isoformat()


@pytest.fixture
def quick_thread_switches() -> Iterator[None]:
    """Hand the GIL over often, so the busy reader does not starve the writer and the two interleave finely."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(0.0001)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


@pytest.mark.usefixtures("quick_thread_switches")
def test_a_reader_never_sees_a_partial_file(tmp_path: Path) -> None:
    """1 000 snapshots rewritten (each name twice, then a new minute) with pruning, while a reader polls."""
    out = OutputWriter(tmp_path)
    out.write(ORDER_NAME, snapshot_bytes(0))
    done = threading.Event()
    problems: list[str] = []
    parsed = 0
    vanished = 0

    def reader() -> None:
        nonlocal parsed, vanished
        while not done.is_set():
            for name in os.listdir(tmp_path):
                if name.startswith("."):
                    continue  # the writer's temporary files are hidden; consumers skip them
                try:
                    data = (tmp_path / name).read_bytes()
                except FileNotFoundError:
                    vanished += 1  # pruned between listing and opening: fine
                    continue
                try:
                    check_document(json.loads(data))
                except Exception as exc:  # a partial or mixed file
                    problems.append(f"{name}: {type(exc).__name__}: {exc!s:.100} ({len(data)} bytes)")
                    continue
                parsed += 1

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for generation in range(1, 1001):
            out.write(snapshot_name(generation // 2), snapshot_bytes(generation))
            out.prune_snapshots(3)
    finally:
        done.set()
        thread.join(30)
    assert not thread.is_alive()
    assert problems == []
    assert parsed > 0
    assert leftovers(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [ORDER_NAME, snapshot_name(498), snapshot_name(499), snapshot_name(500)]
    )
    last = json.loads((tmp_path / snapshot_name(500)).read_bytes())
    check_document(last)
    assert last["result"]["storageResources"][0]["generation"] == 1000


# ---------------------------------------------------------------------------------------------------- pieces


def test_write_pieces_writes_them_joined(tmp_path: Path) -> None:
    out = OutputWriter(tmp_path)
    pieces: list[bytes | memoryview] = [b'{"a": ', memoryview(b"[1, 2]"), b"}\n"]
    path = out.write_pieces("x.json", iter(pieces))
    assert path.read_bytes() == b'{"a": [1, 2]}\n'
    assert mode_of(path) == 0o640
    assert leftovers(tmp_path) == []


def test_failing_pieces_keep_the_old_file_and_leave_no_temp_file(tmp_path: Path) -> None:
    out = OutputWriter(tmp_path)
    out.write("x.json", b"old\n")

    def pieces() -> Iterator[bytes]:
        yield b"new, half"
        raise ValueError("Out of range float values are not JSON compliant")

    with pytest.raises(ValueError):
        out.write_pieces("x.json", pieces())
    assert (tmp_path / "x.json").read_bytes() == b"old\n"
    assert leftovers(tmp_path) == []


def test_write_pieces_goes_through_a_replaced_write(tmp_path: Path) -> None:
    """A subclass that records or replays writes (capture, replay) or a test's stand-in sees every write."""
    seen: list[tuple[str, bytes]] = []

    class Recording(OutputWriter):
        def write(self, name: str, data: bytes) -> Path:
            seen.append((name, data))
            return super().write(name, data)

    pieces: list[bytes | memoryview] = [b"1", memoryview(b"2")]
    Recording(tmp_path).write_pieces("a.json", iter(pieces))

    def stand_in_write(name: str, data: bytes) -> Path:
        seen.append((name, data))
        return tmp_path / name

    stand_in = OutputWriter(tmp_path)
    stand_in.write = stand_in_write  # type: ignore[method-assign]
    stand_in.write_pieces("b.json", iter([b"3"]))
    assert seen == [("a.json", b"12"), ("b.json", b"3")]
    assert (tmp_path / "a.json").read_bytes() == b"12"


def test_a_piece_that_cannot_be_written_keeps_the_old_file(tmp_path: Path) -> None:
    out = OutputWriter(tmp_path)
    out.write("x.json", b"old\n")
    with pytest.raises(TypeError):
        out.write_pieces("x.json", iter([b"new", "not bytes", b"never"]))  # type: ignore[arg-type]
    assert (tmp_path / "x.json").read_bytes() == b"old\n"
    assert leftovers(tmp_path) == []


class WriteLog:
    """``os.write`` as the writer calls it, recording each call's length and whether O_DIRECT was set then."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, refuse_direct: int = 0) -> None:
        self.calls: list[tuple[int, bool]] = []
        self._real = os.write
        self._refuse_direct = refuse_direct  # direct writes to refuse with EINVAL
        monkeypatch.setattr(writer_module.os, "write", self)

    def __call__(self, fd: int, data: Any) -> int:
        direct = bool(fcntl.fcntl(fd, fcntl.F_GETFL) & writer_module.O_DIRECT)
        if direct and self._refuse_direct:
            self._refuse_direct -= 1
            self.calls.append((0, True))
            raise OSError(errno.EINVAL, "Invalid argument")
        written = self._real(fd, data)
        self.calls.append((written, direct))
        return written


def pieces_of(sizes: list[int]) -> list[bytes]:
    return [bytes([65 + i % 26]) * size for i, size in enumerate(sizes)]


CHUNK = 64 << 10  # a multiple of any block size O_DIRECT may want


@pytest.mark.skipif(not writer_module.O_DIRECT, reason="a platform without O_DIRECT")
def test_a_big_file_is_written_in_whole_chunks_past_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every full chunk goes out in one direct write, the tail (less than a chunk) through the page cache, and the
    file holds exactly the pieces, whatever their sizes against the chunk's."""
    monkeypatch.setattr(writer_module, "DIRECT_CHUNK_BYTES", CHUNK)
    log = WriteLog(monkeypatch)
    pieces = pieces_of([1000, CHUNK, 3 * CHUNK + 17, 5, CHUNK - 1022, 40_000])
    total = sum(map(len, pieces))
    path = OutputWriter(tmp_path).write_pieces("big.json", iter([pieces[0], memoryview(pieces[1]), *pieces[2:]]))
    assert path.read_bytes() == b"".join(pieces)
    assert log.calls == [(CHUNK, True)] * (total // CHUNK) + [(total % CHUNK, False)]
    assert mode_of(path) == 0o640 and leftovers(tmp_path) == []


def test_a_file_smaller_than_a_chunk_is_written_as_usual(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(writer_module, "DIRECT_CHUNK_BYTES", CHUNK)
    log = WriteLog(monkeypatch)
    pieces = pieces_of([100, 200, CHUNK - 301])
    assert OutputWriter(tmp_path).write_pieces("small.json", iter(pieces)).read_bytes() == b"".join(pieces)
    assert log.calls == [(CHUNK - 1, False)]


@pytest.mark.skipif(not writer_module.O_DIRECT, reason="a platform without O_DIRECT")
def test_a_direct_write_refused_goes_on_through_the_page_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file system that takes O_DIRECT at fcntl time but refuses the write (EINVAL): that chunk and the rest are
    written through the page cache from where the file stood, and the file is whole."""
    monkeypatch.setattr(writer_module, "DIRECT_CHUNK_BYTES", CHUNK)
    pieces = pieces_of([CHUNK // 2] * 7)
    log = WriteLog(monkeypatch, refuse_direct=1)
    out = OutputWriter(tmp_path)
    assert out.write_pieces("a.json", iter(pieces)).read_bytes() == b"".join(pieces)
    assert log.calls == [(0, True), (CHUNK, False), (CHUNK, False), (CHUNK, False), (CHUNK // 2, False)]

    real_fcntl = fcntl.fcntl

    def refusing_fcntl(fd: int, command: int, arg: int = 0) -> int:
        if command == fcntl.F_SETFL and arg & writer_module.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_fcntl(fd, command, arg)

    monkeypatch.setattr(writer_module.fcntl, "fcntl", refusing_fcntl)
    log.calls.clear()
    assert out.write_pieces("b.json", iter(pieces)).read_bytes() == b"".join(pieces)
    assert log.calls == [(CHUNK, False)] * 3 + [(CHUNK // 2, False)]


def test_without_o_direct_every_byte_goes_through_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writer_module, "DIRECT_CHUNK_BYTES", CHUNK)
    monkeypatch.setattr(writer_module, "O_DIRECT", 0)  # a platform without it
    log = WriteLog(monkeypatch)
    pieces = pieces_of([CHUNK + 1, CHUNK])
    assert OutputWriter(tmp_path).write_pieces("x.json", iter(pieces)).read_bytes() == b"".join(pieces)
    assert log.calls == [(CHUNK, False), (CHUNK, False), (1, False)]


def test_a_failing_direct_write_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A disk that fills up under a big write: the error reaches the caller, the old file stays, nothing is left."""
    monkeypatch.setattr(writer_module, "DIRECT_CHUNK_BYTES", CHUNK)
    out = OutputWriter(tmp_path)
    out.write("all.json", b"old\n")
    real_write = os.write
    written = [0]

    def filling(fd: int, data: Any) -> int:
        if written[0] >= 3 * CHUNK:
            raise OSError(errno.ENOSPC, "No space left on device")
        count = real_write(fd, data)
        written[0] += count
        return count

    monkeypatch.setattr(writer_module.os, "write", filling)
    with pytest.raises(OSError, match="No space left"):
        out.write_pieces("all.json", iter(pieces_of([CHUNK // 4] * 40)))
    assert (tmp_path / "all.json").read_bytes() == b"old\n"
    assert leftovers(tmp_path) == []


def test_many_pieces_wait_for_the_writing_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The renderer runs at most WRITE_AHEAD_BYTES ahead of the writing thread: with the writing thread held, it
    stops after handing over that much, and goes on once the thread does."""
    monkeypatch.setattr(writer_module, "DIRECT_CHUNK_BYTES", CHUNK)
    monkeypatch.setattr(writer_module, "WRITE_AHEAD_BYTES", 4 * CHUNK)
    release = threading.Event()
    real_write = os.write

    def held(fd: int, data: Any) -> int:
        release.wait(30)
        return real_write(fd, data)

    monkeypatch.setattr(writer_module.os, "write", held)
    made: list[int] = []
    sizes = [CHUNK // 2] * 24

    def pieces() -> Iterator[bytes]:
        for i, piece in enumerate(pieces_of(sizes)):
            made.append(i)
            yield piece

    writing = threading.Thread(target=OutputWriter(tmp_path).write_pieces, args=("x.json", pieces()))
    writing.start()
    try:
        pause = threading.Event()
        for _ in range(1000):
            if len(made) >= 10:
                break
            pause.wait(0.01)
        pause.wait(0.2)  # time for the renderer to run further, if it (wrongly) would
        # The first half-chunk is only copied (written at once); the second fills the chunk, whose write is held;
        # the 3rd to 9th wait behind it (4 chunks' worth in all), and the 10th is made and waits to be handed over.
        assert len(made) == 10
    finally:
        release.set()
        writing.join(30)
    assert (tmp_path / "x.json").read_bytes() == b"".join(pieces_of(sizes))


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(0, 3 * CHUNK), max_size=8), chunks=st.integers(1, 3))
def test_any_pieces_are_written_exactly(sizes: list[int], chunks: int) -> None:
    with tempfile.TemporaryDirectory() as directory, pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(writer_module, "DIRECT_CHUNK_BYTES", chunks * CHUNK)
        monkeypatch.setattr(writer_module, "WRITE_AHEAD_BYTES", CHUNK)
        pieces = pieces_of(sizes)
        path = OutputWriter(directory).write_pieces("x.json", iter(pieces))
        assert path.read_bytes() == b"".join(pieces)


def test_a_real_size_all_json_written_directly_is_the_rendered_document(tmp_path: Path) -> None:
    """With the writer's own chunk and write-ahead sizes: a ~23 MB all.json (several direct chunks and a tail)
    streamed from `render_pieces` holds exactly `render`'s bytes."""
    objects = [map_resource(raw, MappingSettings()) for raw in generate_resources(12_000, seed=7)]
    document = snapshot_envelope(objects, date=START)
    expected = render(document)
    assert len(expected) > 2 * writer_module.DIRECT_CHUNK_BYTES
    path = OutputWriter(tmp_path).write_pieces(snapshot_file_name(START), render_pieces(document))
    assert path.read_bytes() == expected
    assert mode_of(path) == 0o640 and leftovers(tmp_path) == []
