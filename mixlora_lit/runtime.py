"""Process-level settings that make CPU training faster.

`tune_cpu_allocator()` keeps freed memory inside the process. By default glibc's malloc serves
every block above 32 MB (the logits and the loss buffers) with a fresh `mmap` and gives it back on
free, and it trims the heap whenever more than twice the current mmap threshold lies free at its top.
A training step allocates and frees the same large activations over and over, so each step pays
the kernel for zero-filled pages again: on the 2-core benchmark machine the frozen SmolLM2 step
took 3.93 s with the setting and 5.76 s without (two runs of benchmarks/bench_step.py, kept in
reports/). The cost: the process keeps its high-water mark of memory instead of returning it
between steps (peak RSS of that step 4584 MB instead of 3778 MB).

The `mixlora-lit` command applies it at start-up (on Linux with glibc);
`MIXLORA_LIT_MALLOC_TUNING=0` turns it off. Library users can call it themselves.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4

_state: dict[str, bool] = {}


def tune_cpu_allocator() -> bool:
    """Serve all allocations from the heap and never trim it; True if the setting is in effect.

    Does nothing (returns False) off Linux, without glibc, or with MIXLORA_LIT_MALLOC_TUNING=0.
    """
    if "tuned" in _state:
        return _state["tuned"]
    tuned = False
    if sys.platform.startswith("linux") and os.environ.get("MIXLORA_LIT_MALLOC_TUNING", "1") != "0":
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
            version = libc.gnu_get_libc_version  # glibc only (musl's mallopt ignores these)
        except (OSError, AttributeError):
            mallopt = version = None
        if mallopt is not None and version is not None:
            mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            tuned = all([mallopt(_M_MMAP_MAX, 0),  # no mmap'ed chunks: freed blocks are reused
                         mallopt(_M_TRIM_THRESHOLD, 2**31 - 1),  # never give the heap top back
                         mallopt(_M_TOP_PAD, 64 << 20)])  # grow the heap 64 MB at a time
    _state["tuned"] = tuned
    return tuned


def allocator_tuned() -> bool:
    """Whether `tune_cpu_allocator()` has put the setting in effect in this process."""
    return _state.get("tuned", False)


def die_with_parent(env_var: str = "MIXLORA_LIT_PARENT_PID") -> None:
    """If `env_var` names a parent process, end this process with SIGKILL when that parent dies
    (Linux `PR_SET_PDEATHSIG`): a sweep trial never outlives its killed worker."""
    import signal

    parent = os.environ.pop(env_var, None)  # not inherited by this process's own children (DDP ranks)
    if not parent:
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != int(parent):  # the parent died before the call above
        os._exit(1)
