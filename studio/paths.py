"""Workspace: the only module that knows the folder layout and file names.

    workspace/
      datasets/<name>/   images/0001.png + 0001.txt + metadata.jsonl, originals/0001.jpg, dataset.yaml
      runs/<run_id>/     config.yaml, events.jsonl, samples/, checkpoints/, adapter/, eval/
      evals/<name>/      results.csv of evaluations that span several runs
"""

from __future__ import annotations

import os
import re
import shutil
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path

DATASET_FILE = "dataset.yaml"
RUN_CONFIG = "config.yaml"
EVENTS = "events.jsonl"
ADAPTER_META = "adapter.yaml"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
PEFT_WEIGHTS = "adapter_model.safetensors"  # LoHa / LoKr in peft's own format
PEFT_CONFIG = "adapter_config.json"
LYCORIS_EXPORT = "lycoris.safetensors"  # LoHa / LoKr with kohya/LyCORIS key names
RESULTS_CSV = "results.csv"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
ORIGINAL_SUFFIXES = IMAGE_SUFFIXES + (".heic", ".heif")


def staging(final: Path) -> Path:
    """An empty sibling folder to write into before `swap_into_place`."""
    tmp = final.with_name(f"{final.name}.partial-{os.getpid()}")  # per process: two writers never collide
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def swap_into_place(tmp: Path, final: Path) -> Path:
    """Replace `final` with the fully written `tmp` by renames, so no reader ever sees half a folder
    and a failure before this point leaves the old `final` as it was.

    Every file of `tmp` is flushed to disk first (fsync), so a crash after the rename cannot leave
    empty files behind a complete-looking name. Between the two renames `final` is briefly absent;
    a process killed exactly there leaves `final.old-<pid>`, which `recover_folder` renames back.
    """
    _fsync_tree(tmp)
    old = final.with_name(f"{final.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    _fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)
    return final


def recover_folder(final: Path) -> Path:
    """Undo what a kill between `swap_into_place`'s renames left: the previous folder comes back when
    the new one never arrived. Half-written `.partial-*` folders are left for their writer to remove."""
    final = Path(final)
    if not final.exists():
        olds = sorted(final.parent.glob(f"{final.name}.old-*"), key=lambda p: p.stat().st_mtime)
        if olds:
            olds[-1].rename(final)
    return final


def replace_atomically(path: Path, write) -> None:
    """Write a file through `write(tmp_path)`, flush it to disk, then rename it over `path`: a kill at
    any moment leaves either the old file or the new one, never a mix."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    write(tmp)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_text_atomically(path: Path, text: str) -> None:
    replace_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _fsync_tree(folder: Path) -> None:
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not every filesystem lets a folder be opened; the data files are synced anyway
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def default_root() -> Path:
    return Path(os.environ.get("STUDIO_WORKSPACE", "workspace")).resolve()


def safe_name(name: str, fallback: str = "untitled", max_len: int = 64) -> str:
    """A name that is safe as one folder or file stem: no separators, no dots first, ASCII only."""
    text = unicodedata.normalize("NFKD", str(name)).encode("ascii", "ignore").decode()
    text = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-._")
    return text[:max_len] or fallback


@dataclass(frozen=True)
class DatasetPaths:
    root: Path

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def meta(self) -> Path:
        return self.root / DATASET_FILE

    def image(self, index: int) -> Path:
        return self.images / f"{index:04d}.png"

    def caption(self, image: Path) -> Path:
        return image.with_suffix(".txt")

    @property
    def originals(self) -> Path:
        return self.root / "originals"

    def original(self, index: int, suffix: str) -> Path:
        """The imported file, named by index (never by the uploaded name); an unknown suffix becomes '.img'."""
        suffix = suffix.lower() if suffix.lower() in ORIGINAL_SUFFIXES else ".img"
        return self.originals / f"{index:04d}{suffix}"

    def image_files(self) -> list[Path]:
        if not self.images.is_dir():
            return []
        return sorted(p for p in self.images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @property
    def run_id(self) -> str:
        return self.root.name

    @property
    def config(self) -> Path:
        return self.root / RUN_CONFIG

    @property
    def events(self) -> Path:
        return self.root / EVENTS

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step-{step:06d}"

    def sample(self, step: int, index: int) -> Path:
        return self.samples / f"step-{step:06d}-{index}.png"


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def default(cls) -> "Workspace":
        return cls(default_root())

    @property
    def datasets(self) -> Path:
        return self.root / "datasets"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def evals(self) -> Path:
        return self.root / "evals"

    @property
    def adapter_files(self) -> Path:
        """LoRA and embedding files from other tools added in the Playground (kept for the next visit)."""
        return self.root / "adapter-files"

    def list_adapter_files(self) -> list[str]:
        if not self.adapter_files.is_dir():
            return []
        return sorted(p.name for p in self.adapter_files.glob("*.safetensors") if p.is_file())

    def dataset(self, name: str) -> DatasetPaths:
        return DatasetPaths(self.datasets / safe_name(name, "dataset"))

    def run(self, run_id: str) -> RunPaths:
        return RunPaths(self.runs / safe_name(run_id, "run"))

    def new_run_id(self, label: str) -> str:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        base = f"{stamp}-{safe_name(label, 'run', 32)}"
        run_id, n = base, 1
        while (self.runs / run_id).exists():
            n += 1
            run_id = f"{base}-{n}"
        return run_id

    def list_datasets(self) -> list[str]:
        if not self.datasets.is_dir():
            return []
        return sorted(p.name for p in self.datasets.iterdir() if (p / DATASET_FILE).exists())

    def list_runs(self) -> list[str]:
        """Run ids, newest first; any folder with a config.yaml counts (CLI runs included)."""
        if not self.runs.is_dir():
            return []
        runs = [p for p in self.runs.iterdir() if (p / RUN_CONFIG).exists()]
        return [p.name for p in sorted(runs, key=lambda p: p.stat().st_mtime, reverse=True)]
