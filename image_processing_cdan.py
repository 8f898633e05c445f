"""CDAN image processor: chest X-ray loading (paths, PIL images, arrays, DICOM files), preprocessing of the views,
and their lesion boxes.

The transforms follow R2Gen (Chen et al., "Generating Radiology Reports via Memory-driven Transformer", EMNLP 2020;
github.com/zhjohnchan/R2Gen, `modules/dataloaders.py`): a deterministic bilinear resize to `image_size` x
`image_size` with ImageNet normalisation for evaluation, and resize / random crop augmentation for training.
[`CdanImageProcessor`] is a Transformers 5.x `BaseImageProcessor`, laid out like
`models/blip/image_processing_blip.py`, so that a saved folder loads with
`AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)`. DICOM files are read by
`dicom_cdan.read_dicom`.

The lesion boxes of D2R-Net (Tang et al., "From Detection to Radiology Report Generation: Fine-Grained Multi-Modal
Alignment with Semi-Supervised Learning", J Imaging Inform Med 2025, doi:10.1007/s10278-025-01650-z) are given per
view in pixels of the input image, cleaned by `data_cdan.boxes.clean_boxes`, and moved with every geometric
transform as torchvision `tv_tensors.BoundingBoxes`.
"""

import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from transformers.processing_utils import ImagesKwargs
from transformers.utils import logging


logger = logging.get_logger(__name__)

try:
    from .dicom_cdan import DicomImage, read_dicom
except ImportError:
    from dicom_cdan import DicomImage, read_dicom


# --------------------------------------------------------------------------------------------------------------------
# Image loading
# --------------------------------------------------------------------------------------------------------------------

ImageInput = str | os.PathLike | PIL.Image.Image | np.ndarray

HIGH_BIT_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
"""Single-channel PIL modes with more than 8 bits, rescaled to 8 bits by their own minimum..maximum."""

ALPHA_MODES = ("RGBA", "LA", "PA", "P", "RGBa")
"""Modes that may carry transparency: composited on black (see [`load_image`])."""


def rescale_to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Linearly map an array's own minimum..maximum to 0..255 (`uint8`); a constant array maps to zeros."""
    pixels = pixels.astype(np.float64)
    if not np.isfinite(pixels).all():
        raise ValueError("The image has NaN or infinite pixel values.")
    lowest, highest = pixels.min(), pixels.max()
    if highest == lowest:
        return np.zeros(pixels.shape, dtype=np.uint8)
    return np.round((pixels - lowest) * 255.0 / (highest - lowest)).astype(np.uint8)


def composite_on_black(image: PIL.Image.Image) -> PIL.Image.Image:
    """Flatten an image with transparency onto a black background and return it as RGB."""
    rgba = image.convert("RGBA")
    black = PIL.Image.new("RGBA", rgba.size, (0, 0, 0, 255))
    return PIL.Image.alpha_composite(black, rgba).convert("RGB")


def array_to_pil(pixels: np.ndarray) -> PIL.Image.Image:
    """An HxW or HxWxC (C in 1, 3, 4) array as a PIL image; non-`uint8` arrays are min-max rescaled to 8 bits."""
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    if pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[-1] not in (3, 4)):
        raise ValueError(
            f"An image array must have shape (height, width) or (height, width, channels) with 1, 3 or 4 channels "
            f"last; got shape {pixels.shape}."
        )
    if pixels.shape[0] == 0 or pixels.shape[1] == 0:
        raise ValueError(f"The image array is empty (shape {pixels.shape}).")
    if pixels.dtype == np.bool_ or np.issubdtype(pixels.dtype, np.integer) or np.issubdtype(pixels.dtype, np.floating):
        if pixels.dtype != np.uint8:
            pixels = rescale_to_uint8(pixels)
    else:
        raise ValueError(f"Unsupported image array dtype {pixels.dtype}; use an integer or floating-point array.")
    if pixels.ndim == 2:
        return PIL.Image.fromarray(np.ascontiguousarray(pixels), mode="L")
    return PIL.Image.fromarray(np.ascontiguousarray(pixels), mode="RGB" if pixels.shape[-1] == 3 else "RGBA")


def pil_to_rgb(image: PIL.Image.Image, source: str) -> PIL.Image.Image:
    """Convert a loaded PIL image of any supported mode to 8-bit RGB; `source` names it in error messages."""
    width, height = image.size
    if width == 0 or height == 0:
        raise ValueError(f"The image {source} is empty (width {width}, height {height}).")
    mode = image.mode
    try:
        if mode == "RGB":
            return image.copy()
        if mode in HIGH_BIT_DEPTH_MODES:
            return PIL.Image.fromarray(rescale_to_uint8(np.asarray(image)), mode="L").convert("RGB")
        if mode in ALPHA_MODES:
            return composite_on_black(image)
        return image.convert("RGB")
    except (ValueError, OSError) as error:
        raise ValueError(f"Unsupported image mode {mode!r} for the image {source}: {error}") from error


URL_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
"""A scheme such as `https://` at the start of an image path: a URL, which is not fetched."""

