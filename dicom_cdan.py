"""
DICOM input for CDAN: read a chest X-ray DICOM file into display-ready grey intensities with pydicom (3.x).

[`read_dicom`] decodes the pixel data and applies, in the order of the DICOM grayscale pipeline (PS3.4 N.2.1.1):

    1. the Modality LUT Sequence or Rescale Slope / Intercept (`pydicom.pixels.apply_modality_lut`);
    2. the VOI LUT Sequence, else the first Window Center / Window Width pair with its VOI LUT Function
       (`pydicom.pixels.apply_voi_lut`, which prefers the LUT when both are present);
    3. for MONOCHROME1, an inversion within the nominal output range of the previous step, so that higher values are
       brighter as in MONOCHROME2.

The result is kept as float32 at full precision (16-bit data is never quantised to 8 bits here); [`DicomImage`]'s
`to_float01` / `to_uint8` / `to_pil` rescale it (its own minimum..maximum, after windowing) for the image processor.

Decisions for inputs outside the common case:
    - multi-frame files: the FIRST frame is used (only that frame is decoded) and a `UserWarning` says so;
    - RGB, YBR_* (converted to RGB by pydicom) and PALETTE COLOR (expanded with its palette) images are converted to
      grey with the ITU-R BT.601 luma weights (as PIL's "L" mode); no VOI transform applies to colour data;
    - a missing or empty View Position (0018,5101) gives `view_position=None`; no other tag is guessed from;
    - Presentation LUT Shape is not applied (in DX files INVERSE accompanies MONOCHROME1 and means the same
      inversion); per-frame functional groups of enhanced multi-frame files are not read (the top-level Modality and
      VOI LUT elements are).

Errors (each names the file): a file that is not DICOM, a file without Pixel Data (7FE0,0010), a transfer syntax
pydicom has no decoder for and pixel data that fail to decode raise `ValueError`; a compressed transfer syntax whose
decoder packages are not installed raises [`DicomDecoderMissingError`] (an `ImportError` that is also a
`ValueError`), naming the transfer syntax and the PyPI packages that decode it, read from pydicom's own decoder
plugin tables (`DECODER_DEPENDENCIES`). pydicom itself is imported lazily, so this module imports without it.
"""

import importlib
import os
import pkgutil
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image


DicomDataset = Any
"""A `pydicom.dataset.Dataset` (pydicom is imported lazily, inside `try`, so that the remote-code processor loads
without it: `transformers` checks the imports of remote-code files outside `try` blocks)."""

PYDICOM_REQUIREMENT = "pydicom>=3.0"
"""The pydicom version this module is written for (the `pydicom.pixels` API of pydicom 3)."""

PYPI_NAMES = {"gdcm": "python-gdcm"}
"""PyPI names for the names in pydicom's plugin tables that are not PyPI names (pydicom 3.0 lists GDCM by its import
name; its other entries, "pylibjpeg-libjpeg", "pyjpegls", "pillow", ..., are already PyPI names)."""

ALREADY_INSTALLED_REQUIREMENTS = ("numpy",)
"""Requirements of pydicom's decoder plugins that are dependencies of this project anyway (left out of messages)."""

MONOCHROME_INTERPRETATIONS = ("MONOCHROME1", "MONOCHROME2")
COLOUR_INTERPRETATIONS = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "PALETTE COLOR")
"""Photometric interpretations converted to grey (YBR_* arrive as RGB from pydicom's decoders)."""

LUMA_WEIGHTS = (0.299, 0.587, 0.114)
"""ITU-R BT.601 luma weights for R, G, B (the weights of PIL's RGB -> "L" conversion)."""

VOI_TRANSFORMS = ("lut", "window", "none")
"""What [`read_dicom`] applied as the VOI transform: the VOI LUT Sequence, Window Center/Width, or nothing."""


class DicomDecoderMissingError(ImportError, ValueError):
    """
    The DICOM file's pixel data are compressed with a transfer syntax whose decoder packages are not installed.

    An `ImportError` (a package is missing) that is also a `ValueError`, so code that refuses unreadable images with
    `except ValueError` refuses this one too.
    """


