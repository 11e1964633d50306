"""The one exception type a user can cause and must read, and how to recognise a full disk."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path


class StudioError(Exception):
    """A problem the user can fix, described in one sentence: what is wrong and what to do.

    The UI shows ``str(error)`` as it is and the CLI prints it without a traceback, so the
    message must stand on its own.
    """


DISK_FULL = "The disk is full; free space and resume the run (the checkpoints saved before are kept)."
_FULL_TEXTS = ("No space left on device", "os error 28", "code: 28", "StorageFull", "Disk quota exceeded")


def disk_full(exc: BaseException, folder: Path | None = None) -> bool:
    """Whether `exc` (or what caused it) is a write that failed for want of space.

    safetensors reports it as a SafetensorError whose text holds the OS error ("os error 28"), torch.save
    as a RuntimeError that names no cause ("unexpected pos 640 vs 534"): for those, the free space of
    `folder` decides (under 1 MiB left).
    """
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(seen) for text in _FULL_TEXTS):
            return True
        seen = seen.__cause__ or seen.__context__
    if folder is not None and isinstance(exc, (OSError, RuntimeError)):
        try:
            return shutil.disk_usage(folder).free < 1 << 20
        except OSError:
            return False
    return False