DICOM_MAGIC_OFFSET = 128
DICOM_MAGIC = b"DICM"
"""DICOM Part 10 files have a 128-byte preamble followed by these 4 bytes."""


def check_image_path(image: str | os.PathLike) -> Path:
    """
    The path of an image file, after checking that it names one: raises `ValueError` for an empty string, a URL or a
    directory, and `FileNotFoundError` (naming the path) when nothing is there.
    """
    text = os.fspath(image)
    if isinstance(text, str) and not text.strip():
        raise ValueError(f"The image path is empty ({text!r}); give the path of an image file (PNG or JPEG).")
    if isinstance(text, str) and URL_PATTERN.match(text):
        raise ValueError(
            f"The image path {text} is a URL, and URLs are not fetched: download the file first and pass its local "
            "path."
        )
    path = Path(text)
    if path.is_dir():
        raise ValueError(f"The image path {path} is a directory; give the path of one image file.")
    if not path.exists():
        raise FileNotFoundError(f"Image file not found: {path}")
    if not path.is_file():
        raise ValueError(f"The image path {path} is not a regular file; give the path of an image file.")
    return path


def is_dicom_file(path: Path) -> bool:
    """Whether the file at `path` starts like a DICOM Part 10 file ("DICM" after the 128-byte preamble)."""
    try:
        with open(path, "rb") as file:
            file.seek(DICOM_MAGIC_OFFSET)
            return file.read(len(DICOM_MAGIC)) == DICOM_MAGIC
    except OSError:
        return False


def is_dicom_path(image: ImageInput) -> bool:
    """Whether `image` is the path of an existing DICOM Part 10 file (checked by its header, not its name)."""
    return isinstance(image, (str, os.PathLike)) and is_dicom_file(check_image_path(image))


def dicom_to_float_image(dicom_image: DicomImage) -> tv_tensors.Image:
    """A DICOM image as a float32 `tv_tensors.Image` `(3, H, W)` in [0, 1] (min..max after windowing, grey x 3)."""
    grey = torch.from_numpy(dicom_image.to_float01())
    return tv_tensors.Image(grey.unsqueeze(0).expand(3, -1, -1).contiguous())


def load_image(image: ImageInput) -> PIL.Image.Image:
    """
    Load one chest X-ray view as an 8-bit RGB PIL image.

    Supported inputs and how they are converted:
        - a file path (`str` or `os.PathLike`) to anything PIL reads (PNG, JPEG, ...), or a `PIL.Image.Image`;
        - a DICOM file (recognised by its "DICM" header, whatever its name): read with [`dicom_cdan.read_dicom`]
          (Modality LUT / rescale, VOI LUT or window, MONOCHROME1 inverted, first frame of a multi-frame file), then
          rescaled to 8 bits by its own minimum..maximum after windowing;
        - 8-bit greyscale ("L") and 1-bit ("1") images: grey replicated to three channels;
        - 16-bit or 32-bit greyscale ("I;16", "I;16B", "I;16L", "I", and floating-point "F"): rescaled to 8 bits by
          the image's OWN minimum..maximum (the darkest pixel becomes 0, the brightest 255; a constant image
          becomes all zeros), since such files rarely use the full 16-bit range;
        - RGB as is; "CMYK", "YCbCr" and other modes PIL can convert: converted to RGB;
        - images with transparency ("RGBA", "LA", "P"/"PA" palettes): composited on a BLACK background, so
          transparent pixels become black like the background of a radiograph (fully opaque images are unchanged);
        - `numpy` arrays of shape (height, width) or (height, width, 1|3|4) channels last: `uint8` as is, any other
          integer, boolean or floating dtype min-max rescaled to 8 bits as above.

    Args:
        image (`str`, `os.PathLike`, `PIL.Image.Image` or `np.ndarray`): the view to load.

    Returns:
        `PIL.Image.Image`: an RGB image.

    Raises:
        `FileNotFoundError`: the path does not exist (the message names it).
        `ImportError`: a DICOM file is compressed and no installed package decodes it (the message names the
            transfer syntax and the packages; the error is also a `ValueError`), or pydicom is not installed.
        `ValueError`: the path is empty, a URL (not fetched) or a directory; the file cannot be decoded (corrupt,
            truncated, not an image; a DICOM file without pixel data or in a transfer syntax pydicom cannot decode);
            a PIL image was closed; the image is empty (zero width or height), its mode or array layout is
            unsupported. The message names the path, mode or shape.
        `TypeError`: the input is of another type.
    """
    if isinstance(image, (str, os.PathLike)):
        path = check_image_path(image)
        if is_dicom_file(path):
            return read_dicom(path).to_pil()
        try:
            with PIL.Image.open(path) as opened:
                opened.load()
                return pil_to_rgb(opened, source=str(path))
        except (PIL.UnidentifiedImageError, OSError, SyntaxError, EOFError, PIL.Image.DecompressionBombError) as error:
            if path.suffix.lower() in (".dcm", ".dicom"):
                raise ValueError(
                    f"The image file {path} is named as DICOM but has no DICOM header ('DICM' after a 128-byte "
                    "preamble) and is no image PIL reads. For a header-less (ACR-NEMA style) DICOM file, pass "
                    "`dicom_cdan.read_dicom(path, force=True).pixels` instead of the path."
                ) from error
            raise ValueError(f"Cannot read the image file {path}: {error}") from error
    if isinstance(image, PIL.Image.Image):
        description = f"The PIL image ({image.mode}, {image.size[0]}x{image.size[1]})"
        try:
            image.load()
        except (ValueError, AssertionError) as error:  # `close()` released the pixels, or the file closed unread
            raise ValueError(
                f"{description} cannot be read: it was closed (`close()`), or its file was closed before its pixels "
                "were read (a `with PIL.Image.open(...)` block ended before `load()`). Pass the image while it is "
                "open, or pass its file path."
            ) from error
        except (OSError, SyntaxError, EOFError) as error:
            raise ValueError(f"Cannot read the PIL image ({image.mode}, {image.size}): {error}") from error
        return pil_to_rgb(image, source=f"given as a PIL image ({image.mode})")
    if isinstance(image, np.ndarray):
        return pil_to_rgb(array_to_pil(image), source=f"given as an array of shape {image.shape}")
    raise TypeError(
        "An image must be a file path (str or os.PathLike), a PIL.Image.Image or a numpy array; "
        f"got {type(image).__name__}."
    )


