"""CDAN processor: report cleaning, the word-level report tokenizer, chest X-ray image loading and preprocessing.

The text side follows R2Gen (Chen et al., "Generating Radiology Reports via Memory-driven Transformer", EMNLP 2020;
github.com/zhjohnchan/R2Gen, `modules/tokenizers.py`): reports are cleaned with the IU X-Ray or MIMIC-CXR rules, the
vocabulary keeps the words seen at least `threshold` times in the training reports, and every report ends with an
end-of-sequence token. The image side follows R2Gen's `modules/dataloaders.py` transforms: a deterministic
bilinear resize to `image_size` x `image_size` with ImageNet normalisation for evaluation, and resize / random crop
augmentation for training. Both are packaged the Transformers 5.x way (`BaseImageProcessor`, `ProcessorMixin`,
`PreTrainedTokenizerFast` built with the `tokenizers` library) so that a saved folder loads with
`AutoProcessor.from_pretrained(folder, trust_remote_code=True)`.
"""

import os
import re
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from torchvision import tv_tensors
from torchvision.transforms import v2
from transformers import PreTrainedTokenizerFast
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from transformers.processing_utils import ImagesKwargs, ProcessorMixin
from transformers.utils import logging


logger = logging.get_logger(__name__)

try:
    from .dicom_cdan import DicomImage, read_dicom
except ImportError:
    from dicom_cdan import DicomImage, read_dicom


# --------------------------------------------------------------------------------------------------------------------
# Report cleaning (R2Gen rules)
# --------------------------------------------------------------------------------------------------------------------

# R2Gen's sentence filter, kept verbatim as a character class. Inside it `:-\[` is a RANGE from ':' (0x3A) to '['
# (0x5B), so it also removes `;<=>?@` and the capitals A-Z (already lower-cased by then); '-' and digits survive.
SENTENCE_PUNCTUATION_PATTERN = re.compile(r"[.,?;*!%^&_+():-\[\]{}]")
SENTENCE_QUOTE_CHARACTERS = ('"', "/", "\\", "'")

# Enumerations such as "1. Cardiomegaly. 2. Effusion." are flattened into plain sentences, in R2Gen's order.
NUMBERING_REPLACEMENTS = (
    ("1. ", ""),
    (". 2. ", ". "),
    (". 3. ", ". "),
    (". 4. ", ". "),
    (". 5. ", ". "),
    (" 2. ", ". "),
    (" 3. ", ". "),
    (" 4. ", ". "),
    (" 5. ", ". "),
)


def replace_repeatedly(text: str, old: str, new: str, times: int) -> str:
    """Apply `text.replace(old, new)` `times` times in sequence (R2Gen chains the same replacement)."""
    for _ in range(times):
        text = text.replace(old, new)
    return text


def clean_sentence(sentence: str) -> str:
    """Strip quotes and slashes, lower-case, then delete R2Gen's punctuation class from one sentence."""
    for character in SENTENCE_QUOTE_CHARACTERS:
        sentence = sentence.replace(character, "")
    return SENTENCE_PUNCTUATION_PATTERN.sub("", sentence.strip().lower())


def join_cleaned_sentences(report: str) -> str:
    """Drop enumerations, split the report into sentences, clean each and join them as `s1 . s2 . ... .`.

    Empty sentences are kept, as in R2Gen (whose filter compares a string to `[]` and therefore never drops one).
    """
    for old, new in NUMBERING_REPLACEMENTS:
        report = report.replace(old, new)
    sentences = report.strip().lower().split(". ")
    return " . ".join(clean_sentence(sentence) for sentence in sentences) + " ."


def clean_report_iu_xray(report: str) -> str:
    """
    Clean an IU X-Ray report exactly like R2Gen's `Tokenizer.clean_report_iu_xray`.

    Args:
        report (`str`): the raw findings text.

    Returns:
        `str`: the lower-cased report, words and " . " sentence separators split by single spaces, ending in " .".
    """
    return join_cleaned_sentences(replace_repeatedly(report, "..", ".", 3))


