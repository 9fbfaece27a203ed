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


def hub_repo_library(repo_id: str) -> str | None:
    """"open_clip" or "timm" from a hub repo's files, or None when they can't be seen.

    An `open_clip_config.json` means open_clip; a `config.json` with a top-level "architecture" and no
    open_clip config is timm's hub layout. The local cache is read first; the hub is asked only when
    the cache holds neither file and the hub is reachable.
    """
    import json

    from huggingface_hub import constants, try_to_load_from_cache

    repo = repo_id.partition("@")[0]  # open_clip/timm accept a revision after "@"
    oc_cfg, cfg_path = (try_to_load_from_cache(repo, name) for name in ("open_clip_config.json", "config.json"))
    if isinstance(oc_cfg, str):
        return "open_clip"
    if not isinstance(cfg_path, str):
        if constants.HF_HUB_OFFLINE or not hub_reachable():
            return None
        from huggingface_hub import HfApi, hf_hub_download

        try:
            files = set(HfApi().list_repo_files(repo))
            if "open_clip_config.json" in files:
                return "open_clip"
            if "config.json" not in files:
                return None
            cfg_path = hf_hub_download(repo, "config.json")
        except (OSError, ValueError) as e:  # HfHubHTTPError is an OSError; bad repo ids a ValueError
            logger.info("cannot list %s on the hub: %s", repo, e)
            return None
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return None
    return "timm" if isinstance(cfg, dict) and isinstance(cfg.get("architecture"), str) else None
