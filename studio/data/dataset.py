"""Dataset folders: image + caption pairs and a dataset.yaml that records how they were made.

    <dataset>/images/0001.png + 0001.txt   what trains (kohya-style pairs)
    <dataset>/images/metadata.jsonl        the same captions for Hugging Face's imagefolder loader
    <dataset>/originals/0001.jpg           the file as imported, byte for byte
    <dataset>/dataset.yaml                 token, class word, resolution, and per image its source,
                                           crop box (in the upright original), crop mode, size, repeats

Because each crop box is kept with its original, `reexport` redoes the dataset at another resolution
(or with buckets) without redoing manual crops or captions.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import yaml
from PIL import Image

from studio.data import crops
from studio.data.captions import DEFAULT_TEMPLATE, render
from studio.data.images import MIN_SIDE, WHITE, center_crop_resize, open_photo, parse_colour
from studio.data.sources import read_source, write_metadata
from studio import limits
from studio.errors import StudioError
from studio.paths import DatasetPaths, staging, swap_into_place

Box = tuple[int, int, int, int]


@dataclass
class PrepOptions:
    """How photos become training images; every field is stored so a re-export repeats it."""

    crop: str = "subject"  # one of crops.CROP_MODES
    buckets: bool = False  # aspect-ratio buckets instead of squares
    background: tuple[int, int, int] = WHITE  # behind transparent pixels
    border: tuple[int, int, int] = WHITE  # the margins of 'pad'
    detector: str = ""  # optional transformers object-detection model for 'subject' crops
    min_side: int = MIN_SIDE

    def __post_init__(self):
        if self.crop not in crops.CROP_MODES:
            raise StudioError(f"Crop mode '{self.crop}' is unknown; choose one of {', '.join(crops.CROP_MODES)}.")
        self.background, self.border = parse_colour(self.background), parse_colour(self.border)


@dataclass
class Item:
    file: str  # image file name inside images/
    caption: str
    source: str  # the original file name, for the user's reference only
    crop: Box  # box in the oriented original (left, top, right, bottom); may reach outside when padded
    original: str = ""  # file name inside originals/ ('' for datasets made before originals were kept)
    mode: str = "center"
    size: tuple[int, int] = (0, 0)  # training size (width, height) at the dataset's resolution
    repeats: int = 1
    fill: tuple[int, int, int] = WHITE  # colour outside the original, where the box reaches past it


@dataclass
class DatasetSpec:
    token: str
    class_word: str
    resolution: int
    template: str = DEFAULT_TEMPLATE
    items: list[Item] = field(default_factory=list)
    buckets: bool = False
    background: tuple[int, int, int] = WHITE


@dataclass
class Prepared:
    """One photo ready to save: the training image and everything needed to redo it."""

    image: Image.Image
    crop: Box
    source: str
    path: Path | None = None  # the imported file, copied into originals/ when saved
    mode: str = "center"
    original_size: tuple[int, int] = (0, 0)
    note: str = ""  # e.g. a crop mode that fell back to another
    caption: str | None = None  # from an imported caption file
    repeats: int = 1
    fill: tuple[int, int, int] = WHITE
    digest: str = ""  # sha256 of the file's bytes: exact duplicates

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


def train_size(box: Box, resolution: int, buckets: bool) -> tuple[int, int]:
    return crops.bucket_for(box[2] - box[0], box[3] - box[1], resolution, buckets)


def prepare_one(path: Path, name: str, resolution: int, options: PrepOptions, detector=None,
                manual: Box | None = None, mode: str | None = None) -> Prepared:
    """Open, orient and crop one photo (StudioError naming it if it is unusable)."""
    mode = mode or options.crop
    photo = open_photo(path, name, options.min_side, options.background)
    aspect = 1.0
    if options.buckets and mode != "manual":
        aspect = _bucket_aspect(photo.size, resolution)
    box, note = crops.choose_box(photo, mode, aspect, detector, manual, name)
    size = train_size(box, resolution, options.buckets)
    fill = options.border if mode in ("pad", "manual") else options.background
    image = crops.apply_crop(photo, box, size, fill)
    return Prepared(image, box, name, Path(path), mode, photo.size, note, fill=fill, digest=_digest(path))


def _bucket_aspect(size: tuple[int, int], resolution: int) -> float:
    w, h = crops.bucket_for(size[0], size[1], resolution, True)
    return w / h


def _digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def prepare_photos(files: list[tuple[Path, str]], resolution: int, options: PrepOptions | None = None,
                   on_progress=None) -> tuple[list[Prepared], list[str]]:
    """Open, orient and crop each (path, display name); bad files become messages, good ones are kept."""
    options = options or PrepOptions()
    detector = _detector(options)
    prepared, problems = [], []
    for index, (path, name) in enumerate(files):
        try:
            prepared.append(prepare_one(path, name, resolution, options, detector))
        except StudioError as exc:
            problems.append(str(exc))
        if on_progress:
            on_progress(index + 1, len(files))
    return prepared, problems


def _detector(options: PrepOptions):
    if options.crop != "subject" or not options.detector.strip():
        return None
    return crops.Detector(options.detector.strip())


def recrop(item: Prepared, resolution: int, options: PrepOptions, mode: str, box: Box | None = None) -> Prepared:
    """The same photo with another crop mode or a manual box (UI edits); the caption and repeats stay."""
    if item.path is None:
        raise StudioError(f"The original of '{item.source}' is no longer available; import the photo again.")
    new = prepare_one(item.path, item.source, resolution, options, _detector(replace(options, crop=mode)),
                      manual=box, mode=mode)
    return replace(new, caption=item.caption, repeats=item.repeats)


# ----------------------------------------------------------------------------- saving and loading

def save_dataset(paths: DatasetPaths, prepared: list[Prepared], captions: list[str],
                 token: str, class_word: str, resolution: int, template: str = DEFAULT_TEMPLATE,
                 options: PrepOptions | None = None, repeats: list[int] | None = None) -> DatasetSpec:
    """Write the folder next to any old one, then swap, so a failed save loses nothing."""
    if not prepared:
        raise StudioError("There are no usable images to save; add at least one photo.")
    if not token.strip() or not class_word.strip():
        raise StudioError("Both a trigger word and a class word are needed, e.g. 'sks' and 'stuffed animal'.")
    options = options or PrepOptions()
    repeats = repeats or [p.repeats for p in prepared]
    for r, p in zip(repeats, prepared):
        if not 1 <= int(r) <= limits.REPEATS_PER_IMAGE_MAX:
            raise StudioError(f"Repeats of '{p.source}' must be from 1 to {limits.REPEATS_PER_IMAGE_MAX}, got {r}; "
                              "set a whole number in that range.")
    spec = DatasetSpec(token.strip(), class_word.strip(), resolution, template, buckets=options.buckets,
                       background=options.background)
    tmp = DatasetPaths(staging(paths.root))
    try:
        return _write_and_swap(paths, tmp, prepared, captions, [int(r) for r in repeats], spec)
    except OSError as exc:
        shutil.rmtree(tmp.root, ignore_errors=True)
        raise StudioError(f"The dataset could not be written to '{paths.root}' ({exc.strerror or exc}); "
                          "free some disk space or choose another folder.") from None


def _write_and_swap(paths: DatasetPaths, tmp: DatasetPaths, prepared, captions, repeats, spec: DatasetSpec) -> DatasetSpec:
    tmp.images.mkdir(parents=True)
    tmp.originals.mkdir()
    for index, (item, caption, times) in enumerate(zip(prepared, captions, repeats), start=1):
        image_path = tmp.image(index)
        item.image.save(image_path)
        tmp.caption(image_path).write_text(caption.strip(), encoding="utf-8")
        original = ""
        if item.path is not None and Path(item.path).is_file():
            # Named by index, never by the uploaded name; the suffix only if it is one we know.
            target = tmp.original(index, Path(item.source).suffix)
            shutil.copyfile(item.path, target)
            original = target.name
        spec.items.append(Item(image_path.name, caption.strip(), item.source, tuple(item.crop), original,
                               item.mode, tuple(item.image.size), times, tuple(item.fill)))
    write_metadata(tmp.images, [{"file_name": i.file, "text": i.caption, "repeats": i.repeats} for i in spec.items])
    tmp.meta.write_text(yaml.safe_dump(_spec_to_dict(spec), sort_keys=False, allow_unicode=True), encoding="utf-8")
    swap_into_place(tmp.root, paths.root)
    return spec


def _spec_to_dict(spec: DatasetSpec) -> dict:
    data = asdict(spec)
    data["background"] = list(spec.background)
    data["items"] = [{**item, "crop": list(item["crop"]), "size": list(item["size"]), "fill": list(item["fill"])}
                     for item in data["items"]]
    return data


def load_dataset(root: Path) -> DatasetSpec:
    paths = DatasetPaths(Path(root))
    if not paths.root.is_dir():
        raise StudioError(f"Dataset folder '{root}' does not exist; prepare one in the Dataset tab or with `python -m studio prep`.")
    if not paths.meta.exists():
        raise StudioError(f"Folder '{root}' is not a studio dataset (no dataset.yaml); prepare it with `python -m studio prep`.")
    try:
        data = yaml.safe_load(paths.meta.read_text(encoding="utf-8")) or {}
        items = [_item(i) for i in data.pop("items", []) or []]
        if "background" in data:
            data["background"] = tuple(data["background"])
        spec = DatasetSpec(**data, items=items)
    except (yaml.YAMLError, TypeError, KeyError, ValueError) as exc:
        raise StudioError(f"The dataset.yaml in '{root}' is malformed ({exc.__class__.__name__}); prepare the dataset again.") from None
    # Captions edited on disk (the .txt files) win over the copy in dataset.yaml.
    spec.items = [i for i in spec.items if (paths.images / i.file).exists()]
    for item in spec.items:
        txt = paths.caption(paths.images / item.file)
        if txt.exists():
            item.caption = limits.read_caption(txt).strip()
        if not isinstance(item.repeats, int) or not 1 <= item.repeats <= limits.REPEATS_PER_IMAGE_MAX:
            raise StudioError(f"Image '{item.file}' of dataset '{paths.root.name}' has repeats {item.repeats!r}; "
                              f"repeats are whole numbers from 1 to {limits.REPEATS_PER_IMAGE_MAX}, so fix "
                              "dataset.yaml or save the dataset again.")
    if not spec.items:
        raise StudioError(f"Dataset '{root}' has no images; add photos in the Dataset tab.")
    return spec


def _item(raw: dict) -> Item:
    raw = dict(raw)
    for key in ("crop", "size", "fill"):
        if key in raw:
            raw[key] = tuple(int(v) for v in raw[key])
    raw.setdefault("crop", (0, 0, 0, 0))
    raw.setdefault("caption", "")
    raw.setdefault("source", "")
    return Item(**raw)


# ----------------------------------------------------------------------------- from folders

def prep_folder(src: Path, out: Path, token: str, class_word: str, resolution: int,
                template: str = DEFAULT_TEMPLATE, options: PrepOptions | None = None,
                caption_fn=None) -> tuple[DatasetSpec, list[str]]:
    """The CLI's `prep`: a folder of photos, a kohya folder or an imagefolder → a dataset folder at out.

    Captions found beside the images (kohya .txt, metadata.jsonl) are kept; other images get the template,
    or `caption_fn(prepared) -> list[str]` when given (model captioners, prefix/suffix, find/replace).
    """
    src = Path(src)
    if src.is_file():
        raise StudioError(f"'{src}' is a file, not a folder; give the folder that holds the photos "
                          "(put a single photo in a folder of its own).")
    if not src.is_dir():
        raise StudioError(f"Source folder '{src}' does not exist; give a folder of photos.")
    sources, _ = read_source(src)
    if not sources:
        raise StudioError(f"Folder '{src}' has no image files (.jpg, .png, .webp, ...); add photos to it.")
    options = options or PrepOptions()
    prepared, problems = prepare_photos([(s.path, s.name) for s in sources], resolution, options)
    by_name = {s.name: s for s in sources}
    for item in prepared:
        item.caption, item.repeats = by_name[item.source].caption, by_name[item.source].repeats
    captions = caption_fn(prepared) if caption_fn else [p.caption or render(template, token, class_word) for p in prepared]
    spec = save_dataset(DatasetPaths(Path(out)), prepared, captions, token, class_word, resolution, template, options)
    return spec, problems


def reexport(src: Path, out: Path, resolution: int, buckets: bool | None = None) -> DatasetSpec:
    """The dataset again from its originals at another resolution, with the same crops, captions and repeats.

    With `buckets` changed, each stored box is kept and only its training size changes (a square box
    stays square; a box cut for a bucket keeps its aspect).
    """
    spec = load_dataset(src)
    paths = DatasetPaths(Path(src))
    buckets = spec.buckets if buckets is None else buckets
    missing = [i.source or i.file for i in spec.items if not i.original or not (paths.originals / i.original).is_file()]
    if missing:
        raise StudioError(f"The dataset in '{src}' has no original for '{missing[0]}' (made before originals were "
                          "kept); prepare it again from the photos.")
    prepared = []
    for item in spec.items:
        path = paths.originals / item.original
        photo = open_photo(path, item.source, 1, spec.background)
        size = train_size(item.crop, resolution, buckets)
        image = crops.apply_crop(photo, item.crop, size, item.fill)
        prepared.append(Prepared(image, item.crop, item.source, path, item.mode, photo.size,
                                 repeats=item.repeats, fill=item.fill))
    options = PrepOptions(buckets=buckets, background=spec.background)
    # Re-exporting in place is safe: the new folder (originals copied) is complete before the swap.
    return save_dataset(DatasetPaths(Path(out)), prepared, [i.caption for i in spec.items], spec.token,
                        spec.class_word, resolution, spec.template, options, [i.repeats for i in spec.items])


# ----------------------------------------------------------------------------- training view

def load_pixels(files: list[Path], resolution: int, sizes: list[tuple[int, int]] | None = None):
    """Images as tensors in [-1, 1]: one (n, 3, resolution, resolution) tensor, centre-cropped where not
    square; with `sizes` ((width, height) per image, aspect-ratio buckets), each resized to its size and a
    list returned when the sizes differ."""
    import numpy as np
    import torch

    tensors = []
    for index, path in enumerate(files):
        im = open_photo(path, min_side=1)  # a dataset's own images were checked when imported
        if sizes is not None:
            if im.size != tuple(sizes[index]):
                im = im.resize(tuple(sizes[index]), Image.Resampling.LANCZOS)
        elif im.size != (resolution, resolution):
            im, _ = center_crop_resize(im, resolution)
        arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
        tensors.append(torch.from_numpy(arr).permute(2, 0, 1))
    if len({tuple(t.shape) for t in tensors}) > 1:
        return tensors
    return torch.stack(tensors)


class ConceptDataset:
    """Training view of a dataset: (pixel tensor in [-1, 1], caption) pairs at the training resolution.

    `pixels` is one (n, 3, H, W) tensor, or with aspect-ratio buckets a list of (3, h, w) tensors whose
    sizes follow `sizes`; `repeats` says how often each image counts per epoch.
    """

    def __init__(self, root: Path, resolution: int):
        self.spec = load_dataset(root)
        images = DatasetPaths(Path(root)).images
        self.captions = [item.caption for item in self.spec.items]
        self.repeats = [max(1, int(item.repeats)) for item in self.spec.items]
        self.sizes = [train_size(_stored_box(images / i.file, i), resolution, self.spec.buckets) for i in self.spec.items]
        self.pixels = load_pixels([images / item.file for item in self.spec.items], resolution,
                                  self.sizes if self.spec.buckets else None)

    def __len__(self) -> int:
        return len(self.captions)


def _stored_box(path: Path, item: Item) -> Box:
    """The aspect the image trains at: its crop box, or the stored image's own shape."""
    if item.crop[2] > item.crop[0] and item.crop[3] > item.crop[1]:
        return item.crop
    with Image.open(path) as im:
        return 0, 0, im.width, im.height

