"""Where to crop: centre, subject-aware (saliency or a detection model), face-aware, pad, manual; buckets.

A crop box is (left, top, right, bottom) in the pixels of the upright original. A box may reach
outside the image: the outside is filled with a border colour, which is how "pad to square" is stored.
Boxes do not depend on the training resolution, so a dataset can be re-exported at another one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image

from studio.errors import StudioError

Box = tuple[int, int, int, int]
CropMode = Literal["subject", "center", "face", "pad", "manual"]
CROP_MODES: dict[str, str] = {  # key -> label, in the order the UI shows them
    "subject": "Subject-aware (keeps the subject in frame)",
    "center": "Centre",
    "face": "Face-aware (people)",
    "pad": "Pad to square (no crop)",
    "manual": "Manual (set a box per image)",
}
SALIENCY_SIDE = 64  # the saliency map is computed at this size: the shape of the subject, not its texture


# ----------------------------------------------------------------------------- box arithmetic

def fit_box(width: int, height: int, aspect: float, subject: Box | None = None) -> Box:
    """The largest box of `aspect` (w/h) inside the image, placed to contain `subject` where it fits,
    else centred on the subject; with no subject, centred in the image."""
    if width / height > aspect:
        box_w, box_h = max(1, round(height * aspect)), height
    else:
        box_w, box_h = width, max(1, round(width / aspect))
    box_w, box_h = min(box_w, width), min(box_h, height)
    if subject is None:
        subject = (0, 0, width, height)
    left = _place(subject[0], subject[2], box_w, width)
    top = _place(subject[1], subject[3], box_h, height)
    return left, top, left + box_w, top + box_h


def _place(lo: int, hi: int, size: int, limit: int) -> int:
    """Start of a window of `size` within [0, limit) that covers [lo, hi) if it can, centred on it otherwise."""
    start = (lo + hi) / 2 - size / 2  # centred on the subject; sliding it inside keeps a subject that fits
    return int(min(max(0, round(start)), limit - size))


def pad_box(width: int, height: int, aspect: float = 1.0) -> Box:
    """The smallest box of `aspect` holding the whole image, centred: the margins are filled, nothing is cut."""
    if width / height > aspect:
        box_w, box_h = width, round(width / aspect)
    else:
        box_w, box_h = round(height * aspect), height
    left, top = (width - box_w) // 2, (height - box_h) // 2
    return left, top, left + box_w, top + box_h


def contains(outer: Box, inner: Box) -> bool:
    return outer[0] <= inner[0] and outer[1] <= inner[1] and outer[2] >= inner[2] and outer[3] >= inner[3]


def apply_crop(image: Image.Image, box: Box, size: tuple[int, int], fill=(255, 255, 255)) -> Image.Image:
    """Cut `box` out of the image (filling any part outside it with `fill`) and resize to `size` (w, h)."""
    left, top, right, bottom = box
    if left >= 0 and top >= 0 and right <= image.width and bottom <= image.height:
        region = image.crop(box)
    else:
        region = Image.new("RGB", (right - left, bottom - top), tuple(fill))
        region.paste(image, (-left, -top))
    if region.size == tuple(size):
        return region
    return region.resize(tuple(size), Image.Resampling.LANCZOS)


def check_box(box, width: int, height: int, name: str) -> Box:
    """A manual box must have positive size and overlap the image."""
    try:
        left, top, right, bottom = (int(round(float(v))) for v in box)
    except (TypeError, ValueError):
        raise StudioError(f"The crop box of '{name}' must be four numbers (left, top, right, bottom); set it again.") from None
    if right - left < 8 or bottom - top < 8 or right <= 0 or bottom <= 0 or left >= width or top >= height:
        raise StudioError(f"The crop box ({left}, {top}, {right}, {bottom}) of '{name}' is empty or outside its "
                          f"{width}×{height} image; draw it over the subject.")
    return left, top, right, bottom


# ----------------------------------------------------------------------------- buckets

def bucket_sizes(resolution: int, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """(width, height) pairs of about resolution² pixels, sides multiples of `step`, aspect up to max_ratio.

    The step is resolution/8 rounded to 16 px (64 px at 512, as kohya's default; 16 px at 64), so a side
    stays a multiple of the VAE factor (8) times the UNet's downsampling.
    """
    step = max(16, (resolution // 8) // 16 * 16)
    area = resolution * resolution
    sizes = set()
    width = step
    while width <= resolution * max_ratio:
        height = (area // width) // step * step
        if height >= step and max(width / height, height / width) <= max_ratio + 1e-9:
            sizes.add((width, height))
            sizes.add((height, width))
        width += step
    return sorted(sizes)


def bucket_for(width: int, height: int, resolution: int, buckets: bool) -> tuple[int, int]:
    """The training size of an image: square without buckets, else the bucket nearest its aspect."""
    if not buckets:
        return resolution, resolution
    aspect = width / height
    return min(bucket_sizes(resolution),
               key=lambda s: (abs(math.log(s[0] / s[1]) - math.log(aspect)), -(s[0] * s[1])))


# ----------------------------------------------------------------------------- saliency

def saliency_map(image: Image.Image) -> np.ndarray:
    """A [0, 1] map (SALIENCY_SIDE on the long side) of where the subject probably is.

    Two classical cues, averaged: the spectral residual (Hou & Zhang, CVPR 2007: what the log-amplitude
    spectrum has beyond its local average is the 'unexpected' part of the image) and colour contrast
    against the image's mean colour in a blurred copy (Achanta et al., CVPR 2009, frequency-tuned
    saliency). A centre prior (a wide Gaussian) breaks ties towards the middle, as photographers frame.
    """
    small = image.convert("RGB")
    small.thumbnail((SALIENCY_SIDE, SALIENCY_SIDE), Image.Resampling.BILINEAR)
    rgb = np.asarray(small, dtype=np.float64) / 255.0
    gray = rgb @ np.array([0.299, 0.587, 0.114])
    spectral = _normalise(_blur(_spectral_residual(gray), 2.0))
    blurred = np.stack([_blur(rgb[..., c], 1.0) for c in range(3)], axis=-1)
    contrast = _normalise(np.linalg.norm(blurred - _border_colour(blurred), axis=-1))
    h, w = gray.shape
    yy, xx = np.mgrid[0:h, 0:w]
    centre = np.exp(-(((xx - (w - 1) / 2) / w) ** 2 + ((yy - (h - 1) / 2) / h) ** 2) / (2 * 0.35 ** 2))
    return _normalise((0.5 * spectral + 0.5 * contrast) * (0.6 + 0.4 * centre))


def _border_colour(rgb: np.ndarray) -> np.ndarray:
    """The median colour of the image's outer frame: the background, more robustly than the mean colour
    when the subject fills much of the frame."""
    frame = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    return np.median(frame, axis=0)


def _spectral_residual(gray: np.ndarray) -> np.ndarray:
    spectrum = np.fft.fft2(gray)
    log_amp = np.log(np.abs(spectrum) + 1e-9)
    residual = log_amp - _box_filter(log_amp, 3)
    return np.abs(np.fft.ifft2(np.exp(residual + 1j * np.angle(spectrum)))) ** 2


def _box_filter(a: np.ndarray, k: int) -> np.ndarray:
    pad = np.pad(a, k // 2, mode="edge")
    out = np.zeros_like(a)
    for dy in range(k):
        for dx in range(k):
            out += pad[dy:dy + a.shape[0], dx:dx + a.shape[1]]
    return out / (k * k)


def _blur(a: np.ndarray, sigma: float) -> np.ndarray:
    radius = max(1, int(3 * sigma))
    x = np.arange(-radius, radius + 1)
    kernel = np.exp(-x ** 2 / (2 * sigma ** 2))
    kernel /= kernel.sum()
    pad = np.pad(a, radius, mode="edge")
    rows = np.apply_along_axis(lambda r: np.convolve(r, kernel, mode="valid"), 1, pad)
    return np.apply_along_axis(lambda c: np.convolve(c, kernel, mode="valid"), 0, rows)


def _normalise(a: np.ndarray) -> np.ndarray:
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def salient_box(image: Image.Image, mass: float = 0.9) -> Box:
    """The subject's bounding box in image pixels: where the strongest saliency lies (above its mean plus
    half a standard deviation), trimmed to the central `mass` of that saliency along each axis."""
    sal = saliency_map(image)
    strong = np.where(sal > sal.mean() + 0.5 * sal.std(), sal, 0.0)
    if strong.sum() <= 0:
        return 0, 0, image.width, image.height
    tail = (1 - mass) / 2
    x0, x1 = _span(strong.sum(axis=0), tail)
    y0, y1 = _span(strong.sum(axis=1), tail)
    sx, sy = image.width / sal.shape[1], image.height / sal.shape[0]
    return (int(x0 * sx), int(y0 * sy), min(image.width, math.ceil(x1 * sx)), min(image.height, math.ceil(y1 * sy)))


def _span(profile: np.ndarray, tail: float) -> tuple[int, int]:
    cdf = np.cumsum(profile) / profile.sum()
    return int(np.searchsorted(cdf, tail)), int(np.searchsorted(cdf, 1 - tail)) + 1


# ----------------------------------------------------------------------------- faces

_face_cascade: list = []


def face_boxes(image: Image.Image) -> list[Box]:
    """Frontal faces found by OpenCV's Haar cascade (Viola & Jones 2001), largest first."""
    try:
        import cv2
    except ImportError:
        raise StudioError("Face-aware cropping needs the opencv-python-headless package; "
                          "`pip install opencv-python-headless`, or choose subject-aware cropping.") from None
    if not _face_cascade:
        cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
        if cascade.empty():
            raise StudioError("OpenCV's face model file is missing from this installation; reinstall "
                              "opencv-python-headless, or choose subject-aware cropping.")
        _face_cascade.append(cascade)
    gray = np.asarray(image.convert("L"))
    scale = max(1.0, max(gray.shape) / 640)  # detect on ~640 px: as reliable, many times faster
    if scale > 1:
        small = image.convert("L").resize((round(image.width / scale), round(image.height / scale)))
        gray = np.asarray(small)
    found = _face_cascade[0].detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(24, 24))
    boxes = [(int(x * scale), int(y * scale), int((x + w) * scale), int((y + h) * scale)) for x, y, w, h in found]
    return sorted(boxes, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]), reverse=True)


