"""Reading one category of a dataset in MVTec AD layout.

The layout is::

    <root>/<category>/train/good/<name>.<ext>
    <root>/<category>/test/<defect>/<name>.<ext>              (``good`` is one of the defects)
    <root>/<category>/ground_truth/<defect>/<name>_mask.<ext>  (none for ``test/good``)

Images may be PNG, JPEG, BMP or TIFF (extensions compared case-insensitively). Hidden files,
files of other types and nested folders are ignored, so a dataset unpacked on a Mac (``.DS_Store``,
``__MACOSX``) reads the same. A mask is paired with its image by file stem: ``000.png`` takes
``000_mask.png`` or, failing that, ``000.png`` (any image extension) from ``ground_truth``.

Every problem with the files raises :class:`~anoseg.errors.DataError` naming the file or folder:
unreadable, truncated or mislabelled files, and images that declare more than
:data:`MAX_IMAGE_PIXELS` pixels (a decompression bomb). The EXIF orientation of a JPEG (or
TIFF) is applied to images and masks alike, as photo viewers do.

Masks (:func:`load_mask`): a pixel is a defect when its value is above half of the mask's
largest value (for colour masks the largest channel counts). So 0/1 masks, 0/255 masks,
0/65535 16-bit masks and JPEG masks (compression noise of a few levels around the defects)
all read as meant; an all-zero mask has no defect.
"""

from __future__ import annotations

import contextlib
import hashlib
import numbers
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from anoseg.config import MVTEC_CATEGORIES
from anoseg.data.geometry import Geometry, Placement
from anoseg.errors import ConfigError, DataError

PathLike = Union[str, Path]

IMAGE_EXTENSIONS: Tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
"""Lower-case suffixes of the files read as images or masks."""

GOOD = "good"
"""Name of the defect-free folder in ``train`` and ``test``."""

MASK_SUFFIX = "_mask"

# Folders that archive tools leave behind and that are never categories or defect types.
_IGNORED_FOLDERS = frozenset({"__MACOSX"})

_FORMATS_TEXT = "PNG, JPEG, BMP or TIFF files"


@dataclass(frozen=True)
class Sample:
    """One test image and where its ground truth is.

    Attributes:
        image_path: The image file.
        mask_path: The mask file, or ``None`` for a good image.
        defect_type: Name of the folder under ``test`` (``"good"`` for normal images).
        label: 1 for a defective image, 0 for a good one.
    """

    image_path: Path
    mask_path: Optional[Path]
    defect_type: str
    label: int


# ----------------------------------------------------------------------------- listing files


def _is_visible(path: Path) -> bool:
    return not path.name.startswith(".") and path.name not in _IGNORED_FOLDERS


def _is_image_file(path: Path) -> bool:
    return _is_visible(path) and path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def image_files(folder: Path) -> List[Path]:
    """Image files directly inside ``folder``, sorted by name (nested folders are ignored)."""
    return sorted((p for p in folder.iterdir() if _is_image_file(p)), key=lambda p: p.name)


def _subfolders(folder: Path) -> List[Path]:
    return sorted((p for p in folder.iterdir() if _is_visible(p) and p.is_dir()),
                  key=lambda p: p.name)


def _available_categories(root: Path) -> List[str]:
    """Folders under ``root`` that look like categories (they hold ``train`` or ``test``)."""
    return [p.name for p in _subfolders(root) if (p / "train").is_dir() or (p / "test").is_dir()]


