"""Folder formats other trainers use (kohya pairs, Hugging Face imagefolder): a studio dataset written
out in their layout, and uploaded files paired with the captions those layouts keep beside them.

Reading a whole folder in these layouts is `studio.data.sources`, which the dataset importer uses too;
this module imports the dataset, never the other way round.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from studio import limits
from studio.data.dataset import load_dataset
from studio.data.sources import METADATA, SourceFile, read_imagefolder, write_metadata
from studio.errors import StudioError
from studio.paths import DATASET_FILE, safe_name, staging, swap_into_place


def export(dataset: Path, out: Path, fmt: str) -> Path:
    """Copy a studio dataset's training images and captions into `out` in kohya or imagefolder layout."""
    spec = load_dataset(dataset)
    images = Path(dataset) / "images"
    if fmt not in ("kohya", "imagefolder"):
        raise StudioError(f"Export format '{fmt}' is unknown; choose kohya or imagefolder.")
    if (Path(out) / DATASET_FILE).exists() or Path(out).resolve() == Path(dataset).resolve():
        raise StudioError(f"'{out}' holds a studio dataset; export into a new folder.")
    tmp = staging(Path(out))
    rows = []
    for item in spec.items:
        if fmt == "kohya":  # kohya reads repeats from the folder name: one folder per repeat count
            folder = tmp / f"{item.repeats}_{safe_name(spec.token + ' ' + spec.class_word, 'concept')}"
        else:
            folder = tmp / "train"
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(images / item.file, folder / item.file)
        if fmt == "kohya":
            (folder / item.file).with_suffix(".txt").write_text(item.caption, encoding="utf-8")
        else:
            rows.append({"file_name": item.file, "text": item.caption, "repeats": item.repeats})
    if fmt == "imagefolder":
        write_metadata(tmp / "train", rows)
    return swap_into_place(tmp, Path(out))


def pair_uploads(files: list[tuple[Path, str]]) -> list[SourceFile]:
    """Uploaded files as images with captions: a 'name.txt' beside 'name.jpg' (kohya) or a metadata.jsonl
    naming the images (imagefolder) gives that image's caption; other non-images are ignored."""
    captions: dict[str, str] = {}
    for path, name in files:
        if Path(name).name == METADATA:
            for source in read_imagefolder(Path(path)) if Path(path).is_file() else []:
                if source.caption is not None:
                    captions[Path(source.name).name] = source.caption
    for path, name in files:
        if Path(name).suffix.lower() in (".txt", ".caption"):
            text = limits.read_caption(path, Path(name).name)  # a 50 MB "caption" is refused, not read
            captions[Path(name).stem] = " ".join(text.split())
    return [SourceFile(Path(path), name, captions.get(Path(name).name, captions.get(Path(name).stem)))
            for path, name in files
            if Path(name).suffix.lower() not in (".txt", ".caption", ".jsonl")]