@dataclass(frozen=True)
class DicomImage:
    """
    One DICOM image read by [`read_dicom`].

    Args:
        pixels (`np.ndarray` of shape `(rows, columns)`, float32):
            Grey intensities after the Modality LUT / rescale and the VOI LUT or window, MONOCHROME1 inverted so that
            higher is brighter; not quantised (16-bit data keep their precision).
        value_range (`tuple[float, float]`):
            The nominal range of `pixels`: the output range of the last transform applied (VOI LUT entries, the
            window's output range, or the rescaled stored-value range); colour images: `(0, 2**bits_stored - 1)`.
        view_position (`str` or `None`):
            The View Position (0018,5101), stripped and upper-cased ("PA", "AP", "LATERAL", "LL", ...), or `None`
            when the tag is absent or empty. `data_cdan.view_from_code` maps it to frontal / lateral.
        photometric_interpretation (`str`):
            The file's Photometric Interpretation ("MONOCHROME1", "MONOCHROME2", "RGB", ...), before conversion.
        bits_stored (`int`):
            Bits Stored (0028,0101) of the pixel data.
        voi_transform (`str`):
            `"lut"`, `"window"` or `"none"`: the VOI transform that was applied (see `VOI_TRANSFORMS`).
        transfer_syntax (`str`):
            The transfer syntax UID of the file.
        number_of_frames (`int`):
            Frames in the file (only the first is in `pixels`).
        path (`Path`):
            The file read.
    """

    pixels: np.ndarray
    value_range: tuple[float, float]
    view_position: str | None
    photometric_interpretation: str
    bits_stored: int
    voi_transform: str
    transfer_syntax: str
    number_of_frames: int
    path: Path

    def to_float01(self) -> np.ndarray:
        """
        The pixels rescaled by their own minimum..maximum to [0, 1] (float32); a constant image gives zeros.

        Returns:
            `np.ndarray` of shape `(rows, columns)`, float32.
        """
        pixels = self.pixels.astype(np.float64)
        lowest, highest = float(pixels.min()), float(pixels.max())
        if highest == lowest:
            return np.zeros(pixels.shape, dtype=np.float32)
        return ((pixels - lowest) / (highest - lowest)).astype(np.float32)

    def to_uint8(self) -> np.ndarray:
        """
        The pixels rescaled by their own minimum..maximum to 0..255 (`uint8`, rounded): the 8-bit quantisation that
        [`to_pil`] and the image processor's PIL path use.

        Returns:
            `np.ndarray` of shape `(rows, columns)`, uint8.
        """
        return np.round(self.to_float01().astype(np.float64) * 255.0).astype(np.uint8)

    def to_pil(self) -> PIL.Image.Image:
        """
        The image as an 8-bit RGB PIL image (grey replicated to three channels), as `image_processing_cdan.load_image`
        returns images.

        Returns:
            `PIL.Image.Image` in mode "RGB".
        """
        return PIL.Image.fromarray(self.to_uint8(), mode="L").convert("RGB")


# --------------------------------------------------------------------------------------------------------------------
# Decoder availability
# --------------------------------------------------------------------------------------------------------------------


def import_pydicom() -> Any:
    """`pydicom` (3.x), or an `ImportError` saying how to install it."""
    try:
        import pydicom
        import pydicom.dataset
        import pydicom.errors
        import pydicom.pixels
        import pydicom.pixels.decoders
        import pydicom.uid
    except ImportError as error:
        raise ImportError(f'Reading DICOM files needs pydicom: `pip install "{PYDICOM_REQUIREMENT}"`.') from error
    major = int(re.match(r"\d+", pydicom.__version__).group())
    if major < 3:
        raise ImportError(
            f"Reading DICOM files needs pydicom 3 or newer (found {pydicom.__version__}): "
            f'`pip install -U "{PYDICOM_REQUIREMENT}"`.'
        )
    return pydicom


def pypi_requirement(requirement: str) -> str:
    """A requirement from pydicom's plugin tables ("gdcm>=3.0.10") with its PyPI name ("python-gdcm>=3.0.10")."""
    name = re.match(r"[A-Za-z0-9_.\-]+", requirement).group()
    return PYPI_NAMES.get(name.lower(), name) + requirement[len(name) :]


def pip_install_line(requirements: tuple[str, ...]) -> str:
    """`pip install "a>=1" "b>=2"` for a tuple of requirements."""
    return "pip install " + " ".join(f'"{requirement}"' for requirement in requirements)


