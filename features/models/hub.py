"""The Hugging Face hub, reached or not: sources that download from it (timm, open_clip) go offline
(cache only) at once when it cannot be reached, instead of retrying for a minute."""

from __future__ import annotations

import contextlib


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub (or the mirror HF_ENDPOINT names) answers a TCP connection within
    ``timeout`` seconds, name lookup included (which has no timeout of its own, hence the thread)."""
    import socket
    import threading
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    url = urlsplit(constants.ENDPOINT)
    address = (url.hostname or "", url.port or (443 if url.scheme == "https" else 80))
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
