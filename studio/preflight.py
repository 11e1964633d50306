"""Checks that run before anything is loaded: a run that cannot start says so in a second, not after
minutes of loading a model.

- A hub id that is neither in this machine's cache nor reachable fails at once, in one sentence
  (without this, huggingface_hub retries the connection with a warning each time for minutes).
- Files a user names as weights must be safetensors: the header is read and checked (8 bytes of
  little-endian header length, then that many bytes of JSON), so a pickle renamed `.safetensors`
  is refused by name and never handed to a loader.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from studio.errors import StudioError

SAFETENSORS_HEADER_MAX = 100 * 1024 * 1024  # the safetensors library's own limit on the JSON header


def check_hub_model(name: str, what: str = "Model") -> None:
    """One sentence now if the hub id `name` cannot be loaded: not cached here and the hub unreachable."""
    if not is_hub_id(name) or Path(name).expanduser().exists():
        return
    if _cached(name):
        return
    from studio import models

    if not models.hub_reachable():
        raise StudioError(f"{what} '{name}' is not in this machine's model cache and the model hub cannot be "
                          "reached; connect to the internet, name a local folder, or use 'builtin'.")


def is_hub_id(name: str) -> bool:
    parts = str(name).strip().split("/")
    return len(parts) == 2 and all(parts) and not str(name).startswith((".", "~"))


def _cached(name: str) -> bool:
    """Whether the hub's cache holds the repository (any revision) with a config to load it by."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    for filename in ("model_index.json", "config.json"):
        try:
            if isinstance(try_to_load_from_cache(name, filename), str):
                return True
        except Exception:  # an id the hub library calls invalid: not cached, and it says why at load
            return False
    return False


def check_safetensors(path: Path, what: str = "File") -> None:
    """One sentence if `path` is not a safetensors file (a pickle, a truncated download, an HTML page)."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            head = handle.read(8)
            size = path.stat().st_size
            if len(head) < 8:
                raise _not_safetensors(path, what)
            (length,) = struct.unpack("<Q", head)
            if length > min(SAFETENSORS_HEADER_MAX, size - 8):
                raise _not_safetensors(path, what)
            header = json.loads(handle.read(length))
    except StudioError:
        raise
    except OSError as exc:
        raise StudioError(f"{what} '{path.name}' could not be read ({exc.strerror or exc}); check the file.") from None
    except (ValueError, UnicodeDecodeError):
        raise _not_safetensors(path, what) from None
    if not isinstance(header, dict):
        raise _not_safetensors(path, what)


def _not_safetensors(path: Path, what: str) -> StudioError:
    return StudioError(f"{what} '{path.name}' is not a safetensors file (its header is not one; it may be a "
                       "pickle or an incomplete download); the studio loads only safetensors, so get that "
                       "format of it.")