def is_single_image(item: Any) -> bool:
    """Whether `item` is one image (path, PIL image or array) rather than a list of images."""
    return isinstance(item, (str, os.PathLike, PIL.Image.Image, np.ndarray))


DEGENERATE_IMAGE_ACTIONS = ("warn", "error")
"""What [`CdanImageProcessor`] does with an image that cannot be a chest film: warn and go on, or refuse."""

MIN_IMAGE_SIDE = 32
"""Shorter side, in pixels, below which an image is too small to be a chest film."""

MAX_ASPECT_RATIO = 4.0
"""Longer side over shorter side above which an image cannot be a chest film (real ones are near 1:1)."""


def degenerate_image_reasons(image: PIL.Image.Image) -> list[str]:
    """Why a loaded RGB view cannot be a chest X-ray (tiny, extreme aspect ratio, constant or binary pixels)."""
    width, height = image.size
    reasons = []
    if min(width, height) < MIN_IMAGE_SIDE:
        reasons.append(f"it is {width}x{height} px, smaller than {MIN_IMAGE_SIDE} px on a side")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        reasons.append(f"its aspect ratio ({width}x{height} px) is beyond {MAX_ASPECT_RATIO:g}:1")
    histogram = np.asarray(image.histogram()).reshape(-1, 256)  # one row of 256 counts per channel
    levels = int((histogram > 0).sum(axis=1).max())  # distinct values of the most varied channel
    if levels == 1:
        reasons.append("all its pixels have the same value")
    elif levels == 2:
        reasons.append("it has only two pixel values (a binary image, such as a boolean array)")
    return reasons


def describe_image(image: ImageInput) -> str:
    """A short name of an image input for messages: its path, or its type with mode and size or shape."""
    if isinstance(image, PIL.Image.Image):
        return f"a PIL image ({image.mode}, {image.size[0]}x{image.size[1]})"
    if isinstance(image, np.ndarray):
        return f"an array of shape {image.shape} ({image.dtype})"
    return os.fspath(image)


# --------------------------------------------------------------------------------------------------------------------
# Lesion boxes (D2R-Net): per view, in pixels of the given image, moved with every geometric transform
# --------------------------------------------------------------------------------------------------------------------

DEFAULT_MAX_LESION_BOXES = 10
"""Default `max_lesion_boxes`: the rows per view of `lesion_boxes` (the highest-scoring boxes are kept)."""


def import_box_tools():
    """
    The `data_cdan.boxes` module ([`LesionBox`], [`clean_boxes`]), imported on first use so that processors without
    boxes never load `datasets`. Remote code copied into a checkpoint has no `data_cdan`, hence the clear error.
    """
    try:
        from data_cdan import boxes as box_tools
    except ImportError as error:
        raise ImportError(
            "Lesion boxes need the CDAN library's `data_cdan` package (install the repository with `pip install -e .`)"
            f"; it cannot be imported: {error}"
        ) from error
    return box_tools


def as_lesion_box(value: Any, position: str):
    """
    One box given to the processor as a `data_cdan.boxes.LesionBox`.

    Args:
        value (`LesionBox`, `dict` or 4 numbers): a `LesionBox`, a [`BOX_FEATURES`] dict (`x_min`, `y_min`, `x_max`,
            `y_max`, `label`, `score`, `source`), or `[x_min, y_min, x_max, y_max]` (label `""`, score 1.0).
        position (`str`): where the box is, for error messages (e.g. "study 0, view 1, box 2").

    Raises:
        `ValueError`: any other structure, such as a dict missing a field or a list of 3 numbers.
    """
    box_tools = import_box_tools()
    if isinstance(value, box_tools.LesionBox):
        return value
    if isinstance(value, Mapping):
        try:
            return box_tools.LesionBox.from_row(value)
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(
                f"The box at {position} is a dict but not a BOX_FEATURES row (x_min, y_min, x_max, y_max, label, "
                f"score, source): {type(error).__name__}: {error}."
            ) from error
    if isinstance(value, (torch.Tensor, np.ndarray)):
        value = value.tolist()
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        if len(value) != 4 or not all(box_tools._is_number(coordinate) for coordinate in value):
            raise ValueError(
                f"The box at {position} is {value!r}; a box given as a list must be 4 numbers "
                "[x_min, y_min, x_max, y_max] in pixels of its image."
            )
        return box_tools.LesionBox(*(float(coordinate) for coordinate in value), label="")
    raise ValueError(
        f"The box at {position} is a {type(value).__name__}; give a LesionBox, a BOX_FEATURES dict or "
        "[x_min, y_min, x_max, y_max]."
    )


