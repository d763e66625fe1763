"""Whether the Hugging Face hub may be used, and a refusal that names the config key when it may not.

synthflaw sets ``HF_HUB_OFFLINE=1`` on import unless the environment says otherwise (the embedded study needs no
hub, and a hub call without network hangs ~47 s before failing). Every loader that could be handed a hub id asks
:func:`require_hub` first, so an offline machine gets a message naming the key and the fix instead of a hang or a
cache-miss error from deep inside `huggingface_hub`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# A hub id: `name` or `owner/name`. Anything else that is not an existing path is a path that does not exist.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?")


class HubOffline(RuntimeError):
    """A configured name is a hub id, but the hub is switched off (HF_HUB_OFFLINE=1)."""


def hub_offline() -> bool:
    """Whether hub downloads are off: HF_HUB_OFFLINE now, or as `huggingface_hub` read it when it was imported."""
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
    return flag or bool(constants.HF_HUB_OFFLINE)


def is_hub_name(name: str) -> bool:
    """A non-empty name that is not a local path: loaders would look it up on the hub."""
    return bool(name) and not Path(name).expanduser().exists()


def require_hub(key: str, name: str) -> None:
    """Raise HubOffline at once when `name` (the value of config key `key`) is not a local path and the hub is off."""
    if is_hub_name(name) and hub_offline():
        raise HubOffline(
            f"{key}={name!r} is not a local path, so it would be downloaded from the Hugging Face hub, but the hub is "
            "off (HF_HUB_OFFLINE=1, synthflaw's default). Run with HF_HUB_OFFLINE=0 set in the environment before "
            f"Python starts (e.g. `HF_HUB_OFFLINE=0 synthflaw run --preset paper ...`), or set {key} to a local "
            "folder or file.")


def model_name_problem(key: str, name: str) -> str | None:
    """Why the model `name` (the value of config key `key`) cannot be loaded, found before any step runs, or None:
    a path that does not exist (a name that is no hub id: absolute, starting with '.' or '~', or with two '/'),
    or a hub id while the hub is off."""
    if not name or Path(name).expanduser().exists():
        return None
    if not HUB_ID.fullmatch(name):
        return (f"{key}={name!r} is not an existing file or folder (nor a hub id, which is name or owner/name): "
                "give the path of a local model folder")
    try:
        require_hub(key, name)
    except HubOffline as error:
        return str(error)
    return None
