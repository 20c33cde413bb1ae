"""Memory accounting for benchmarks and tests (issue 20): saved-activation bytes and peak memory.

``SavedBytes`` counts the bytes autograd keeps for the backward while a block runs, through
``torch.autograd.graph.saved_tensors_hooks``: every tensor packed for the backward is counted once
per distinct storage (views of one buffer are one allocation), parameters and buffers of the
modules passed as ``exclude`` are not counted (they exist anyway). The count is exact on any device
and dtype: in fp32 it is the activation memory a GPU would hold for the same graph, 1:1. Tensors
packed inside an activation-checkpointed region are not counted (checkpointing's own hooks take
them and drop them): what remains is what checkpointing keeps. Bytes can be attributed to tags:
``with sb.tag("mlp"): ...`` or ``sb.wrap(obj, "method", "mlp")``; the innermost tag wins, untagged
bytes go to ``"other"``.

``peak_rss_reset()`` / ``peak_rss_bytes()``: the process's resident-set high-water mark (Linux
VmHWM; reset through /proc/self/clear_refs), for CPU peaks of one phase; call ``exact_rss_mode()``
once first, so that freed memory leaves the resident set (glibc keeps it otherwise).
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Iterable

import torch
from torch import Tensor, nn


class SavedBytes:
    """Bytes saved for the backward inside ``with SavedBytes() as sb:``, in ``sb.total`` and ``sb.by_tag``."""

    def __init__(self, exclude: Iterable[nn.Module] = ()):
        self.by_tag: dict[str, int] = defaultdict(int)
        self._seen: set[tuple[str, int]] = set()
        self._excluded: set[tuple[str, int]] = set()
        for m in exclude:
            for t in (*m.parameters(), *m.buffers()):
                self._excluded.add(self._key(t))
        self._tags: list[str] = []
        self._ctx = None

    @staticmethod
    def _key(t: Tensor) -> tuple[str, int]:
        return str(t.device), t.untyped_storage().data_ptr()

    @property
    def total(self) -> int:
        return sum(self.by_tag.values())

    def _pack(self, t: Tensor) -> Tensor:
        key = self._key(t)
        if key not in self._seen and key not in self._excluded:
            self._seen.add(key)
            self.by_tag[self._tags[-1] if self._tags else "other"] += t.untyped_storage().nbytes()
        return t

    def tag(self, name: str):
        sb = self

        class _Tag:
            def __enter__(self):
                sb._tags.append(name)

            def __exit__(self, *exc):
                sb._tags.pop()

        return _Tag()

    def wrap(self, obj, method: str, name: str) -> None:
        """Attribute what ``obj.method`` saves to ``name`` (an instance attribute shadows the method)."""
        fn = getattr(obj, method)

        @functools.wraps(fn)
        def tagged(*args, **kwargs):
            with self.tag(name):
                return fn(*args, **kwargs)

        setattr(obj, method, tagged)

    def __enter__(self) -> SavedBytes:
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._ctx.__exit__(*exc)
        self._ctx = None


def exact_rss_mode() -> bool:
    """Make the CPU resident set follow the live tensors (glibc): allocations of 128 KiB and more are mmapped and
    returned on free (a fixed M_MMAP_THRESHOLD; glibc otherwise raises it up to 32 MiB after large frees and keeps
    those pages, so a later block reuses them without raising the peak). False where it cannot be set."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, 128 * 1024))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def release_free_memory() -> None:
    """Hand freed heap pages back to the OS (glibc malloc_trim), so that the next peak starts from live memory."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_rss_reset() -> bool:
    """Reset the process's peak RSS (VmHWM) to its current RSS; False where the kernel does not allow it."""
    release_free_memory()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_rss_bytes() -> int | None:
    """Peak RSS (VmHWM) in bytes since the start or the last ``peak_rss_reset``; None off Linux."""
    kib = _status_kib("VmHWM")
    return None if kib is None else kib * 1024


def rss_bytes() -> int | None:
    """Current RSS (VmRSS) in bytes; None off Linux."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024