def head_box(face: Box, width: int, height: int) -> Box:
    """A face box grown to take in hair and chin (60% above and to the sides, 40% below): what must not be cut."""
    w, h = face[2] - face[0], face[3] - face[1]
    return (max(0, int(face[0] - 0.6 * w)), max(0, int(face[1] - 0.6 * h)),
            min(width, int(face[2] + 0.6 * w)), min(height, int(face[3] + 0.4 * h)))


# ----------------------------------------------------------------------------- detection models

@dataclass
class Detector:
    """A transformers object-detection model (DETR, YOLOS, ...) chosen by hub id or local folder."""

    model_id: str
    threshold: float = 0.5

    def __post_init__(self):
        from studio.data.captioners import load_parts

        self.model, self.processor = load_parts(self.model_id, "object-detection")

    def boxes(self, image: Image.Image) -> list[tuple[float, Box]]:
        import torch

        inputs = self.processor(images=image, return_tensors="pt")
        with torch.no_grad():
            outputs = self.model(**inputs)
        result = self.processor.post_process_object_detection(
            outputs, threshold=self.threshold, target_sizes=[(image.height, image.width)])[0]
        found = []
        for score, box in zip(result["scores"].tolist(), result["boxes"].tolist()):
            left, top, right, bottom = (int(round(v)) for v in box)
            left, top = max(0, left), max(0, top)
            right, bottom = min(image.width, right), min(image.height, bottom)
            if right > left and bottom > top:
                found.append((score, (left, top, right, bottom)))
        return sorted(found, reverse=True)

    def subject(self, image: Image.Image) -> Box | None:
        """The most confident detection, grown to include any other detection overlapping it."""
        found = self.boxes(image)
        if not found:
            return None
        box = found[0][1]
        for _, other in found[1:]:
            if other[0] < box[2] and other[2] > box[0] and other[1] < box[3] and other[3] > box[1]:
                box = (min(box[0], other[0]), min(box[1], other[1]), max(box[2], other[2]), max(box[3], other[3]))
        return box


# ----------------------------------------------------------------------------- choosing a box

def choose_box(image: Image.Image, mode: str, aspect: float = 1.0, detector: Detector | None = None,
               manual: Box | None = None, name: str = "image") -> tuple[Box, str]:
    """(crop box, note) for one upright image; the note says when a mode fell back to another."""
    w, h = image.size
    if mode == "center":
        return fit_box(w, h, aspect), ""
    if mode == "pad":
        return pad_box(w, h, aspect), ""
    if mode == "manual":
        if manual is None:
            return fit_box(w, h, aspect, salient_box(image)), ""  # a starting box for the user to move
        return check_box(manual, w, h, name), ""
    if mode == "face":
        faces = face_boxes(image)
        if faces:
            return fit_box(w, h, aspect, head_box(faces[0], w, h)), ""
        return fit_box(w, h, aspect, salient_box(image)), f"no face found in '{name}', cropped around the subject"
    if mode == "subject":
        subject = detector.subject(image) if detector is not None else None
        note = "" if detector is None or subject else f"the detector found nothing in '{name}', used saliency"
        return fit_box(w, h, aspect, subject or salient_box(image)), note
    raise StudioError(f"Crop mode '{mode}' is unknown; choose one of {', '.join(CROP_MODES)}.")