def clean_report_mimic_cxr(report: str) -> str:
    """
    Clean a MIMIC-CXR report exactly like R2Gen's `Tokenizer.clean_report_mimic_cxr`.

    Args:
        report (`str`): the raw findings text (may contain new lines and `___` de-identification runs).

    Returns:
        `str`: the lower-cased report, words and " . " sentence separators split by single spaces, ending in " .".
    """
    report = report.replace("\n", " ")
    report = replace_repeatedly(report, "__", "_", 7)
    report = replace_repeatedly(report, "  ", " ", 6)
    report = replace_repeatedly(report, "..", ".", 8)
    return join_cleaned_sentences(report)


REPORT_CLEANERS: dict[str, Callable[[str], str]] = {
    "iu_xray": clean_report_iu_xray,
    "mimic_cxr": clean_report_mimic_cxr,
}
"""Report cleaners by name; the name is what `CdanProcessor.report_cleaner` stores."""


def get_report_cleaner(name: str | None) -> Callable[[str], str] | None:
    """The cleaner called `name` in `REPORT_CLEANERS`, or `None` for `None`; raises `ValueError` for unknown names."""
    if name is None:
        return None
    if name not in REPORT_CLEANERS:
        raise ValueError(f"Unknown report cleaner {name!r}; choose one of {sorted(REPORT_CLEANERS)} or None.")
    return REPORT_CLEANERS[name]


# --------------------------------------------------------------------------------------------------------------------
# Word-level report tokenizer
# --------------------------------------------------------------------------------------------------------------------

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<bos>"
EOS_TOKEN = "<eos>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)
"""Special tokens in id order: `<pad>`=0, `<bos>`=1, `<eos>`=2, `<unk>`=3; vocabulary words start at id 4."""

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

ANONYMISATION_MARK = "xxxx"
"""IU X-Ray's de-identification mark: the cleaned reports keep it (as R2Gen does) as the word `xxxx` and inside
words such as `x-xxxx` and `xxxx-a-xxxx`; [`CdanProcessor.anonymisation_token_ids`] finds them in the vocabulary."""

HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")
"""`from_pretrained` arguments that locate files, passed on to the image processor and the tokenizer."""


def build_report_vocabulary(reports: Iterable[str], threshold: int = 3, cleaner: str | None = "iu_xray") -> list[str]:
    """
    The sorted words seen at least `threshold` times in the cleaned reports (R2Gen's `create_vocabulary`).

    Args:
        reports (`Iterable[str]`): raw training reports.
        threshold (`int`, *optional*, defaults to 3): minimum number of occurrences for a word to be kept.
        cleaner (`str` or `None`, *optional*, defaults to `"iu_xray"`): name of the cleaner in `REPORT_CLEANERS`
            applied before counting, or `None` to count the raw whitespace-split words.

    Returns:
        `list[str]`: the kept words in sorted order, special tokens excluded.
    """
    if threshold < 1:
        raise ValueError(f"`threshold` must be at least 1, got {threshold}.")
    clean = get_report_cleaner(cleaner)
    word_counts: Counter[str] = Counter()
    for report in reports:
        if not isinstance(report, str):
            raise TypeError(f"Reports must be strings, got {type(report).__name__}.")
        word_counts.update((clean(report) if clean is not None else report).split())
    return sorted(word for word, count in word_counts.items() if count >= threshold and word not in SPECIAL_TOKENS)