def given_view_counts(images: Any) -> list[int]:
    """How many views each study of `images` was given with (before a single view is repeated)."""
    if is_single_image(images):
        return [1]
    return [len(study) if isinstance(study, (list, tuple)) else 1 for study in images]


def check_per_study_list(name: str, values: Any, num_studies: int) -> list | None:
    """`values` as a list of one item per study (`None` stays `None`); raises `ValueError` for another length."""
    if values is None:
        return None
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"`{name}` must be a list with one item per study, got {type(values).__name__}.")
    values = list(values)
    if len(values) != num_studies:
        raise ValueError(
            f"`{name}` has {len(values)} item(s) but there are {num_studies} studies; give one per study."
        )
    return values


def check_lesion_boxes(boxes: Any, view_counts: Sequence[int]) -> list[list[list] | None]:
    """
    The `boxes` argument checked against the studies' view counts and converted: per study `None` or, per given view,
    a list of `LesionBox` (a view given as `None` has none).

    Raises:
        `TypeError` / `ValueError`: `boxes` is not one item per study, a study's list does not have one entry per
            given view, or a box has the wrong structure (see [`as_lesion_box`]).
    """
    studies = check_per_study_list("boxes", boxes, len(view_counts))
    converted = []
    for study_index, (study, view_count) in enumerate(zip(studies, view_counts)):
        if study is None:
            converted.append(None)
            continue
        if isinstance(study, (str, bytes, Mapping)) or not isinstance(study, Sequence):
            raise ValueError(
                f"`boxes` of study {study_index} must be None or a list with one entry per view, got "
                f"{type(study).__name__}."
            )
        if len(study) != view_count:
            raise ValueError(
                f"`boxes` of study {study_index} has {len(study)} entries but the study was given {view_count} "
                "view(s); give one entry (a list of boxes, or None) per view."
            )
        views = []
        for view_index, view_boxes in enumerate(study):
            if view_boxes is None:
                views.append([])
                continue
            if isinstance(view_boxes, (str, bytes, Mapping)) or not isinstance(view_boxes, Sequence):
                raise ValueError(
                    f"`boxes` of study {study_index}, view {view_index} must be None or a list of boxes, got "
                    f"{type(view_boxes).__name__}."
                )
            views.append(
                [
                    as_lesion_box(box, f"study {study_index}, view {view_index}, box {box_index}")
                    for box_index, box in enumerate(view_boxes)
                ]
            )
        converted.append(views)
    return converted


def check_max_lesion_boxes(max_lesion_boxes: Any) -> int:
    """`max_lesion_boxes` as a positive `int`; raises `ValueError` otherwise."""
    is_integer = isinstance(max_lesion_boxes, (int, np.integer)) and not isinstance(max_lesion_boxes, bool)
    if not is_integer or max_lesion_boxes < 1:
        raise ValueError(f"`max_lesion_boxes` must be a positive integer, got {max_lesion_boxes!r}.")
    return int(max_lesion_boxes)


def loaded_image_size(image: PIL.Image.Image | tv_tensors.Image) -> tuple[int, int]:
    """`(width, height)` of a view as [`CdanImageProcessor.load_view`] returns it (PIL image or `(3, H, W)` tensor)."""
    if isinstance(image, PIL.Image.Image):
        return image.size
    return int(image.shape[-1]), int(image.shape[-2])


# --------------------------------------------------------------------------------------------------------------------
# Image processor
# --------------------------------------------------------------------------------------------------------------------


class CdanImageProcessorKwargs(ImagesKwargs, total=False):
    """Keyword arguments of [`CdanImageProcessor`] on top of the standard `ImagesKwargs`."""

    image_size: int
    num_views: int
    repeat_single_view: bool
    augment_resize_size: int | None
    augment_rotation_degrees: float
    augment_translate: float
    augment_scale_range: float
    augment_horizontal_flip: bool
    on_degenerate_image: str


