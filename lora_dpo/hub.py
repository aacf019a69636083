"""The Hugging Face hub, never waited on. Before anything that may download, `prepare()` checks once per process
that the hub answers within a few seconds; when it does not (no network), or `HF_HUB_OFFLINE=1` is set, the
libraries are switched to offline mode, so they read their local cache and fail at once instead of retrying for a
minute. `unavailable()` turns what they raise then into one line that says what was needed and what to do.
"""

from __future__ import annotations

import functools
import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

from lora_dpo.errors import LoraDpoError
from lora_dpo.recipe import ModelRecipe

TIMEOUT_S = 3.0  # a hub that has not answered by then is treated as absent
TRUE = ("1", "true", "yes", "on")


class HubUnavailableError(LoraDpoError):
    """Something lives on the hub and the hub cannot be reached (or offline mode is on) and it is not cached."""


def _endpoint() -> tuple[str, int]:
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    return url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)


def is_hub_id(source: str) -> bool:
    """`owner/name`, and not a path on this machine: what the hub libraries would try to download."""
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", source)) and not Path(source).exists()


@functools.cache
def online() -> bool:
    """The hub answers (a TCP connection within TIMEOUT_S), and offline mode is not asked for."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in TRUE:
        return False
    try:
        socket.create_connection(_endpoint(), timeout=TIMEOUT_S).close()
    except OSError:
        return False
    return True


def prepare() -> bool:
    """Call before a hub id is loaded: offline, switch huggingface_hub, transformers, diffusers and datasets to
    their offline mode (cached files still load). Returns whether the hub is reachable."""
    if online():
        return True
    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    import huggingface_hub.constants

    huggingface_hub.constants.HF_HUB_OFFLINE = True  # read once at import; the libraries consult this one
    return False


def preflight(source: str | None, filename: str, what: str) -> None:
    """Before any heavy import: a hub id (not a local path) that is needed while the hub is offline must be in the
    local cache (its `filename` at least), or this raises at once."""
    if source is None or not is_hub_id(source) or prepare():
        return
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(source, filename), str):
        raise unavailable(source, what)


def preflight_model(model: ModelRecipe) -> None:
    """`preflight` for a recipe's base and VAE (a built-in tiny base's name is no hub id: built here, never
    downloaded)."""
    preflight(model.base, "model_index.json", "the base pipeline")
    preflight(model.vae, "config.json", "the VAE")


# how every offline error says why the hub counts as offline
OFFLINE_HERE = f"the Hugging Face hub, which is offline here (no answer within {TIMEOUT_S:g} s, or HF_HUB_OFFLINE=1)"


def unavailable(source: str, what: str) -> HubUnavailableError:
    """The one-line error for a hub id that could not be loaded while offline."""
    return HubUnavailableError(
        f"{source}: {what} comes from {OFFLINE_HERE}, and it is not in the local cache; connect and run again (it "
        "is cached after), or pass a local folder or file")