def build_report_tokenizer(
    reports: Iterable[str], threshold: int = 3, cleaner: str | None = "iu_xray", model_max_length: int = 60
) -> PreTrainedTokenizerFast:
    """
    Build CDAN's word-level report tokenizer from training reports, R2Gen style.

    The vocabulary is `<pad>`=0, `<bos>`=1, `<eos>`=2, `<unk>`=3, then the sorted words of
    [`build_report_vocabulary`] from id 4. Text is split on whitespace (so it must already be cleaned; the
    [`CdanProcessor`] cleans it), unknown words map to `<unk>`, and encoding appends `<eos>` (no `<bos>`: the model
    shifts the labels right with `<bos>` as decoder start token). Decoding joins words with single spaces.

    Args:
        reports (`Iterable[str]`): raw training reports.
        threshold (`int`, *optional*, defaults to 3): minimum number of occurrences for a word to be kept.
        cleaner (`str` or `None`, *optional*, defaults to `"iu_xray"`): name of the cleaner in `REPORT_CLEANERS`
            applied before counting, or `None`.
        model_max_length (`int`, *optional*, defaults to 60): the tokenizer's `model_max_length` (report length in
            tokens, `<eos>` included).

    Returns:
        [`PreTrainedTokenizerFast`]: the tokenizer, with `pad_token`, `bos_token`, `eos_token` and `unk_token` set.
    """
    words = build_report_vocabulary(reports, threshold=threshold, cleaner=cleaner)
    token_to_id = {token: index for index, token in enumerate((*SPECIAL_TOKENS, *words))}
    word_level_tokenizer = Tokenizer(models.WordLevel(vocab=token_to_id, unk_token=UNK_TOKEN))
    word_level_tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    eos_token_id = token_to_id[EOS_TOKEN]
    word_level_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS_TOKEN}",
        pair=f"$A {EOS_TOKEN} $B:1 {EOS_TOKEN}:1",
        special_tokens=[(EOS_TOKEN, eos_token_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=word_level_tokenizer,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=model_max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


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
        **kwargs,
    ) -> BatchFeature:
        """
        Load, resize and normalise a batch of studies.

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

        Returns:
            [`BatchFeature`]: `pixel_values`, float32 of shape `(batch, num_views, 3, image_size, image_size)`.
        """
        if kwargs:
            raise TypeError(f"Unexpected keyword argument(s) for CdanImageProcessor.preprocess: {sorted(kwargs)}.")
        tensor_type = check_return_tensors(return_tensors)
        action = self.on_degenerate_image if on_degenerate_image is None else on_degenerate_image
        check_degenerate_image_action(action)
        studies = self.group_into_studies(images)
        transform = self.train_transform() if do_augment else self.eval_transform()
        study_tensors = []
        for study_index, views in enumerate(studies):
            loaded: dict[int, PIL.Image.Image] = {}  # a single view repeated to fill the study is read once
            for view_index, view in enumerate(views):
                if id(view) not in loaded:
                    loaded[id(view)] = self.load_view(view, f"study {study_index}, view {view_index}", action)
            study_tensors.append(torch.stack([transform(loaded[id(view)]) for view in views]))
        pixel_values = torch.stack(study_tensors)
        if tensor_type == "np":
            pixel_values = pixel_values.numpy()
        return BatchFeature(data={"pixel_values": pixel_values}, tensor_type=tensor_type)

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


# --------------------------------------------------------------------------------------------------------------------
# Processor
# --------------------------------------------------------------------------------------------------------------------

LABEL_PAD_ID = -100
"""Label value ignored by the loss (`torch.nn.CrossEntropyLoss`'s default `ignore_index`)."""


class CdanProcessor(ProcessorMixin):
    r"""
    CDAN's processor: a [`CdanImageProcessor`] for the X-ray views and a word-level [`PreTrainedTokenizerFast`] (see
    [`build_report_tokenizer`]) for the reports.

    Calling it with `images` returns `pixel_values`; with `text` (raw reports) it cleans them with `report_cleaner`,
    tokenises them (appending `<eos>`, truncated to `max_length` tokens with `<eos>` kept last) and returns them as
    `labels` padded with -100. The vocabulary lives in `tokenizer.json`, so a saved processor needs no annotation file.

    Args:
        image_processor ([`CdanImageProcessor`]):
            The image processor.
        tokenizer ([`PreTrainedTokenizerFast`]):
            The report tokenizer.
        report_cleaner (`str` or `None`, *optional*, defaults to `"iu_xray"`):
            Name of the cleaner in `REPORT_CLEANERS` applied to reports before tokenisation, or `None` for none.
        max_length (`int`, *optional*, defaults to 60):
            Maximum report length in tokens, `<eos>` included (R2Gen: 60 for IU X-Ray, 100 for MIMIC-CXR).
    """

    def __init__(
        self,
        image_processor: CdanImageProcessor,
        tokenizer: PreTrainedTokenizerFast,
        report_cleaner: str | None = "iu_xray",
        max_length: int = 60,
    ):
        get_report_cleaner(report_cleaner)
        if max_length < 1:
            raise ValueError(f"`max_length` must be at least 1 (room for `<eos>`), got {max_length}.")
        self.report_cleaner = report_cleaner
        self.max_length = int(max_length)
        super().__init__(image_processor, tokenizer)

    @classmethod
    def from_reports(
        cls,
        reports: Iterable[str],
        threshold: int = 3,
        report_cleaner: str | None = "iu_xray",
        image_processor: CdanImageProcessor | None = None,
        max_length: int = 60,
        **image_processor_kwargs,
    ) -> "CdanProcessor":
        """
        Build a processor whose tokenizer is made from training reports with [`build_report_tokenizer`].

        Args:
            reports (`Iterable[str]`): raw training reports.
            threshold (`int`, *optional*, defaults to 3): minimum number of occurrences for a word to be kept.
            report_cleaner (`str` or `None`, *optional*, defaults to `"iu_xray"`): cleaner used for the vocabulary
                and for every report the processor tokenises.
            image_processor ([`CdanImageProcessor`], *optional*): the image processor; built from
                `image_processor_kwargs` when not given.
            max_length (`int`, *optional*, defaults to 60): maximum report length in tokens, `<eos>` included.
            image_processor_kwargs: arguments of [`CdanImageProcessor`] (`image_size`, `num_views`, ...).

        Returns:
            [`CdanProcessor`]
        """
        if image_processor is not None and image_processor_kwargs:
            raise ValueError("Pass either `image_processor` or image processor keyword arguments, not both.")
        tokenizer = build_report_tokenizer(
            reports, threshold=threshold, cleaner=report_cleaner, model_max_length=max_length
        )
        if image_processor is None:
            image_processor = CdanImageProcessor(**image_processor_kwargs)
        return cls(image_processor, tokenizer, report_cleaner=report_cleaner, max_length=max_length)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> "CdanProcessor":
        """
        Load a processor saved with `save_pretrained` (a local folder or a Hub repository).

        Unlike the generic `ProcessorMixin.from_pretrained`, the sub-components are loaded with their own classes
        ([`CdanImageProcessor`] and [`PreTrainedTokenizerFast`]) rather than through `AutoImageProcessor` /
        `AutoTokenizer`, so loading with this class needs no `trust_remote_code`.

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`): the folder or Hub repository id.
            kwargs: Hub arguments (`revision`, `subfolder`, `cache_dir`, `token`, `local_files_only`, ...) and
                overrides of the processor's own arguments (`report_cleaner`, `max_length`).

        Raises:
            `ValueError`: a local folder lacks the tokenizer files (`tokenizer.json`, `tokenizer_config.json`).
        """
        folder = Path(pretrained_model_name_or_path) / kwargs.get("subfolder", "")
        if folder.is_dir():
            missing = [name for name in TOKENIZER_FILES if not (folder / name).is_file()]
            if missing:
                raise ValueError(
                    f"The report tokenizer is missing from {folder}: {', '.join(missing)} not found. Save the "
                    "processor with `CdanProcessor.save_pretrained` (it writes the tokenizer and its vocabulary), or "
                    "rebuild it from the training reports with `CdanProcessor.from_reports`."
                )
        hub_kwargs = {name: kwargs[name] for name in HUB_KWARGS if name in kwargs}
        processor_dict, processor_kwargs = cls.get_processor_dict(pretrained_model_name_or_path, **kwargs)
        processor_kwargs.pop("trust_remote_code", None)
        image_processor = CdanImageProcessor.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
        return cls.from_args_and_dict([image_processor, tokenizer], processor_dict, **processor_kwargs)

    def clean_report(self, report: str) -> str:
        """One report cleaned with `report_cleaner` (unchanged when it is `None`)."""
        if not isinstance(report, str):
            raise TypeError(f"A report must be a string, got {type(report).__name__}.")
        clean = get_report_cleaner(self.report_cleaner)
        return clean(report) if clean is not None else report

    def tokenize_reports(self, text: str | Sequence[str], max_length: int | None = None) -> list[list[int]]:
        """Clean and tokenise reports; each ends with `<eos>` and has at most `max_length` tokens."""
        if not isinstance(text, (str, Iterable)):
            raise TypeError(f"`text` must be a report string or a list of report strings, got {type(text).__name__}.")
        reports = [text] if isinstance(text, str) else list(text)
        if len(reports) == 0:
            raise ValueError("No report given: `text` is an empty list.")
        max_length = self.max_length if max_length is None else max_length
        if max_length < 1:
            raise ValueError(f"`max_length` must be at least 1 (room for `<eos>`), got {max_length}.")
        cleaned = [self.clean_report(report) for report in reports]
        encoded = self.tokenizer(cleaned, add_special_tokens=True, truncation=True, max_length=max_length)
        return encoded["input_ids"]

    def __call__(
        self,
        images: Any = None,
        text: str | Sequence[str] | None = None,
        return_tensors: str | None = "pt",
        do_augment: bool = False,
        max_length: int | None = None,
        on_degenerate_image: str | None = None,
    ) -> BatchFeature:
        """
        Prepare studies and/or reports for the model.

        Args:
            images (image, or `list` of images / of lists of images, *optional*):
                The studies, as accepted by [`CdanImageProcessor.preprocess`].
            text (`str` or `list[str]`, *optional*):
                Raw reports, one per study; they are cleaned with `report_cleaner` before tokenisation.
            return_tensors (`str`, *optional*, defaults to `"pt"`):
                `"pt"` or `"np"`.
            do_augment (`bool`, *optional*, defaults to `False`):
                Apply the image processor's training augmentation.
            max_length (`int`, *optional*):
                Overrides the processor's `max_length` for this call.
            on_degenerate_image (`str`, *optional*):
                `"warn"` or `"error"`: overrides the image processor's `on_degenerate_image` for this call.

        Returns:
            [`BatchFeature`]: `pixel_values` `(batch, num_views, 3, H, W)` when images are given; `labels`
            `(batch, longest report)` int64, ending in `<eos>` and padded with -100, when text is given.
        """
        if images is None and text is None:
            raise ValueError("Give `images`, `text` or both to CdanProcessor.")
        tensor_type = check_return_tensors(return_tensors)
        data: dict[str, Any] = {}
        if images is not None:
            data.update(
                self.image_processor(
                    images, return_tensors=tensor_type, do_augment=do_augment, on_degenerate_image=on_degenerate_image
                )
            )
        if text is not None:
            label_ids = self.tokenize_reports(text, max_length=max_length)
            if "pixel_values" in data and len(data["pixel_values"]) != len(label_ids):
                raise ValueError(
                    f"Got {len(data['pixel_values'])} studies but {len(label_ids)} reports; give one report per study."
                )
            longest = max(len(ids) for ids in label_ids)
            labels = np.full((len(label_ids), longest), LABEL_PAD_ID, dtype=np.int64)
            for row, ids in enumerate(label_ids):
                labels[row, : len(ids)] = ids
            data["labels"] = torch.from_numpy(labels) if tensor_type == "pt" else labels
        return BatchFeature(data=data, tensor_type=tensor_type)

    @staticmethod
    def as_id_lists(sequences: Any) -> list[list[int]]:
        """Token ids (tensor, array or nested list; one row or several) as lists of ints, -100 padding removed."""
        if isinstance(sequences, (torch.Tensor, np.ndarray)):
            sequences = sequences.tolist()
        sequences = list(sequences)
        if sequences and not isinstance(sequences[0], (list, tuple, torch.Tensor, np.ndarray)):
            sequences = [sequences]
        rows = [row.tolist() if isinstance(row, (torch.Tensor, np.ndarray)) else row for row in sequences]
        return [[int(token_id) for token_id in row if int(token_id) != LABEL_PAD_ID] for row in rows]

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = True, **kwargs) -> list[str]:
        """
        Decode token ids (generated ids or labels; -100 is ignored) into report strings.

        Args:
            sequences (`torch.Tensor`, `np.ndarray` or `list[list[int]]`): one row of ids per report.
            skip_special_tokens (`bool`, *optional*, defaults to `True`): drop `<pad>`, `<bos>`, `<eos>`, `<unk>`.
            kwargs: passed to the tokenizer's `batch_decode`.

        Returns:
            `list[str]`: the reports, words separated by single spaces.
        """
        return self.tokenizer.batch_decode(
            self.as_id_lists(sequences), skip_special_tokens=skip_special_tokens, **kwargs
        )

    def decode(self, token_ids: Any, skip_special_tokens: bool = True, **kwargs) -> str:
        """
        Decode one report's token ids (-100 is ignored) into a string.

        Args:
            token_ids (`torch.Tensor`, `np.ndarray` or `list[int]`): the ids of one report.
            skip_special_tokens (`bool`, *optional*, defaults to `True`): drop `<pad>`, `<bos>`, `<eos>`, `<unk>`.
            kwargs: passed to the tokenizer's `decode`.

        Returns:
            `str`: the report.
        """
        rows = self.as_id_lists(token_ids)
        if len(rows) > 1:
            raise ValueError(f"`decode` takes the ids of one report; got {len(rows)} rows, use `batch_decode`.")
        return self.tokenizer.decode(rows[0] if rows else [], skip_special_tokens=skip_special_tokens, **kwargs)

    def anonymisation_token_ids(self) -> list[int]:
        """
        The vocabulary ids of the words that carry IU X-Ray's de-identification mark `xxxx` (`ANONYMISATION_MARK`):
        `xxxx` itself and the words containing it (R2Gen's IU X-Ray vocabulary has `xxxx`, `x-xxxx` and
        `xxxx-a-xxxx`). Passed as `suppress_tokens` to `generate`, they are never written (see the pipeline's
        `ban_anonymisation_token`).

        Returns:
            `list[int]`: the ids in increasing order; empty when the vocabulary has no such word (MIMIC-CXR's
            cleaner, for instance, removes its `___` mark entirely).
        """
        return sorted(
            token_id
            for token, token_id in self.tokenizer.get_vocab().items()
            if ANONYMISATION_MARK in token and token not in SPECIAL_TOKENS
        )

    def post_process_report_generation(self, generated_ids: Any) -> list[str]:
        """
        The reports written by `model.generate`, special tokens removed.

        Args:
            generated_ids (`torch.Tensor` of shape `(batch, length)`): the output of `generate`.

        Returns:
            `list[str]`: one report per row.
        """
        return self.batch_decode(generated_ids, skip_special_tokens=True)

    @property
    def model_input_names(self) -> list[str]:
        return ["pixel_values", "labels"]


CdanImageProcessor.register_for_auto_class("AutoImageProcessor")
CdanProcessor.register_for_auto_class("AutoProcessor")


__all__ = [
    "ANONYMISATION_MARK",
    "REPORT_CLEANERS",
    "CdanImageProcessor",
    "CdanProcessor",
    "build_report_tokenizer",
    "build_report_vocabulary",
    "clean_report_iu_xray",
    "clean_report_mimic_cxr",
    "load_image",
]
