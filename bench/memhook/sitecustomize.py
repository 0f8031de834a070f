"""Heap census inside a daemon process started by the soak, for finding what grows (bench only, never installed).

    uv run python bench/soak.py ... --env PYTHONPATH=bench/memhook --env CSCS_MEMHOOK_DIR=/tmp/memhook

Python imports `sitecustomize` at start-up from the path, so with this directory on PYTHONPATH every process of
the soak's daemon runs a thread that, every ``CSCS_MEMHOOK_INTERVAL`` seconds (default 60), collects garbage and
appends one JSON line to ``$CSCS_MEMHOOK_DIR/<pid>.jsonl``: the RSS, glibc's malloc figures (in use, free but
kept), the object count by type, and every container (dict, list, set, deque) holding at least
``CSCS_MEMHOOK_MIN_LEN`` (default 300) items, with the name it is held under (attribute of an object, or key of a
dict). A container whose length keeps growing in a steady state is a leak; so is a type whose count does; malloc's
"free but kept" growing while "in use" stays put is fragmentation. ``CSCS_MEMHOOK_TRACEMALLOC=N`` also traces
allocations with N frames (slow) and adds the top allocation sites.
"""

from __future__ import annotations

import os

if os.environ.get("CSCS_MEMHOOK_DIR"):
    import collections
    import gc
    import json
    import threading
    import time
    import tracemalloc

    _DIR = os.environ["CSCS_MEMHOOK_DIR"]
    _INTERVAL = float(os.environ.get("CSCS_MEMHOOK_INTERVAL", "60"))
    _MIN_LEN = int(os.environ.get("CSCS_MEMHOOK_MIN_LEN", "300"))
    _FRAMES = int(os.environ.get("CSCS_MEMHOOK_TRACEMALLOC", "0"))

    def _rss_kb() -> int:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def _mallinfo() -> dict[str, int]:
        """glibc's view (mallinfo2): bytes in use by malloc, bytes free but kept, bytes in mmapped blocks."""
        try:
            import ctypes

            class _Info(ctypes.Structure):
                _fields_ = [
                    (name, ctypes.c_size_t)
                    for name in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
                ]

            libc = ctypes.CDLL("libc.so.6")
            libc.mallinfo2.restype = _Info
            info = libc.mallinfo2()
            return {
                "in_use_kb": info.uordblks // 1024,
                "free_kb": info.fordblks // 1024,
                "mmap_kb": info.hblkhd // 1024,
            }
        except (OSError, AttributeError):
            return {}

    def _holder(obj: object) -> str:
        """Where a container is held: 'Type.attr', or 'dict[key]', or the referrer's type."""
        names = []
        for ref in gc.get_referrers(obj):
            if isinstance(ref, dict):
                for key, value in ref.items():
                    if value is obj:
                        owners = [o for o in gc.get_referrers(ref) if getattr(o, "__dict__", None) is ref]
                        owner = type(owners[0]).__qualname__ if owners else "dict"
                        names.append(f"{owner}.{key}")
                        break
            elif type(ref).__name__ not in ("frame", "list") or len(names) < 1:
                slots = getattr(type(ref), "__slots__", ())
                for slot in slots if isinstance(slots, tuple) else ():
                    if getattr(ref, slot, None) is obj:
                        names.append(f"{type(ref).__qualname__}.{slot}")
                        break
            if len(names) >= 3:
                break
        return " | ".join(names) or "?"

    def _census() -> dict[str, object]:
        gc.collect()
        counts: collections.Counter[str] = collections.Counter()
        big = []
        objects = gc.get_objects()
        # Dicts holding only atomic values (str -> str, say) are not tracked by the collector: reach them
        # through whatever holds them.
        untracked = {}
        for obj in objects:
            for child in gc.get_referents(obj):
                if type(child) is dict and not gc.is_tracked(child):
                    untracked[id(child)] = child
        for obj in [*objects, *untracked.values()]:
            kind = type(obj)
            counts[kind.__qualname__] += 1
            if kind in (dict, list, set, collections.deque) or isinstance(obj, (dict, set)):
                try:
                    size = len(obj)  # type: ignore[arg-type]
                except TypeError:
                    continue
                if size >= _MIN_LEN:
                    big.append((size, kind.__qualname__, id(obj), obj))
        big.sort(key=lambda item: item[0], reverse=True)
        containers = [
            {"len": size, "type": name, "id": ident, "held_as": _holder(obj)} for size, name, ident, obj in big[:40]
        ]
        del big
        record: dict[str, object] = {
            "t": time.time(),
            "rss_kb": _rss_kb(),
            "threads": threading.active_count(),
            "malloc": _mallinfo(),
            "objects": sum(counts.values()),
            "types": dict(counts.most_common(60)),
            "containers": containers,
        }
        if _FRAMES and tracemalloc.is_tracing():
            stats = tracemalloc.take_snapshot().statistics("traceback")[:30]
            record["traced_kb"] = tracemalloc.get_traced_memory()[0] // 1024
            record["top"] = [
                {"kb": s.size // 1024, "count": s.count, "where": s.traceback.format()[-2 * _FRAMES :]} for s in stats
            ]
        return record

    def _loop() -> None:
        os.makedirs(_DIR, exist_ok=True)
        path = os.path.join(_DIR, f"{os.getpid()}.jsonl")
        while True:
            time.sleep(_INTERVAL)
            try:
                line = json.dumps(_census())
            except Exception as exc:  # a census must never take the process down
                line = json.dumps({"t": time.time(), "error": repr(exc)})
            with open(path, "a") as handle:
                handle.write(line + "\n")

    if _FRAMES:
        tracemalloc.start(_FRAMES)
    threading.Thread(target=_loop, name="memhook", daemon=True).start()