def _category_dir(root: PathLike, category: str) -> Path:
    """Return ``<root>/<category>`` or raise a DataError that helps find the right one."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"dataset root {root} does not exist; expected a folder in MVTec AD "
                        f"layout (<root>/<category>/train/good/...)")
    if not root.is_dir():
        raise DataError(f"dataset root {root} is a file; expected a folder in MVTec AD layout "
                        f"(<root>/<category>/train/good/...)")
    folder = root / category
    if folder.is_dir():
        return folder
    available = _available_categories(root)
    if available:
        hint = f"categories found there: {', '.join(available)}"
    else:
        hint = (f"no category folders found there (expected e.g. "
                f"{', '.join(MVTEC_CATEGORIES[:3])}, ... each holding train/ and test/)")
    raise DataError(f"category folder {folder} does not exist; {hint}")


def list_train_images(root: PathLike, category: str) -> List[Path]:
    """List the normal training images of a category.

    Args:
        root: Dataset root in MVTec AD layout.
        category: Name of the category folder under ``root``.

    Returns:
        The image files of ``<root>/<category>/train/good``, sorted by name.

    Raises:
        DataError: The root, the category or ``train/good`` is missing, or holds no images.
    """
    good = _category_dir(root, category) / "train" / GOOD
    if not good.is_dir():
        raise DataError(f"training folder {good} does not exist; expected the normal training "
                        f"images there ({_FORMATS_TEXT})")
    images = image_files(good)
    if not images:
        raise DataError(f"training folder {good} contains no images; expected {_FORMATS_TEXT}")
    return images


def _mask_key(mask: Path) -> str:
    """The image stem a mask file belongs to (``000_mask.png`` and ``000.png`` -> ``000``)."""
    stem = mask.stem
    return stem[: -len(MASK_SUFFIX)] if stem.endswith(MASK_SUFFIX) else stem


def _pair_masks(images: Sequence[Path], mask_dir: Path) -> Dict[Path, Path]:
    """Match each defect image in ``images`` with its mask file in ``mask_dir``.

    Raises:
        DataError: An image has no mask, two masks fit one image, or a mask has no image.
    """
    masks = image_files(mask_dir) if mask_dir.is_dir() else []
    by_key: Dict[str, List[Path]] = {}
    for mask in masks:
        by_key.setdefault(_mask_key(mask), []).append(mask)

    pairs: Dict[Path, Path] = {}
    for image in images:
        candidates = by_key.get(image.stem, [])
        # ``000_mask.png`` is the MVTec name; prefer it over a same-stem ``000.png``.
        suffixed = [m for m in candidates if m.stem.endswith(MASK_SUFFIX)]
        chosen = suffixed or candidates
        if not chosen:
            expected = mask_dir / f"{image.stem}{MASK_SUFFIX}.png"
            raise DataError(f"defect image {image} has no mask; expected {expected} "
                            f"(or the same name with another image extension)")
        if len(chosen) > 1:
            raise DataError(f"defect image {image} has several masks: "
                            f"{', '.join(str(m) for m in chosen)}; expected exactly one")
        pairs[image] = chosen[0]

    stems = {image.stem for image in images}
    for mask in masks:
        if _mask_key(mask) not in stems:
            expected = mask_dir.parent.parent / "test" / mask_dir.name / f"{_mask_key(mask)}.png"
            raise DataError(f"mask {mask} has no image; expected {expected} (any image "
                            f"extension) or remove the mask")
    return pairs


def list_test_samples(root: PathLike, category: str) -> List[Sample]:
    """List the test images of a category with their masks.

    Every folder under ``test`` is a defect type; ``test/good`` holds normal images, which need
    no mask. Masks in ``ground_truth/good`` are ignored.

    Args:
        root: Dataset root in MVTec AD layout.
        category: Name of the category folder under ``root``.

    Returns:
        The samples sorted by (defect type, file name).

    Raises:
        DataError: The test folder is missing or empty, a defect image has no mask, or a mask
            has no image.
    """
    category_dir = _category_dir(root, category)
    test_dir = category_dir / "test"
    if not test_dir.is_dir():
        raise DataError(f"test folder {test_dir} does not exist; expected test/good and one "
                        f"folder per defect type with {_FORMATS_TEXT}")
    gt_dir = category_dir / "ground_truth"

    samples: List[Sample] = []
    defect_dirs = {d.name: d for d in _subfolders(test_dir)}
    for defect, folder in sorted(defect_dirs.items()):
        images = image_files(folder)
        if defect == GOOD:
            samples.extend(Sample(image, None, GOOD, 0) for image in images)
            continue
        pairs = _pair_masks(images, gt_dir / defect)
        samples.extend(Sample(image, pairs[image], defect, 1) for image in images)

    # Masks for a defect type that has no test folder at all are just as orphaned.
    if gt_dir.is_dir():
        for mask_dir in _subfolders(gt_dir):
            if mask_dir.name != GOOD and mask_dir.name not in defect_dirs:
                masks = image_files(mask_dir)
                if masks:
                    raise DataError(f"mask {masks[0]} has no image; expected the folder "
                                    f"{test_dir / mask_dir.name} with the defect images")

    if not samples:
        raise DataError(f"test folder {test_dir} contains no images; expected test/good and "
                        f"defect folders with {_FORMATS_TEXT}")
    samples.sort(key=lambda s: (s.defect_type, s.image_path.name))
    return samples


# ---------------------------------------------------------------------------- reading pixels


MAX_IMAGE_PIXELS = 89_478_485
"""Images (and masks) declaring more pixels than this in their header (about 9459 x 9459,
Pillow's default warning limit) are refused before decoding: a decompression bomb, a small
file that would need gigabytes of memory. Raise it here for larger images."""

_EXIF_ORIENTATION = 0x0112
_SWAPS_SIDES = frozenset({5, 6, 7, 8})
"""EXIF orientations that rotate by 90 degrees (the displayed width is the stored height)."""


def _read_failure(path: Path, what: str, exc: BaseException) -> DataError:
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return DataError(f"cannot read {what} {path}: its header declares more than "
                         f"{MAX_IMAGE_PIXELS:,} pixels (anoseg.data.mvtec.MAX_IMAGE_PIXELS; a "
                         "decompression bomb or a mislabelled file)")
    reason = str(exc) or type(exc).__name__
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, PermissionError)):
        reason = exc.strerror or reason
    return DataError(f"cannot read {what} {path}: {reason}; expected a PNG, JPEG, BMP or TIFF "
                     "file")


def _check_pixels(img: Image.Image, path: Path, what: str) -> None:
    width, height = img.size
    if width < 1 or height < 1:
        raise DataError(f"cannot read {what} {path}: it declares a {width}x{height} image")
    if width * height > MAX_IMAGE_PIXELS:
        raise DataError(f"cannot read {what} {path}: its header declares {width}x{height} "
                        f"pixels, more than the limit of {MAX_IMAGE_PIXELS:,} "
                        "(anoseg.data.mvtec.MAX_IMAGE_PIXELS; a decompression bomb or a "
                        "mislabelled file)")


def _open_loaded(path: Path, what: str) -> Image.Image:
    """Open and fully decode an image (EXIF orientation applied), turning every failure into
    a DataError naming the file."""
    try:
        with _bomb_checks(), Image.open(path) as img:
            _check_pixels(img, path, what)
            img.load()  # decode now: a truncated file only fails here
            # A copy outlives the closed file handle whatever the Pillow version does on close.
            return ImageOps.exif_transpose(img) if _orientation(img) > 1 else img.copy()
    except DataError:
        raise
    except Exception as exc:  # any decoder failure, whatever the format plug-in raises
        raise _read_failure(path, what, exc) from None


@contextlib.contextmanager
def _bomb_checks():
    """Pillow's decompression-bomb warning as an error, at this module's limit (and its
    warnings about a corrupt file's tags silenced: the DataError that follows names the file)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module="PIL")
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        previous = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = previous


def _orientation(img: Image.Image) -> int:
    try:
        value = img.getexif().get(_EXIF_ORIENTATION, 1)
        return int(value) if isinstance(value, int) else 1
    except Exception:  # a broken EXIF block: read the pixels as stored
        return 1


def _as_size(size: int) -> int:
    """Validate an output side length (NumPy integers welcome) and return it as an int."""
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    return int(size)


Size = Union[int, Tuple[int, int]]
"""An output size: one side (a square) or ``(height, width)``."""


def _as_hw(size: Size) -> Tuple[int, int]:
    """Validate an output size (a side or ``(height, width)``) as ``(height, width)``."""
    if isinstance(size, (tuple, list)):
        if len(size) != 2:
            raise ValueError(f"size must be a side or (height, width), got {size!r}")
        return _as_size(size[0]), _as_size(size[1])
    side = _as_size(size)
    return side, side


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB, scaling 16-bit and float data instead of clipping."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        values = np.asarray(img)
        if img.mode == "F":
            # Float images are usually in [0, 1]; anything larger is taken as 0..255.
            scale = 255.0 if float(values.max(initial=0.0)) <= 1.0 else 1.0
        else:
            # PIL gives 16-bit files as I;16 or as 32-bit I; both hold 0..65535.
            scale = 255.0 / 65535.0
        gray = np.clip(np.rint(values.astype(np.float64) * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # PIL warns when dropping palette transparency directly
    return img.convert("RGB")


def _open_rgb(path: Path) -> Image.Image:
    """The decoded image as 8-bit RGB; every failure a DataError naming the file."""
    try:
        return _to_rgb(_open_loaded(path, "image"))
    except (ValueError, TypeError, OSError) as exc:  # a mode PIL cannot convert
        if isinstance(exc, DataError):
            raise
        raise _read_failure(path, "image", exc) from None


def _rgb_tensor(img: Image.Image, hw: Tuple[int, int]) -> torch.Tensor:
    """(3, H, W) uint8 of ``img`` resized (bilinear) to ``hw`` when it has another size."""
    if img.size != (hw[1], hw[0]):
        img = img.resize((hw[1], hw[0]), Image.BILINEAR)
    array = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def load_image(path: PathLike, size: Optional[Size]) -> torch.Tensor:
    """Read an image as an 8-bit RGB tensor, resized to ``size`` (the aspect is not kept).

    Grayscale, palette, RGBA (alpha dropped) and 16-bit images become 3-channel RGB. Resizing
    is bilinear with antialiasing (PIL filters over the whole footprint when shrinking).

    Args:
        path: Image file.
        size: Output side length in pixels, ``(height, width)``, or ``None`` for the image's
            own size.

    Returns:
        A uint8 tensor of shape (3, height, width).

    Raises:
        DataError: The file is missing, unreadable, corrupt or truncated.
    """
    hw = None if size is None else _as_hw(size)
    img = _open_rgb(Path(path))
    return _rgb_tensor(img, (img.height, img.width) if hw is None else hw)


def load_placed_image(path: PathLike, geometry: Union[Geometry, Size]
                      ) -> Tuple[torch.Tensor, Placement]:
    """Read an image onto its canvas (:meth:`anoseg.data.geometry.Geometry.place`): resized to
    its box (bilinear), the rest of the canvas black.

    Args:
        path: Image file.
        geometry: A :class:`~anoseg.data.geometry.Geometry`, or a size (a stretch to it).

    Returns:
        ``(uint8 canvas (3, H, W), placement)``.

    Raises:
        DataError: The file is missing, unreadable, corrupt or truncated.
    """
    img = _open_rgb(Path(path))
    placement = Geometry.of(geometry).place((img.height, img.width))
    if placement.is_full:
        return _rgb_tensor(img, placement.canvas_hw), placement
    canvas = torch.zeros((3, *placement.canvas_hw), dtype=torch.uint8)
    top, left, h, w = placement.box
    canvas[:, top:top + h, left:left + w] = _rgb_tensor(img, (h, w))
    return canvas, placement


def _header_hw(path: Path, what: str) -> Tuple[int, int]:
    """(height, width) as displayed (EXIF orientation applied), from the header only."""
    try:
        with _bomb_checks(), Image.open(path) as img:  # the header; pixels are decoded lazily
            _check_pixels(img, path, what)
            width, height = img.size
            if _orientation(img) in _SWAPS_SIDES:
                width, height = height, width
    except DataError:
        raise
    except Exception as exc:  # any parser failure, whatever the format plug-in raises
        raise _read_failure(path, what, exc) from None
    return height, width


def image_size_of(path: PathLike) -> Tuple[int, int]:
    """Return the (height, width) of an image file, reading only its header.

    Raises:
        DataError: The file is missing or not a readable image.
    """
    return _header_hw(Path(path), "image")


def _mask_values(img: Image.Image) -> np.ndarray:
    """A (H, W) array of a mask image's values (colour masks: the largest channel)."""
    if img.mode in ("RGB", "RGBA", "LA", "P", "PA", "CMYK", "YCbCr", "HSV", "LAB"):
        if img.mode == "LA":
            return np.asarray(img)[..., 0]
        # Any coloured pixel is a defect; alpha says nothing about the defect.
        rgb = np.asarray(img.convert("RGBA" if img.mode in ("P", "PA") else "RGB"))[..., :3]
        return rgb.max(axis=2)
    values = np.asarray(img.convert("L") if img.mode == "1" else img)
    return values[..., 0] if values.ndim == 3 else values


def binarize_mask(values: np.ndarray) -> np.ndarray:
    """The defect pixels of a mask's values: above half of the largest value (0/1, 0/255,
    0/65535 and JPEG-noisy masks all read as meant); all zeros when the mask is all zero.

    Returns:
        A uint8 array of the same shape with values in {0, 1}.
    """
    values = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0, posinf=0.0,
                           neginf=0.0)
    peak = float(values.max(initial=0.0))
    if peak <= 0:
        return np.zeros(values.shape, dtype=np.uint8)
    return (values > peak / 2.0).astype(np.uint8)


def load_mask(path: PathLike, size: Optional[Size],
              expected_hw: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """Read a ground-truth mask as a square binary tensor.

    A pixel is a defect when its value is above half of the mask's largest value
    (:func:`binarize_mask`): 0/1, 0/255 and 16-bit masks read alike, and the compression noise
    of a JPEG mask (a few levels) is not a defect. RGB and palette masks use their largest
    channel; the EXIF orientation is applied. Resizing is nearest-neighbour so the result stays
    binary.

    Args:
        path: Mask file.
        size: Output side length in pixels, ``(height, width)``, or ``None`` for the mask's
            own size.
        expected_hw: (height, width) of the mask's image; a mask of another size is an error.

    Returns:
        A uint8 tensor of shape (height, width) with values in {0, 1}.

    Raises:
        DataError: The file is unreadable, or its size differs from ``expected_hw``.
    """
    hw = None if size is None else _as_hw(size)
    path = Path(path)
    img = _open_loaded(path, "mask")
    if expected_hw is not None and (img.height, img.width) != tuple(expected_hw):
        raise DataError(f"mask {path} is {img.height}x{img.width} (HxW) but its image is "
                        f"{expected_hw[0]}x{expected_hw[1]}; expected a mask of the image's size")
    try:
        binary = binarize_mask(_mask_values(img))
    except (ValueError, TypeError, OSError) as exc:  # a mode PIL cannot convert
        raise _read_failure(path, "mask", exc) from None
    if hw is not None and binary.shape != hw:
        binary = np.asarray(Image.fromarray(binary).resize((hw[1], hw[0]), Image.NEAREST))
    return torch.from_numpy(binary.copy())


def load_placed_mask(path: Optional[PathLike], placement: Placement,
                     native: bool = False) -> torch.Tensor:
    """A mask (:func:`load_mask`) on its image's canvas (resized to the box, nearest, zero on
    the padding), or with ``native`` at the image's own size; all zeros for ``path=None``.

    Returns:
        A uint8 tensor (H, W) with values in {0, 1}.
    """
    if native:
        if path is None:
            return torch.zeros(placement.source_hw, dtype=torch.uint8)
        return load_mask(path, placement.source_hw)
    if path is None:
        return torch.zeros(placement.canvas_hw, dtype=torch.uint8)
    if placement.is_full:
        return load_mask(path, placement.canvas_hw)
    canvas = torch.zeros(placement.canvas_hw, dtype=torch.uint8)
    top, left, h, w = placement.box
    canvas[top:top + h, left:left + w] = load_mask(path, (h, w))
    return canvas


# ------------------------------------------------------------------------------ test dataset


def _check_mask_sizes(samples: Sequence[Sample]) -> None:
    """Compare each mask's size with its image's from the file headers only."""
    for sample in samples:
        if sample.mask_path is None:
            continue
        image_hw = _header_hw(sample.image_path, "image")
        mask_hw = _header_hw(sample.mask_path, "mask")
        if mask_hw != image_hw:
            raise DataError(f"mask {sample.mask_path} is {mask_hw[0]}x{mask_hw[1]} (HxW) but its "
                            f"image {sample.image_path} is {image_hw[0]}x{image_hw[1]}; expected "
                            f"a mask of the image's size")


class MVTecTestDataset(Dataset):
    """The test split of one category: images, masks and labels.

    Each item is a dict with ``image`` (float32, (3, H, W), in [0, 1], the image on its canvas:
    :mod:`anoseg.data.geometry`), ``mask`` (float32, (1, H, W), in {0, 1}, all zeros for good
    images; with ``native_masks`` at the image's own size instead), ``label`` (int), ``path``
    (str), ``defect_type`` (str) and ``placement`` (the image's
    :class:`~anoseg.data.geometry.Placement`, as a tuple of ints: source height and width,
    canvas height and width, box top, left, height, width). Batch the items with
    :func:`collate_samples` when their canvases or native masks differ in size.

    Args:
        root: Dataset root in MVTec AD layout.
        category: Name of the category folder.
        image_size: Side S (a square), ``(height, width)`` that images and masks are resized
            to, or a :class:`~anoseg.data.geometry.Geometry`.
        check_mask_sizes: Compare mask and image sizes (headers only) before anything else, so a
            bad mask fails at once instead of mid-evaluation.
        native_masks: Read masks at their own size (``eval.resolution=native``).
    """

    def __init__(self, root: PathLike, category: str, image_size: Union[Size, Geometry],
                 check_mask_sizes: bool = True, native_masks: bool = False) -> None:
        if not isinstance(image_size, Geometry):
            _as_hw(image_size)
        self.root = Path(root)
        self.category = category
        self.image_size = image_size
        self.geometry = Geometry.of(image_size)
        self.native_masks = native_masks
        self.samples: List[Sample] = list_test_samples(root, category)
        if check_mask_sizes:
            _check_mask_sizes(self.samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Dict[str, object]:
        sample = self.samples[index]
        canvas, placement = load_placed_image(sample.image_path, self.geometry)
        mask = load_placed_mask(sample.mask_path, placement, native=self.native_masks)
        return {"image": canvas.float().div_(255.0), "mask": mask.float().unsqueeze(0),
                "label": sample.label, "path": str(sample.image_path),
                "defect_type": sample.defect_type,
                "placement": torch.tensor([*placement.source_hw, *placement.canvas_hw,
                                           *placement.box])}


def placement_of(row: Sequence[int]) -> Placement:
    """The :class:`~anoseg.data.geometry.Placement` of a dataset item's ``placement`` row."""
    values = [int(v) for v in row]
    return Placement((values[0], values[1]), (values[2], values[3]), tuple(values[4:8]))


def collate_samples(items: Sequence[Dict[str, object]]) -> Dict[str, object]:
    """Batch dataset items: tensors of one shape are stacked (as the default collate does),
    tensors of different shapes (canvases under tiling, native masks) are kept as lists,
    numbers become a tensor and strings a list."""
    batch: Dict[str, object] = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if isinstance(values[0], torch.Tensor):
            same = all(v.shape == values[0].shape for v in values)
            batch[key] = torch.stack(values) if same else values
        elif isinstance(values[0], numbers.Number):
            batch[key] = torch.tensor(values)
        else:
            batch[key] = values
    return batch


# -------------------------------------------------------------------------- training helpers


def load_images_cached(paths: Sequence[PathLike], size: Size,
                       progress: bool = True) -> torch.Tensor:
    """Decode and resize images once so training does not decode them every epoch.

    Args:
        paths: Image files.
        size: Output side length in pixels, or ``(height, width)``.
        progress: Show a tqdm progress bar.

    Returns:
        A uint8 tensor of shape (N, 3, height, width) in the order of ``paths``.

    Raises:
        DataError: An image is unreadable.
    """
    hw = _as_hw(size)
    images = torch.empty((len(paths), 3, *hw), dtype=torch.uint8)
    for i, path in enumerate(tqdm(paths, desc="caching images", disable=not progress,
                                  leave=False)):
        images[i] = load_image(path, hw)
    return images


def load_placed_cached(paths: Sequence[PathLike], geometry: Geometry, progress: bool = True
                       ) -> Tuple[Union[torch.Tensor, List[torch.Tensor]], List[Placement]]:
    """Decode every image once onto its canvas (:func:`load_placed_image`).

    Returns:
        ``(images, placements)``: the images as one uint8 tensor (N, 3, H, W) when every canvas
        has one size (``stretch`` and ``keep_aspect``), else (tiling) a list of uint8 (3, H, W).

    Raises:
        DataError: An image is unreadable.
    """
    images: List[torch.Tensor] = []
    placements: List[Placement] = []
    for path in tqdm(paths, desc="caching images", disable=not progress, leave=False):
        canvas, placement = load_placed_image(path, geometry)
        images.append(canvas)
        placements.append(placement)
    if not geometry.tiled and images:
        return torch.stack(images), placements
    return images, placements


def _split_rank(path: Path, seed: int) -> str:
    # A hash of (seed, file name) instead of a shuffle: the split does not depend on the list
    # order, the root folder, or the Python/NumPy version, and adding images moves few others.
    return hashlib.sha256(f"{seed}:{path.name}".encode()).hexdigest()


def split_holdout(paths: Sequence[PathLike], fraction: float,
                  seed: int) -> Tuple[List[Path], List[Path]]:
    """Split training images into (train, holdout), deterministically for a given seed.

    The holdout gets ``round(fraction * N)`` images, but at least one when ``fraction > 0`` and
    ``N >= 2``, and never all of them: at least one image is always left for training.

    Args:
        paths: The training images.
        fraction: Fraction to hold out, in [0, 1).
        seed: Seed of the split.

    Returns:
        ``(train, holdout)``, each in the order the paths were given.

    Raises:
        ConfigError: ``fraction`` is outside [0, 1).
        DataError: There are no images to train on.
    """
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"holdout fraction {fraction!r} is invalid; expected a fraction in "
                          f"[0, 1)")
    items = [Path(p) for p in paths]
    total = len(items)
    n_holdout = int(round(fraction * total))
    if fraction > 0 and total >= 2:
        n_holdout = max(n_holdout, 1)
    n_holdout = min(n_holdout, max(total - 1, 0))
    if total - n_holdout < 1:
        raise DataError(f"no training images to split (got {total}); expected at least one "
                        f"image in train/good")
    ranked = sorted(range(total), key=lambda i: (_split_rank(items[i], seed), str(items[i])))
    held = set(ranked[:n_holdout])
    train = [p for i, p in enumerate(items) if i not in held]
    holdout = [p for i, p in enumerate(items) if i in held]
    return train, holdout
