"""Running out of memory is the user's limit, not a bug: one message naming what ran out,
during which work, what is kept, and the options that need less (`memory_faults_named`).

Recognised in an error or anything that caused it: ``MemoryError`` (Python, numpy,
pyarrow), torch's CPU allocator failure (a ``RuntimeError`` "DefaultCPUAllocator: can't
allocate memory"), CUDA out of memory, and ``ENOMEM`` from the kernel or from Rust
libraries (safetensors, tokenizers).
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from fusion.artifacts.records import StoreError
from fusion.errors import causes

_RAM_WORDS = ("DefaultCPUAllocator", "can't allocate memory", "Cannot allocate memory", "std::bad_alloc",
              "os error 12")
_GPU_WORDS = ("CUDA out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "HIP out of memory")


class OutOfMemory(StoreError):  # noqa: N818 - named like what happened, as MemoryError is
    """The work needed more memory than the machine or its limit gives (the message says
    which memory, what is kept and what needs less)."""


def ran_out(err: BaseException) -> str | None:
    """``"memory (RAM)"`` or ``"GPU memory"`` when ``err`` or what caused it is an
    out-of-memory error; None for any other error."""
    for current in causes(err):
        text = str(current)
        if type(current).__name__ == "OutOfMemoryError" or any(w in text for w in _GPU_WORDS):
            return "GPU memory"
        if isinstance(current, MemoryError) or (isinstance(current, OSError) and current.errno == errno.ENOMEM):
            return "memory (RAM)"
        if isinstance(current, RuntimeError | OSError) and any(w in text for w in _RAM_WORDS):
            return "memory (RAM)"
    return None


def _detail(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[0] if lines else type(err).__name__
    if text.startswith("[enforce fail"):  # torch's C++ location and check: "...] err == 0. DefaultCPU..."
        text = text.split("] ", 1)[-1].removeprefix("err == 0. ")
    return text if len(text) <= 160 else text[:157] + "..."


@contextmanager
def memory_faults_named(doing: str, kept: Callable[[], str], less: Callable[[], str]) -> Iterator[None]:
    """Run the block; running out of memory in it becomes `OutOfMemory`: "out of memory
    (RAM) while ``doing`` (what failed); ``kept()``; to need less: ``less()``" (no
    traceback on the terminal: the caller's log keeps it)."""
    try:
        yield
    except Exception as err:
        what = ran_out(err)
        if what is None or type(err).__module__.startswith(("fusion.", "fusechat_merge.")):
            raise  # not memory, or our own message already (the halved CUDA batch names its options)
        raise OutOfMemory(f"out of {what} while {doing} ({_detail(err)}); {kept()}; to need less: "
                          f"{less()}") from err
