"""The Hugging Face hub, reached or not: sources that download from it (timm, open_clip) go offline
(cache only) at once when it cannot be reached, instead of retrying for a minute."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import TypeVar

from ..errors import TapsError, UsageError
from ..runtime import reachable

T = TypeVar("T")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub (or the mirror HF_ENDPOINT names) answers within ``timeout`` seconds."""
    from huggingface_hub import constants

    return reachable(constants.ENDPOINT, timeout)


@contextlib.contextmanager
def offline_unless_reachable():
    """Hub downloads in offline mode (cache only) when the hub cannot be reached: without it a missing
    checkpoint costs about a minute of retries and a screen of their messages before failing."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or hub_reachable():
        yield False
        return
    constants.HF_HUB_OFFLINE = True
    try:
        yield True
    finally:
        constants.HF_HUB_OFFLINE = False


def cached_checkpoint(repo_id: str, names: Sequence[str]) -> str | None:
    """The local Hugging Face cache's copy of the first of ``names`` that ``repo_id`` (``org/name``, or
    ``org/name@revision``) has there, or None: what a source downloads is on disk, or it is not."""
    from huggingface_hub import try_to_load_from_cache

    repo, _, revision = repo_id.partition("@")
    found = (try_to_load_from_cache(repo, name, revision=revision or None) for name in names)
    return next((path for path in found if isinstance(path, str)), None)


def from_hub(call: Callable[[], T], refusal: Callable[[str], str]) -> T:
    """``call()`` (a download or a cache read), offline at once when the hub cannot be reached; a
    failure becomes one line, ``refusal(reason)`` (a usage error passes through as it is)."""
    offline = False
    try:
        with offline_unless_reachable() as offline:
            return call()
    except UsageError:
        raise
    except Exception as exc:  # hub, network and format errors come in many types
        reason = "the hub cannot be reached from here" if offline else \
            (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise TapsError(refusal(reason[:200])) from None
