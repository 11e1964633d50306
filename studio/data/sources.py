"""What a folder of photos holds, in any of the layouts the studio reads: the images, any captions
beside them and their repeats.

- plain photos: every image file in the folder;
- kohya: image + same-stem .txt caption pairs; a subfolder named 'N_name' repeats its images N times;
- Hugging Face imagefolder: images with a metadata.jsonl whose lines hold 'file_name' and a caption
  column ('text' here; 'caption' is read too).

The studio's own dataset folders write a metadata.jsonl too (`write_metadata`), so this module sits
below both `studio.data.dataset` (which imports folders) and `studio.data.formats` (which exports
datasets), and imports neither.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from studio import limits
from studio.data.images import HEIC_SUFFIXES
from studio.errors import StudioError
from studio.paths import IMAGE_SUFFIXES

METADATA = "metadata.jsonl"
READABLE_SUFFIXES = IMAGE_SUFFIXES + HEIC_SUFFIXES
_KOHYA_FOLDER = re.compile(r"^(\d+)_(.+)$")


@dataclass
class SourceFile:
    path: Path
    name: str  # shown to the user: relative to the source folder
    caption: str | None = None
    repeats: int = 1


def looks_like_image(path: Path) -> bool:
    """By suffix: files such as notes.txt in a photo folder are ignored, not reported."""
    return path.is_file() and path.suffix.lower() in READABLE_SUFFIXES


def read_source(src: Path) -> tuple[list[SourceFile], str]:
    """The images of a photo folder, a kohya folder or an imagefolder, with any captions and repeats.

    Returns the files and the format's name ('photos', 'kohya' or 'imagefolder').
    """
    src = Path(src)
    meta = next((m for m in (src / METADATA, src / "train" / METADATA) if m.is_file()), None)
    if meta is not None:
        return read_imagefolder(meta), "imagefolder"
    files = [_with_caption(p, src, 1) for p in sorted(src.iterdir()) if looks_like_image(p)]
    kohya = False
    for sub in sorted(p for p in src.iterdir() if p.is_dir()):
        match = _KOHYA_FOLDER.match(sub.name)
        if match:
            kohya = True
            repeats = max(1, int(match.group(1)))
            files += [_with_caption(p, src, repeats) for p in sorted(sub.iterdir()) if looks_like_image(p)]
    kohya = kohya or any(f.caption is not None for f in files)
    return files, "kohya" if kohya else "photos"


def _with_caption(path: Path, root: Path, repeats: int) -> SourceFile:
    caption = None
    for suffix in (".txt", ".caption"):
        text_file = path.with_suffix(suffix)
        if text_file.is_file():
            caption = " ".join(limits.read_caption(text_file).split())
            break
    return SourceFile(path, path.relative_to(root).as_posix(), caption, repeats)


def read_imagefolder(meta: Path) -> list[SourceFile]:
    """The files a metadata.jsonl names, with their captions and repeats; names outside its folder are refused."""
    folder, files = meta.parent, []
    for number, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            name = str(row["file_name"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise StudioError(f"Line {number} of '{meta}' is not a JSON object with a 'file_name'; fix or remove it.") from None
        path = (folder / name).resolve()
        if not path.is_relative_to(folder.resolve()):  # '../../etc/passwd' in someone else's metadata
            raise StudioError(f"Line {number} of '{meta}' points outside its folder ('{name}'); fix the file name.")
        caption = row.get("text", row.get("caption"))
        files.append(SourceFile(path, name, None if caption is None else " ".join(str(caption).split()),
                                max(1, int(row.get("repeats", 1) or 1))))
    return files


def write_metadata(folder: Path, rows: list[dict]) -> Path:
    """metadata.jsonl in `folder`: one {'file_name', 'text', ...} object per line, UTF-8."""
    path = Path(folder) / METADATA
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