class CdanImageProcessor(BaseImageProcessor):
    r"""
    Turns chest X-ray studies (one or more views each) into `pixel_values` of shape
    `(batch, num_views, 3, image_size, image_size)`.

    The deterministic path is R2Gen's test transform: bilinear resize to `image_size` x `image_size` (aspect ratio
    not kept), scaling to [0, 1] and ImageNet normalisation. Training augmentation
    ([`~CdanImageProcessor.train_transform`], or `preprocess(..., do_augment=True)`) follows R2Gen's training
    transform: resize of the shorter side to `augment_resize_size`, random crop to `image_size`, plus a small random
    affine transform. Horizontal flipping is OFF by default, unlike R2Gen: the side of a finding ("left pleural
    effusion") is part of the report, and a flipped image paired with an unflipped report teaches the model the wrong
    laterality. Random draws come from torch's global generator, so augmentation is reproducible under
    `torch.manual_seed`.

    Args:
        image_size (`int`, *optional*, defaults to 224):
            Height and width of each processed view.
        image_mean (`list[float]`, *optional*, defaults to ImageNet's mean):
            Per-channel mean used for normalisation.
        image_std (`list[float]`, *optional*, defaults to ImageNet's standard deviation):
            Per-channel standard deviation used for normalisation.
        num_views (`int`, *optional*, defaults to 2):
            Number of views per study the model reads (IU X-Ray: 2, MIMIC-CXR in R2Gen: 1).
        repeat_single_view (`bool`, *optional*, defaults to `True`):
            When a study comes as ONE image and `num_views > 1`, repeat it to fill the views (a warning is logged
            once). Any other number of views different from `num_views` raises `ValueError`.
        augment_resize_size (`int`, *optional*):
            Shorter-side size before the random crop when augmenting; defaults to `round(image_size * 256 / 224)`
            (R2Gen's 256 for 224).
        augment_rotation_degrees (`float`, *optional*, defaults to 5.0):
            Maximum absolute random rotation, in degrees, when augmenting.
        augment_translate (`float`, *optional*, defaults to 0.02):
            Maximum random shift, as a fraction of width and height, when augmenting.
        augment_scale_range (`float`, *optional*, defaults to 0.05):
            Random zoom in `[1 - augment_scale_range, 1 + augment_scale_range]` when augmenting.
        augment_horizontal_flip (`bool`, *optional*, defaults to `False`):
            Whether augmentation flips images left-right with probability 0.5 (see above why it is off).
        on_degenerate_image (`str`, *optional*, defaults to `"warn"`):
            What to do with a view that cannot be a chest X-ray: shorter side under 32 px, aspect ratio beyond 4:1,
            all pixels equal, or only two pixel values (a binary or boolean image). `"warn"` emits a `UserWarning`
            naming the view and the reason and processes it; `"error"` raises `ValueError` instead.
    """

    valid_kwargs = CdanImageProcessorKwargs
    model_input_names = ["pixel_values"]

    def __init__(
        self,
        image_size: int = 224,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        num_views: int = 2,
        repeat_single_view: bool = True,
        augment_resize_size: int | None = None,
        augment_rotation_degrees: float = 5.0,
        augment_translate: float = 0.02,
        augment_scale_range: float = 0.05,
        augment_horizontal_flip: bool = False,
        on_degenerate_image: str = "warn",
        **kwargs,
    ):
        super().__init__(**kwargs)
        check_degenerate_image_action(on_degenerate_image)
        if image_size < 1:
            raise ValueError(f"`image_size` must be positive, got {image_size}.")
        if num_views < 1:
            raise ValueError(f"`num_views` must be at least 1, got {num_views}.")
        if augment_resize_size is not None and augment_resize_size < image_size:
            raise ValueError(
                f"`augment_resize_size` ({augment_resize_size}) must be at least `image_size` ({image_size}) so "
                "that the random crop fits."
            )
        self.image_size = int(image_size)
        self.image_mean = [float(value) for value in (image_mean if image_mean is not None else IMAGENET_DEFAULT_MEAN)]
        self.image_std = [float(value) for value in (image_std if image_std is not None else IMAGENET_DEFAULT_STD)]
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError(f"`image_mean` and `image_std` need 3 values, got {self.image_mean}, {self.image_std}.")
        self.num_views = int(num_views)
        self.repeat_single_view = bool(repeat_single_view)
        self.augment_resize_size = augment_resize_size
        self.augment_rotation_degrees = float(augment_rotation_degrees)
        self.augment_translate = float(augment_translate)
        self.augment_scale_range = float(augment_scale_range)
        self.augment_horizontal_flip = bool(augment_horizontal_flip)
        self.on_degenerate_image = on_degenerate_image

    def normalization_steps(self) -> list:
        """PIL image -> float32 tensor in [0, 1] -> normalised with `image_mean` / `image_std`."""
        return [
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=self.image_mean, std=self.image_std),
        ]

    def eval_transform(self) -> v2.Compose:
        """
        The deterministic transform (R2Gen's test transform).

        Returns:
            `torchvision.transforms.v2.Compose`: maps an RGB PIL image to a normalised float32 tensor
            `(3, image_size, image_size)` (bilinear, antialiased resize).
        """
        size = (self.image_size, self.image_size)
        return v2.Compose(
            [v2.Resize(size, interpolation=v2.InterpolationMode.BILINEAR, antialias=True), *self.normalization_steps()]
        )

    def train_transform(self) -> v2.Compose:
        """
        The training transform with augmentation (R2Gen's training transform, horizontal flip off by default).

        Resize of the shorter side to `augment_resize_size`, random crop to `image_size`, random affine
        (rotation up to `augment_rotation_degrees`, shift up to `augment_translate`, zoom within
        `augment_scale_range`; uncovered corners are black), optional horizontal flip, then normalisation. Draws use
        torch's global generator, so results repeat under `torch.manual_seed`.

        Returns:
            `torchvision.transforms.v2.Compose`: maps an RGB PIL image to a normalised float32 tensor
            `(3, image_size, image_size)`.
        """
        resize_size = self.augment_resize_size or round(self.image_size * 256 / 224)
        steps = [
            v2.Resize(resize_size, interpolation=v2.InterpolationMode.BILINEAR, antialias=True),
            v2.RandomCrop(self.image_size),
            v2.RandomAffine(
                degrees=self.augment_rotation_degrees,
                translate=(self.augment_translate, self.augment_translate),
                scale=(1.0 - self.augment_scale_range, 1.0 + self.augment_scale_range),
                interpolation=v2.InterpolationMode.BILINEAR,
            ),
        ]
        if self.augment_horizontal_flip:
            steps.append(v2.RandomHorizontalFlip(p=0.5))
        return v2.Compose([*steps, *self.normalization_steps()])

    def group_into_studies(self, images: Any) -> list[list[ImageInput]]:
        """
        Normalise the accepted input layouts into a list of studies, each a list of exactly `num_views` views.

        A single image is one study; a list (or tuple) is a batch whose items are either an image (a one-view study)
        or a list/tuple of images (the views of one study).
        """
        if is_single_image(images):
            studies = [[images]]
        elif isinstance(images, Sequence) and not isinstance(images, (str, bytes)):  # lists, tuples, dataset columns
            images = list(images)
            if len(images) == 0:
                raise ValueError("No image given: `images` is an empty list.")
            studies = [list(study) if isinstance(study, (list, tuple)) else [study] for study in images]
        elif images is None:
            raise ValueError("No image given: `images` is None.")
        else:
            raise TypeError(
                "`images` must be an image (path, PIL image or numpy array), or a list whose items are images or "
                f"lists of images (one item per study); got {type(images).__name__}."
            )
        for study_index, views in enumerate(studies):
            if len(views) == 0:
                raise ValueError(f"Study {study_index} has no image (0 views); each study needs at least one view.")
            for view in views:
                if not is_single_image(view):
                    raise TypeError(
                        f"Study {study_index} has a view of type {type(view).__name__}; a view must be a file path, "
                        "a PIL image or a numpy array (nest at most one level: a list of studies, each a list of "
                        "views)."
                    )
            if len(views) == self.num_views:
                continue
            if len(views) == 1 and self.repeat_single_view:
                logger.warning_once(
                    f"A study was given as one image but this processor expects num_views={self.num_views}; the "
                    "image is repeated to fill the views (set `repeat_single_view=False` to make this an error)."
                )
                studies[study_index] = views * self.num_views
            else:
                raise ValueError(
                    f"Study {study_index} has {len(views)} view(s) but this processor expects "
                    f"num_views={self.num_views}."
                )
        return studies

    def preprocess(
        self,
        images: Any,
        return_tensors: str | None = "pt",
        do_augment: bool = False,
        on_degenerate_image: str | None = None,
        boxes: Sequence[Sequence[Sequence[Any] | None] | None] | None = None,
        max_lesion_boxes: int = DEFAULT_MAX_LESION_BOXES,
        **kwargs,
    ) -> BatchFeature:
        """
        Load, resize and normalise a batch of studies, and move their lesion boxes with them.

        Args:
            images (image, or `list` of images / of lists of images):
                One image (file path, PIL image or array) for one study, or a list whose items are each one study: an
                image, or a list/tuple of the study's views. See [`load_image`] for the accepted image formats.
            return_tensors (`str`, *optional*, defaults to `"pt"`):
                `"pt"` for a torch tensor or `"np"` for a numpy array (`None` means `"pt"`).
            do_augment (`bool`, *optional*, defaults to `False`):
                Use the random [`~CdanImageProcessor.train_transform`] instead of the deterministic resize.
            on_degenerate_image (`str`, *optional*):
                `"warn"` or `"error"`: overrides the processor's `on_degenerate_image` for this call.
            boxes (`list`, *optional*):
                Per study, `None` or one entry per view it was given with, each `None` or a list of lesion boxes in
                pixels of that input image (see [`CdanProcessor.__call__`] for the accepted forms, the cleaning and
                the warning).
            max_lesion_boxes (`int`, *optional*, defaults to 10):
                `K`, the most boxes kept per view (the highest scores).

        Returns:
            [`BatchFeature`]: `pixel_values`, float32 of shape `(batch, num_views, 3, image_size, image_size)`, and
            when `boxes` is given `lesion_boxes`, float32 `(batch, num_views, K, 4)` (xyxy in pixels of the
            processed view, padding rows 0), and `lesion_box_mask`, bool `(batch, num_views, K)`.
        """
        if kwargs:
            raise TypeError(f"Unexpected keyword argument(s) for CdanImageProcessor.preprocess: {sorted(kwargs)}.")
        tensor_type = check_return_tensors(return_tensors)
        action = self.on_degenerate_image if on_degenerate_image is None else on_degenerate_image
        check_degenerate_image_action(action)
        studies = self.group_into_studies(images)
        study_boxes = None
        if boxes is not None:
            max_lesion_boxes = check_max_lesion_boxes(max_lesion_boxes)
            study_boxes = check_lesion_boxes(boxes, given_view_counts(images))
        transform = self.train_transform() if do_augment else self.eval_transform()
        study_tensors = []
        num_box_rows = max_lesion_boxes if boxes is not None else 0
        box_rows = torch.zeros(len(studies), self.num_views, num_box_rows, 4)  # (B, V, K, 4)
        box_mask = torch.zeros(box_rows.shape[:-1], dtype=torch.bool)  # (B, V, K)
        cleaning_reports = {}
        for study_index, views in enumerate(studies):
            loaded: dict[int, PIL.Image.Image] = {}  # a single view repeated to fill the study is read once
            for view_index, view in enumerate(views):
                if id(view) not in loaded:
                    loaded[id(view)] = self.load_view(view, f"study {study_index}, view {view_index}", action)
            if study_boxes is None or study_boxes[study_index] is None:
                study_tensors.append(torch.stack([transform(loaded[id(view)]) for view in views]))
                continue
            view_boxes, cleaning_reports[study_index] = self.clean_study_boxes(
                study_boxes[study_index], [loaded[id(view)] for view in views], max_lesion_boxes
            )
            view_tensors = []
            for view_index, view in enumerate(views):
                pixels, moved = self.transform_with_boxes(transform, loaded[id(view)], view_boxes[view_index])
                view_tensors.append(pixels)
                box_rows[study_index, view_index, : len(moved)] = moved
                box_mask[study_index, view_index, : len(moved)] = True
            study_tensors.append(torch.stack(view_tensors))
        data = {"pixel_values": torch.stack(study_tensors)}
        if boxes is not None:
            self.warn_about_cleaned_boxes(cleaning_reports, max_lesion_boxes)
            data.update(lesion_boxes=box_rows, lesion_box_mask=box_mask)
        if tensor_type == "np":
            data = {key: value.numpy() for key, value in data.items()}
        return BatchFeature(data=data, tensor_type=tensor_type)

    def clean_study_boxes(
        self, given_boxes: list[list], views: list[PIL.Image.Image | tv_tensors.Image], max_lesion_boxes: int
    ) -> tuple[list[list], Any]:
        """
        `clean_boxes(..., max_boxes=max_lesion_boxes)` of each view a study was given with, on that view's input size;
        a study given as one image (repeated to `num_views`) gets its boxes repeated.

        Args:
            given_boxes (`list[list[LesionBox]]`): per given view, its boxes.
            views (`list`): the study's loaded views after repetition (`num_views` of them).
            max_lesion_boxes (`int`): the most boxes kept per view.

        Returns:
            `(boxes per view, BoxCleaningReport)`: `num_views` lists of kept boxes, and the counts of the given views.
        """
        box_tools = import_box_tools()
        report = box_tools.BoxCleaningReport()
        kept_per_view = []
        for view_boxes, image in zip(given_boxes, views):
            width, height = loaded_image_size(image)
            kept, view_report = box_tools.clean_boxes(view_boxes, width, height, max_boxes=max_lesion_boxes)
            kept_per_view.append(kept)
            report += view_report
        if len(kept_per_view) == 1 and len(views) > 1:
            kept_per_view = kept_per_view * len(views)
        return kept_per_view, report

    def lesion_box_rows(
        self, views: Sequence[ImageInput], boxes: Sequence[Sequence[Any] | None], max_lesion_boxes: int
    ) -> list[list[tuple[int, int, Any]]]:
        """
        What each row of one study's `lesion_boxes` is in the study as it was given, for the deterministic transform
        (which keeps every cleaned box, so row `k` of a view is its `k`-th kept box): the cleaning is the very
        `clean_study_boxes` call of [`~CdanImageProcessor.preprocess`], on boxes tagged with their position.

        Args:
            views (`Sequence`): the study's views as given (before a single view is repeated).
            boxes (`Sequence`): one entry per given view, `None` or a list of boxes in pixels of that view (any form
                [`CdanProcessor.__call__`] accepts).
            max_lesion_boxes (`int`): `K`, the most boxes kept per view.

        Returns:
            `list[list[tuple[int, int, LesionBox]]]`: per processed view (`num_views`), one
            `(given view, index in that view's box list, cleaned box in pixels of the given image)` per row, in row
            order. A clipped box has its clipped corners.
        """
        (given_boxes,) = check_lesion_boxes([boxes], [len(views)])
        (study,) = self.group_into_studies([list(views)])
        loaded = [self.load_view(view, f"view {index}", self.on_degenerate_image) for index, view in enumerate(study)]
        # The label carries "view:index" through the cleaning (which never reads labels), then gets its value back
        tagged = [
            [replace(box, label=f"{view_index}:{box_index}") for box_index, box in enumerate(view_boxes)]
            for view_index, view_boxes in enumerate(given_boxes)
        ]
        kept_per_view, _ = self.clean_study_boxes(tagged, loaded, max_lesion_boxes)
        rows = []
        for kept in kept_per_view:
            positions = [tuple(int(part) for part in box.label.split(":")) for box in kept]
            rows.append([
                (view_index, box_index, replace(box, label=given_boxes[view_index][box_index].label))
                for (view_index, box_index), box in zip(positions, kept)
            ])  # fmt: skip
        return rows

    @staticmethod
    def transform_with_boxes(
        transform: v2.Compose, image: PIL.Image.Image | tv_tensors.Image, boxes: Sequence[Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Apply `transform` to a view and its boxes in ONE call, so that both see the same random draw (crop, affine,
        flip). Boxes are clipped to the processed view; those left without area (moved out of it by augmentation)
        are dropped.

        Args:
            transform (`v2.Compose`): [`~CdanImageProcessor.eval_transform`] or
                [`~CdanImageProcessor.train_transform`].
            image (`PIL.Image.Image` or `tv_tensors.Image`): the loaded view.
            boxes (`Sequence[LesionBox]`): its cleaned boxes, in pixels of `image`.

        Returns:
            `(pixels, boxes)`: the view `(3, H, W)` and its kept boxes `(N, 4)`, xyxy in pixels of the view.
        """
        width, height = loaded_image_size(image)
        coordinates = torch.tensor([box.xyxy for box in boxes], dtype=torch.float32).reshape(-1, 4)  # (N, 4)
        bounding_boxes = tv_tensors.BoundingBoxes(coordinates, format="XYXY", canvas_size=(height, width))
        pixels, moved = transform(image, bounding_boxes)
        moved = moved.as_subclass(torch.Tensor)  # (N, 4)
        out_height, out_width = pixels.shape[-2:]
        moved = torch.minimum(moved.clamp(min=0), moved.new_tensor([out_width, out_height, out_width, out_height]))
        has_area = (moved[:, 2] > moved[:, 0]) & (moved[:, 3] > moved[:, 1])  # (N,)
        return pixels, moved[has_area]

    @staticmethod
    def warn_about_cleaned_boxes(cleaning_reports: dict[int, Any], max_lesion_boxes: int) -> None:
        """One warning for the call when cleaning dropped or clipped boxes: the summed counts and the studies."""
        changed = {index: report for index, report in cleaning_reports.items() if report.dropped or report.clipped}
        if not changed:
            return
        total = sum(changed.values(), start=import_box_tools().BoxCleaningReport())
        logger.warning(
            f"Lesion boxes of studies {sorted(changed)} were cleaned ({total}): boxes with non-finite, inverted or "
            "equal corners or outside their image are dropped, boxes crossing its border are clipped, and at most "
            f"max_lesion_boxes={max_lesion_boxes} per view are kept (the highest scores)."
        )

    @staticmethod
    def load_view(view: ImageInput, position: str, on_degenerate_image: str) -> PIL.Image.Image | tv_tensors.Image:
        """
        [`load_image`], then warn about or refuse a view that cannot be a chest X-ray (`on_degenerate_image`).

        A DICOM file comes back as a float32 `tv_tensors.Image` `(3, H, W)` in [0, 1] rather than an 8-bit PIL image,
        so that its full (e.g. 16-bit) precision reaches the normalisation; the checks run on its 8-bit version.
        """
        dicom_image = read_dicom(view) if is_dicom_path(view) else None
        image = dicom_image.to_pil() if dicom_image is not None else load_image(view)
        reasons = degenerate_image_reasons(image)
        if reasons:
            message = (
                f"The image at {position} ({describe_image(view)}) cannot be a chest X-ray: {'; '.join(reasons)}. "
                "A report written from it would be meaningless; check the input"
            )
            if on_degenerate_image == "error":
                raise ValueError(f"{message}. (Refused because `on_degenerate_image='error'`.)")
            warnings.warn(f"{message}, or pass `on_degenerate_image='error'` to refuse such images.", UserWarning)
        if dicom_image is not None:
            return dicom_to_float_image(dicom_image)
        return image


def check_degenerate_image_action(on_degenerate_image: Any) -> None:
    """Raise `ValueError` unless `on_degenerate_image` is one of `DEGENERATE_IMAGE_ACTIONS`."""
    if on_degenerate_image not in DEGENERATE_IMAGE_ACTIONS:
        raise ValueError(
            f"`on_degenerate_image` must be one of {list(DEGENERATE_IMAGE_ACTIONS)}, got {on_degenerate_image!r}."
        )


def check_return_tensors(return_tensors: Any) -> str:
    """`"pt"` or `"np"` from a `return_tensors` argument (`None` and `TensorType` values accepted)."""
    tensor_type = "pt" if return_tensors is None else str(getattr(return_tensors, "value", return_tensors))
    if tensor_type not in ("pt", "np"):
        raise ValueError(f"`return_tensors` must be 'pt' or 'np', got {return_tensors!r}.")
    return tensor_type


CdanImageProcessor.register_for_auto_class("AutoImageProcessor")


__all__ = [
    "DEFAULT_MAX_LESION_BOXES",
    "CdanImageProcessor",
    "CdanImageProcessorKwargs",
    "load_image",
]
