"""Data-parallel CPU extraction (``--loader replicas``): one replica of the extractor per core.

On a CPU the inline loader spreads each batch's forward pass over every core with
intra-op threads and decodes the next batch between passes. Here each of ``workers``
spawned processes holds its own extractor running on ``cores // workers`` threads
and both decodes and embeds whole blocks; the parent's write loop receives them in
sample order, as from any engine. Two reasons it
is faster on small CPUs: one-thread replicas skip the intra-op synchronisation of a
shared pass, and one replica's decoding overlaps another's forward instead of
waiting for it (docs/performance.md has the figures).

Each block is computed by one single-threaded replica, so values do not depend on
which replica took it: a resumed run writes the same rows as an uninterrupted one.
They may differ from the inline loader's at the rounding level (another reduction
order), which is why ``auto`` picks a loader by dataset size, not by what is left.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..backbones import Backbone, Tap
from ..blocks import Block, BlockSource, block_ranges, prepare_forward
from ..datasets import ImageSet
from ..errors import TapsError, UsageError
from ..options import RunConfig
from ..runtime import keep_freed_memory
from . import Engine

# A replica imports torch, builds its extractor and compiles it: minutes on a slow machine
# with a cold Inductor cache. Past this, startup is taken as stuck.
STARTUP_TIMEOUT_SECONDS = 1800

_replica: dict = {}  # this process's state, when it is a replica


def _watch_parent(parent: int) -> None:
    """Exit once the parent is gone (killed with SIGKILL, say): nobody would read our results."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


@dataclass(frozen=True)
class _Setup:
    """What a replica needs to build its extractor (pickled once per replica at spawn)."""

    backbone_args: tuple
    taps: list[Tap]
    cfg: RunConfig
    threads: int
    images: ImageSet


def _start(setup: _Setup, barrier, parent: int) -> None:
    """Replica initialiser. Errors are kept and raised by the first task, where the parent sees them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the parent stops us
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    _replica["barrier"] = barrier
    try:
        torch.set_num_threads(setup.threads)
        backbone = Backbone(*setup.backbone_args)
        # For the replica's lifetime, as extract() does for a run, and before the compile's blank
        # batch, which then leaves the heap the first real batch reuses.
        _replica["memory"] = keep_freed_memory()
        _replica["memory"].__enter__()
        _replica["forward"] = prepare_forward(backbone, setup.taps, setup.cfg, len(setup.images))
        _replica["source"] = BlockSource.of(setup.images, backbone.pixel_transform(), setup.cfg)
    except Exception as exc:  # noqa: BLE001 - re-raised in the parent by _checked()
        _replica["error"] = exc


def _checked() -> dict:
    if "error" in _replica:
        raise _replica["error"]
    return _replica


def _ready() -> float:
    """Blocks until every replica runs one: each is then past its start-up. -> its compile time."""
    state = _checked()
    state["barrier"].wait()
    return state["forward"].compile_seconds


def _embed(lo: int, hi: int) -> Block:
    state = _checked()
    return state["source"].embed(state["source"].load(lo, hi), state["forward"])


def _timed_forward(blocks: list[tuple[int, int]]) -> tuple[int, float]:
    """Decode ``blocks`` untimed, wait for the other replicas, then time the forward passes alone."""
    state = _checked()
    source, forward = state["source"], state["forward"]
    batches = [b for b in (source.load(lo, hi)[0] for lo, hi in blocks) if b is not None]
    if batches:  # warm-up: the first pass after a pause allocates, later ones reuse
        forward(batches[0])
    state["barrier"].wait()
    t0 = time.perf_counter()
    for batch in batches:
        forward(batch)
    return sum(len(b) for b in batches), time.perf_counter() - t0


@contextmanager
def _ctrl_c_as_flag():
    """While waiting on replicas, Ctrl-C only sets the flag it yields; callers raise KeyboardInterrupt
    where it is safe. Python's own handler would raise it wherever the idle main thread happens to be,
    and inside a weakref or GC callback it is printed and dropped: the run would go on."""
    flag = threading.Event()
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):  # ignored, or the caller's own
        yield flag
        return
    previous = signal.signal(signal.SIGINT, lambda *_: flag.set())
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def _result(future: Future, interrupted: threading.Event, timeout: float | None = None):
    """``future.result()``, raising KeyboardInterrupt within a fraction of a second of Ctrl-C."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        if interrupted.is_set():
            raise KeyboardInterrupt
        try:
            return future.result(timeout=0.2)
        except FutureTimeout:
            if deadline is not None and time.monotonic() > deadline:
                raise


