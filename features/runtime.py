"""Process-level settings for fast CPU inference: OpenMP's idle spinning and glibc's allocator.

OpenMP (libgomp, which the PyTorch wheels ship) keeps a thread spinning for 300,000
iterations after each parallel region before it sleeps. On a CPU the extraction
alternates forward passes with decoding on the same cores, so spinning workers of the
forward's thread team take cycles from the decode threads. :func:`limit_openmp_spinning`
shortens the spin; libgomp reads it once, when it loads, so the CLI calls it before
anything imports torch (docs/performance.md has what it was measured to be worth).

glibc serves every allocation above its mmap threshold (at most 32 MB) with a
fresh ``mmap`` and returns it with ``munmap`` when freed. A CPU forward pass
allocates activations of tens of MB for every batch, so each one is faulted in
again page by page, and the kernel time of those faults can be a large share of a
pass (``make bench`` counts them per batch with and without). PyTorch's tuning guide
answers this with jemalloc or tcmalloc; :func:`keep_freed_memory` gets the same
effect from glibc itself for the duration of a run, with no preloaded library.

Also what a run asks of this machine's surroundings: the CPU's description, the memory it has,
and whether a server (the Hugging Face hub, an MLflow tracking server) answers from here.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from contextlib import contextmanager
from pathlib import Path

OPENMP_SPIN_COUNT = "2000"
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4          # mallopt parameters from <malloc.h>
DEFAULT_TRIM_THRESHOLD, DEFAULT_MMAP_MAX = 128 * 1024, 65536


def limit_openmp_spinning() -> None:
    """Shorten libgomp's idle spinning unless the user set it. Takes effect only if torch
    (which loads libgomp) is not imported yet."""
    if "OMP_WAIT_POLICY" not in os.environ:  # an explicit wait policy implies its own spin count
        os.environ.setdefault("GOMP_SPINCOUNT", OPENMP_SPIN_COUNT)


def _glibc():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


@contextmanager
def keep_freed_memory():
    """Serve large blocks from the heap and keep freed ones for reuse; restore glibc's defaults after.

    Peak memory is unchanged (the same blocks are live at the peak); freed memory just
    stays with the process until the end of the block, where it is trimmed. A no-op
    outside glibc (macOS, Windows, musl).
    """
    libc = _glibc()
    if libc is None:
        yield
        return
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
        libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
        libc.malloc_trim(0)


def available_memory_bytes() -> int:
    """Memory a new allocation can have: the kernel's MemAvailable (free pages plus the page cache
    it can drop), else the free pages, else 8 GiB where the OS says neither."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def cpu_description() -> str:
    """The CPU model and the vector extensions that decide the fast precisions and kernels (lscpu's view)."""
    info = Path("/proc/cpuinfo")
    if not info.is_file():
        return platform.processor() or platform.machine()
    fields = dict(line.split(":", 1) for line in info.read_text().splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "avx_vnni") if f in flags]
    return f"{fields.get('model name', platform.machine())}; {' '.join(isa) or 'no avx2'}"


def reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether the server of ``url`` answers a TCP connection within ``timeout`` seconds, name lookup
    included (which has no timeout of its own, hence the thread): a client library that retries an
    unreachable server for minutes is asked only after this says yes."""
    import socket
    import threading
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    address = (parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80))
    reached = threading.Event()

    def connect() -> None:
        try:
            socket.create_connection(address, timeout=timeout).close()
            reached.set()
        except OSError:
            pass

    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(timeout + 0.5)
    return reached.is_set()
