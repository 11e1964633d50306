"""Dataset folders: image + caption pairs and a dataset.yaml that records how they were made."""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml
from PIL import Image

from studio.data.captions import DEFAULT_TEMPLATE, render
from studio.data.images import center_crop_resize, open_photo
from studio.errors import StudioError
from studio.paths import DatasetPaths, IMAGE_SUFFIXES, staging, swap_into_place


@dataclass
class Item:
    file: str  # image file name inside images/
    caption: str
    source: str  # the original file name, for the user's reference only
    crop: tuple[int, int, int, int]  # box in the oriented original (left, top, right, bottom)


@dataclass
class DatasetSpec:
    token: str
    class_word: str
    resolution: int
    template: str = DEFAULT_TEMPLATE
    items: list[Item] = field(default_factory=list)


@dataclass
class Prepared:
    image: Image.Image
    crop: tuple[int, int, int, int]
    source: str


def prepare_photos(files: list[tuple[Path, str]], resolution: int) -> tuple[list[Prepared], list[str]]:
    """Open, orient and crop each (path, display name); bad files become messages, good ones are kept."""
    prepared, problems = [], []
    for path, name in files:
        try:
            photo = open_photo(path, name)
        except StudioError as exc:
            problems.append(str(exc))
            continue
        image, box = center_crop_resize(photo, resolution)
        prepared.append(Prepared(image, box, name))
    return prepared, problems


def save_dataset(paths: DatasetPaths, prepared: list[Prepared], captions: list[str],
                 token: str, class_word: str, resolution: int, template: str = DEFAULT_TEMPLATE) -> DatasetSpec:
    """Write the folder next to any old one, then swap, so a failed save loses nothing."""
    if not prepared:
        raise StudioError("There are no usable images to save; add at least one photo.")
    if not token.strip() or not class_word.strip():
        raise StudioError("Both a trigger word and a class word are needed, e.g. 'sks' and 'stuffed animal'.")
    tmp = DatasetPaths(staging(paths.root))
    try:
        return _write_and_swap(paths, tmp, prepared, captions, DatasetSpec(token.strip(), class_word.strip(),
                                                                             resolution, template))
    except OSError as exc:
        shutil.rmtree(tmp.root, ignore_errors=True)
        raise StudioError(f"The dataset could not be written to '{paths.root}' ({exc.strerror or exc}); "
                          "free some disk space or choose another folder.") from None


def _write_and_swap(paths: DatasetPaths, tmp: DatasetPaths, prepared, captions, spec: DatasetSpec) -> DatasetSpec:
    tmp.images.mkdir(parents=True)
    for index, (item, caption) in enumerate(zip(prepared, captions), start=1):
        image_path = tmp.image(index)
        item.image.save(image_path)
        tmp.caption(image_path).write_text(caption.strip(), encoding="utf-8")
        spec.items.append(Item(image_path.name, caption.strip(), item.source, tuple(item.crop)))
    tmp.meta.write_text(yaml.safe_dump(_spec_to_dict(spec), sort_keys=False, allow_unicode=True), encoding="utf-8")
    swap_into_place(tmp.root, paths.root)
    return spec


def _spec_to_dict(spec: DatasetSpec) -> dict:
    data = asdict(spec)
    data["items"] = [{**item, "crop": list(item["crop"])} for item in data["items"]]
    return data


def load_dataset(root: Path) -> DatasetSpec:
    paths = DatasetPaths(Path(root))
    if not paths.root.is_dir():
        raise StudioError(f"Dataset folder '{root}' does not exist; prepare one in the Dataset tab or with `python -m studio prep`.")
    if not paths.meta.exists():
        raise StudioError(f"Folder '{root}' is not a studio dataset (no dataset.yaml); prepare it with `python -m studio prep`.")
    try:
        data = yaml.safe_load(paths.meta.read_text(encoding="utf-8")) or {}
        items = [Item(i["file"], i.get("caption", ""), i.get("source", ""), tuple(i.get("crop", (0, 0, 0, 0))))
                 for i in data.pop("items", []) or []]
        spec = DatasetSpec(**data, items=items)
    except (yaml.YAMLError, TypeError, KeyError) as exc:
        raise StudioError(f"The dataset.yaml in '{root}' is malformed ({exc.__class__.__name__}); prepare the dataset again.") from None
    # Captions edited on disk (the .txt files) win over the copy in dataset.yaml.
    spec.items = [i for i in spec.items if (paths.images / i.file).exists()]
    for item in spec.items:
        txt = paths.caption(paths.images / item.file)
        if txt.exists():
            item.caption = txt.read_text(encoding="utf-8").strip()
    if not spec.items:
        raise StudioError(f"Dataset '{root}' has no images; add photos in the Dataset tab.")
    return spec


def prep_folder(src: Path, out: Path, token: str, class_word: str, resolution: int,
                template: str = DEFAULT_TEMPLATE) -> tuple[DatasetSpec, list[str]]:
    """The CLI's `prep`: every image file in src → a dataset folder at out."""
    src = Path(src)
    if not src.is_dir():
        raise StudioError(f"Source folder '{src}' does not exist; give a folder of photos.")
    files = [(p, p.name) for p in sorted(src.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise StudioError(f"Folder '{src}' has no image files (.jpg, .png, .webp, ...); add photos to it.")
    prepared, problems = prepare_photos(files, resolution)
    captions = [render(template, token, class_word)] * len(prepared)
    return save_dataset(DatasetPaths(Path(out)), prepared, captions, token, class_word, resolution, template), problems


def load_pixels(files: list[Path], resolution: int):
    """Images as one (n, 3, resolution, resolution) tensor in [-1, 1], centre-cropped where not square."""
    import numpy as np
    import torch

    tensors = []
    for path in files:
        im = open_photo(path, min_side=1)  # a dataset's own images were checked when imported
        if im.size != (resolution, resolution):
            im, _ = center_crop_resize(im, resolution)
        arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
        tensors.append(torch.from_numpy(arr).permute(2, 0, 1))
    return torch.stack(tensors)


class ConceptDataset:
    """Training view of a dataset: (pixel tensor in [-1, 1], caption) pairs at the training resolution."""

    def __init__(self, root: Path, resolution: int):
        self.spec = load_dataset(root)
        images = DatasetPaths(Path(root)).images
        self.captions = [item.caption for item in self.spec.items]
        self.pixels = load_pixels([images / item.file for item in self.spec.items], resolution)

    def __len__(self) -> int:
        return len(self.captions)