def decoder_requirements(transfer_syntax: str) -> dict[str, tuple[str, ...]]:
    """
    The packages that decode `transfer_syntax`, per pydicom decoder plugin, from the `DECODER_DEPENDENCIES` tables of
    the plugin modules in `pydicom.pixels.decoders` (whether or not they are installed).

    Args:
        transfer_syntax (`str`): a transfer syntax UID.

    Returns:
        `dict[str, tuple[str, ...]]`: plugin module name -> PyPI requirements, all needed together (for example
        `{"pylibjpeg": ("pylibjpeg>=2.0", "pylibjpeg-libjpeg>=2.1"), "gdcm": ("python-gdcm>=3.0.10",)}`); plugins
        that need nothing beyond pydicom and numpy are left out.
    """
    decoders_package = import_pydicom().pixels.decoders
    requirements: dict[str, tuple[str, ...]] = {}
    for module_info in pkgutil.iter_modules(decoders_package.__path__):
        if module_info.name == "base":
            continue
        try:
            module = importlib.import_module(f"{decoders_package.__name__}.{module_info.name}")
        except ImportError:  # pragma: no cover - pydicom's plugin modules guard their own imports
            continue
        table = getattr(module, "DECODER_DEPENDENCIES", None)
        if not isinstance(table, dict) or transfer_syntax not in table:
            continue
        needed = tuple(
            pypi_requirement(requirement)
            for requirement in table[transfer_syntax]
            if requirement not in ALREADY_INSTALLED_REQUIREMENTS
        )
        if needed:
            requirements[module_info.name] = needed
    return requirements


def describe_transfer_syntax(transfer_syntax: str) -> str:
    """A transfer syntax UID with the name pydicom knows for it: "RLE Lossless (1.2.840.10008.1.2.5)"."""
    pydicom = import_pydicom()
    uid = pydicom.uid.UID(transfer_syntax)
    name = uid.name
    return f"{name} ({uid})" if name and name != str(uid) else str(uid)


def check_decoder_available(transfer_syntax: str, path: Path) -> None:
    """
    Raise unless pydicom can decode pixel data in `transfer_syntax` with the packages installed.

    Args:
        transfer_syntax (`str`): the file's transfer syntax UID.
        path (`Path`): the file, named in the messages.

    Raises:
        `ValueError`: pydicom has no decoder for this transfer syntax at all (MPEG video, private syntaxes, ...).
        [`DicomDecoderMissingError`]: a decoder exists but none of its plugins' packages is installed; the message
            names the transfer syntax and the `pip install` lines that would decode it.
    """
    pydicom = import_pydicom()
    description = describe_transfer_syntax(transfer_syntax)
    try:
        decoder = pydicom.pixels.get_decoder(transfer_syntax)
    except NotImplementedError as error:
        raise ValueError(
            f"Cannot read the DICOM file {path}: its transfer syntax {description} is not supported (pydicom has no "
            "decoder for it). Convert the file to an uncompressed or JPEG / JPEG 2000 / RLE transfer syntax first, "
            "for example with `gdcmconv --raw` (GDCM) or `dcmdjpeg` (DCMTK)."
        ) from error
    if decoder.is_available:
        return
    options = [
        f"`{pip_install_line(requirements)}` (pydicom's {plugin} plugin)"
        for plugin, requirements in decoder_requirements(transfer_syntax).items()
    ]
    if not options:  # pragma: no cover - every compressed syntax pydicom decodes has a plugin table entry
        options = list(decoder.missing_dependencies) or ["a pydicom decoder plugin for it"]
    raise DicomDecoderMissingError(
        f"Cannot decode the pixel data of the DICOM file {path}: they are compressed as {description} and no "
        f"installed package decodes that transfer syntax. Install one of: {'; or '.join(options)}."
    )


# --------------------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------------------


def read_view_position(dataset: DicomDataset) -> str | None:
    """The View Position (0018,5101), stripped and upper-cased, or `None` when absent or empty."""
    value = dataset.get("ViewPosition", None)
    text = str(value).strip().upper() if value is not None else ""
    return text or None


def read_dicom_view_position(path: str | os.PathLike) -> str | None:
    """The View Position of a DICOM file, read from its header alone (not its pixel data)."""
    pydicom = import_pydicom()
    return read_view_position(pydicom.dcmread(os.fspath(path), stop_before_pixels=True))


def lut_output_range(lut_descriptor: Any) -> tuple[float, float]:
    """`(0, 2**bits - 1)` for a LUT Descriptor (entries, first mapped value, bits per entry)."""
    return 0.0, float(2 ** int(lut_descriptor[2]) - 1)


def modality_output_range(dataset: DicomDataset) -> tuple[float, float]:
    """The nominal range after the Modality LUT / rescale: the stored-value range mapped like the pixels."""
    if dataset.get("ModalityLUTSequence"):
        return lut_output_range(dataset.ModalityLUTSequence[0].LUTDescriptor)
    bits_stored = int(dataset.BitsStored)
    if int(dataset.get("PixelRepresentation", 0)) == 0:
        lowest, highest = 0.0, float(2**bits_stored - 1)
    else:
        lowest, highest = float(-(2 ** (bits_stored - 1))), float(2 ** (bits_stored - 1) - 1)
    slope, intercept = dataset.get("RescaleSlope", None), dataset.get("RescaleIntercept", None)
    if slope is not None and intercept is not None:
        lowest, highest = sorted((lowest * float(slope) + float(intercept), highest * float(slope) + float(intercept)))
    return lowest, highest


