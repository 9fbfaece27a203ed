"""Hub reachability: fail in seconds, not after minutes of HTTP retries, when there is no network."""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Iterator
from urllib.parse import urlparse

logger = logging.getLogger(__name__)


def hub_reachable(timeout: float = 3.0) -> bool:
    """True if a TCP connection to the Hugging Face endpoint opens within `timeout` seconds."""
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def offline_unless_reachable() -> Iterator[bool]:
    """Run hub loads in offline mode when the hub can't be reached; yields whether it is offline.

    huggingface_hub retries failed requests with backoff (about 20 s each); with no network a model
    load would take minutes before failing. Offline mode makes cached models load at once and
    uncached ones fail at once. The flag is module state in huggingface_hub, so it is restored after.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        yield True
        return
    if hub_reachable():
        yield False
        return
    logger.info("%s is unreachable: using the local cache only", constants.ENDPOINT)
    constants.HF_HUB_OFFLINE = True
    try:
        yield True
    finally:
        constants.HF_HUB_OFFLINE = False