class ReplicaEngine(Engine):
    """``cfg.workers`` (or ``replicas``) spawned processes, each with its own extractor.

    Replicas ignore SIGINT (a terminal sends it to the whole process group) and exit when
    the parent dies, so an interrupted run leaves no strays; leaving the ``with`` block
    (normally or not) stops them at once.
    """

    def __init__(self, images: ImageSet, backbone: Backbone, taps: list[Tap], cfg: RunConfig,
                 replicas: int | None = None):
        super().__init__(images, backbone, taps, cfg)
        self.replicas = max(1, replicas or cfg.workers)
        threads = max(1, torch.get_num_threads() // self.replicas)
        ctx = multiprocessing.get_context("spawn")  # fork is unsafe once torch's thread pools exist
        self._executor = ProcessPoolExecutor(
            self.replicas, mp_context=ctx, initializer=_start,
            initargs=(_Setup(backbone.spec_args(), taps, cfg, threads, images), ctx.Barrier(self.replicas),
                      os.getpid()))
        t0 = time.perf_counter()
        try:
            try:  # submitting spawns the processes, which pickles the dataset for them
                ready = [self._executor.submit(_ready) for _ in range(self.replicas)]
            except (pickle.PicklingError, AttributeError, TypeError) as exc:
                raise UsageError(f"this dataset cannot be sent to replica processes ({exc}); "
                                 "use --loader inline") from None
            with _ctrl_c_as_flag() as interrupted:
                self.compile_seconds = max(_result(f, interrupted, STARTUP_TIMEOUT_SECONDS) for f in ready)
        except BaseException:
            self.close()
            raise
        self.startup_seconds = time.perf_counter() - t0

    def blocks(self, start: int) -> Iterator[Block]:
        ranges = iter(block_ranges(start, len(self.images), self.cfg.batch_size))
        pending: deque[Future] = deque()
        try:
            with _ctrl_c_as_flag() as interrupted:
                while True:
                    while len(pending) < 2 * self.replicas and (rows := next(ranges, None)) is not None:
                        pending.append(self._executor.submit(_embed, rows.start, rows.stop))
                    if not pending:
                        return
                    yield _result(pending.popleft(), interrupted)
        except BrokenProcessPool:
            raise TapsError("a replica process died (out of memory?); finished batches are kept: rerun to resume, "
                            "or use --loader inline") from None

    def forward_rate(self, start: int, stop: int) -> float:
        """Images/s of the bare forward passes over [start, stop), all replicas at once (a ceiling)."""
        blocks = [(r.start, r.stop) for r in block_ranges(start, stop, self.cfg.batch_size)]
        shares = [blocks[k::self.replicas] for k in range(self.replicas)]
        done = [f.result() for f in [self._executor.submit(_timed_forward, s) for s in shares]]
        return sum(n for n, _ in done) / max(s for _, s in done)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        # Running tasks cannot be cancelled and shutdown() has no public way to stop the
        # processes before Python 3.14 (terminate_workers), so stop them directly.
        for proc in list((getattr(self._executor, "_processes", None) or {}).values()):
            proc.terminate()
        for proc in list((getattr(self._executor, "_processes", None) or {}).values()):
            proc.join(timeout=10)