def has_voi_lut(dataset: DicomDataset) -> bool:
    """Whether the dataset has a usable VOI LUT Sequence (descriptor and data), as `apply_voi_lut` checks."""
    sequence = dataset.get("VOILUTSequence", None)
    return bool(sequence) and None not in (sequence[0].get("LUTDescriptor", None), sequence[0].get("LUTData", None))


def has_window(dataset: DicomDataset) -> bool:
    """Whether the dataset has both Window Center and Window Width."""
    return None not in (dataset.get("WindowCenter", None), dataset.get("WindowWidth", None))


def decode_first_frame(dataset: DicomDataset, path: Path, transfer_syntax: str) -> tuple[np.ndarray, int]:
    """The decoded first frame (RGB for YBR data) and the number of frames; decoding errors become `ValueError`."""
    pydicom = import_pydicom()
    number_of_frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if number_of_frames > 1:
        warnings.warn(
            f"The DICOM file {path} has {number_of_frames} frames; only the first one is read.",
            UserWarning,
            stacklevel=3,
        )
    try:
        frame = pydicom.pixels.pixel_array(dataset, index=0 if number_of_frames > 1 else None)
    except DicomDecoderMissingError:  # pragma: no cover - raised by our own check before decoding
        raise
    except Exception as error:  # pydicom raises ValueError, RuntimeError, KeyError ... for corrupt or odd data
        raise ValueError(
            f"Cannot decode the pixel data of the DICOM file {path} (transfer syntax "
            f"{describe_transfer_syntax(transfer_syntax)}): {type(error).__name__}: {error}"
        ) from error
    return frame, number_of_frames


def colour_to_grey(frame: np.ndarray, dataset: DicomDataset, photometric_interpretation: str) -> np.ndarray:
    """A colour frame (RGB, YBR already converted to RGB by pydicom, or PALETTE COLOR) as BT.601 luma (float64)."""
    pydicom = import_pydicom()
    if photometric_interpretation == "PALETTE COLOR":
        frame = pydicom.pixels.apply_color_lut(frame, dataset)
    if frame.ndim != 3 or frame.shape[-1] != 3:
        raise ValueError(f"Expected an RGB frame of shape (rows, columns, 3), got shape {frame.shape}.")
    return frame.astype(np.float64) @ np.asarray(LUMA_WEIGHTS)


def apply_grayscale_transforms(
    frame: np.ndarray, dataset: DicomDataset
) -> tuple[np.ndarray, tuple[float, float], str]:
    """
    The Modality LUT / rescale, then the VOI LUT Sequence or else the first window, on one grey frame.

    Returns:
        `tuple`: the transformed pixels, their nominal range (see [`DicomImage`]) and the VOI transform applied
        (`"lut"`, `"window"` or `"none"`).
    """
    pydicom = import_pydicom()
    pixels = pydicom.pixels.apply_modality_lut(frame, dataset)
    value_range = modality_output_range(dataset)
    if has_voi_lut(dataset):
        if np.issubdtype(pixels.dtype, np.floating) and np.array_equal(pixels, np.round(pixels)):
            pixels = pixels.astype(np.int64)  # VOI LUTs index integers; rescaled integer values are exact
        pixels = pydicom.pixels.apply_voi_lut(pixels, dataset, prefer_lut=True)
        return pixels, lut_output_range(dataset.VOILUTSequence[0].LUTDescriptor), "lut"
    if has_window(dataset):
        # Windowing maps onto the modality output range (PS3.3 C.11.2.1.2), so `value_range` stays.
        return pydicom.pixels.apply_windowing(pixels, dataset), value_range, "window"
    return pixels, value_range, "none"


def read_dicom(path: str | os.PathLike, force: bool = False) -> DicomImage:
    """
    Read a chest X-ray DICOM file into grey intensities at full precision (see the module docstring for the steps).

    Args:
        path (`str` or `os.PathLike`):
            The DICOM file (DICOM Part 10: "DICM" after a 128-byte preamble).
        force (`bool`, *optional*, defaults to `False`):
            Passed to `pydicom.dcmread`: also try files without the Part 10 header (old ACR-NEMA style). With the
            default, such files are refused as not DICOM.

    Returns:
        [`DicomImage`]: the pixels (float32, 2-D, MONOCHROME1 inverted) and the file's view position, photometric
        interpretation, bits stored and transfer syntax.

    Raises:
        `FileNotFoundError`: nothing at `path`.
        `ImportError`: pydicom (3.x) is not installed.
        [`DicomDecoderMissingError`] (an `ImportError` and a `ValueError`): the pixel data are compressed and no
            installed package decodes them; the message names the transfer syntax and the packages to install.
        `ValueError`: the file is not DICOM, has no Pixel Data (7FE0,0010), uses a transfer syntax pydicom cannot
            decode, has a photometric interpretation other than MONOCHROME1/2, RGB, YBR_* or PALETTE COLOR, or its
            pixel data fail to decode. Every message names the file.
    """
    pydicom = import_pydicom()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DICOM file not found: {path}")
    try:
        dataset = pydicom.dcmread(path, force=force)
    except pydicom.errors.InvalidDicomError as error:
        raise ValueError(
            f"The file {path} is not a DICOM file (no 'DICM' marker after the 128-byte preamble): {error}"
        ) from error
    except Exception as error:  # truncated or malformed data elements
        raise ValueError(f"Cannot parse the DICOM file {path}: {type(error).__name__}: {error}") from error

    if "PixelData" not in dataset:
        modality = dataset.get("Modality", "unknown")
        sop_class = getattr(dataset.get("SOPClassUID", None), "name", None) or "unknown"
        raise ValueError(
            f"The DICOM file {path} has no Pixel Data (7FE0,0010) element, so it holds no image (modality "
            f"{modality}, SOP class {sop_class}); pass the DICOM file of the radiograph itself."
        )
    file_meta = getattr(dataset, "file_meta", None)
    transfer_syntax = str(file_meta.get("TransferSyntaxUID", "")) if file_meta is not None else ""
    if not transfer_syntax:  # a header-less file read with `force=True`: pydicom guessed the encoding
        implicit_vr, little_endian = dataset.original_encoding
        if implicit_vr:
            transfer_syntax = str(pydicom.uid.ImplicitVRLittleEndian)
        elif little_endian is False:
            transfer_syntax = str(pydicom.uid.ExplicitVRBigEndian)
        else:
            transfer_syntax = str(pydicom.uid.ExplicitVRLittleEndian)
        dataset.file_meta = file_meta if file_meta is not None else pydicom.dataset.FileMetaDataset()
        dataset.file_meta.TransferSyntaxUID = transfer_syntax
    check_decoder_available(transfer_syntax, path)

    photometric_interpretation = str(dataset.get("PhotometricInterpretation", "")).strip().upper()
    if photometric_interpretation not in MONOCHROME_INTERPRETATIONS + COLOUR_INTERPRETATIONS:
        raise ValueError(
            f"The DICOM file {path} has the photometric interpretation {photometric_interpretation or '(none)'!r}; "
            f"supported are {', '.join(MONOCHROME_INTERPRETATIONS + COLOUR_INTERPRETATIONS)}."
        )
    bits_stored = int(dataset.get("BitsStored", dataset.get("BitsAllocated", 8)))
    frame, number_of_frames = decode_first_frame(dataset, path, transfer_syntax)

    if photometric_interpretation in COLOUR_INTERPRETATIONS:
        pixels = colour_to_grey(frame, dataset, photometric_interpretation)
        value_range = (0.0, float(2**bits_stored - 1))
        voi_transform = "none"
    else:
        if frame.ndim != 2:
            raise ValueError(f"The DICOM file {path} decoded to shape {frame.shape}, not one grey frame.")
        try:
            pixels, value_range, voi_transform = apply_grayscale_transforms(frame, dataset)
        except (ValueError, NotImplementedError, AttributeError, IndexError, KeyError) as error:
            raise ValueError(
                f"Cannot apply the Modality LUT / VOI LUT or window of the DICOM file {path}: "
                f"{type(error).__name__}: {error}"
            ) from error
        if photometric_interpretation == "MONOCHROME1":
            pixels = value_range[0] + value_range[1] - pixels.astype(np.float64)

    return DicomImage(
        pixels=np.ascontiguousarray(pixels, dtype=np.float32),
        value_range=value_range,
        view_position=read_view_position(dataset),
        photometric_interpretation=photometric_interpretation,
        bits_stored=bits_stored,
        voi_transform=voi_transform,
        transfer_syntax=transfer_syntax,
        number_of_frames=number_of_frames,
        path=path,
    )


__all__ = [
    "DicomDecoderMissingError",
    "DicomImage",
    "check_decoder_available",
    "decoder_requirements",
    "read_dicom",
    "read_dicom_view_position",
]
