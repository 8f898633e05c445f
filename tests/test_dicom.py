"""`dicom_cdan.read_dicom`: the real SIIM DICOM and DICOM files written here with pydicom (CPU, offline)."""

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels.decoders.base import Decoder
from pydicom.uid import (
    MPEG2MPML,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from data_cdan.testing import CXR_IMAGES
from dicom_cdan import DicomDecoderMissingError, DicomImage, read_dicom
from image_processing_cdan import CdanImageProcessor


SIIM_DICOM = CXR_IMAGES / "torchxrayvision_test_images" / "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
SIDE = 16


def build_dataset(
    pixels: np.ndarray,
    photometric_interpretation: str = "MONOCHROME2",
    bits_stored: int = 16,
    view_position: str | None = None,
) -> Dataset:
    """A DX-like dataset holding `pixels` natively (Explicit VR Little Endian), ready for `save_as`."""
    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.SOPClassUID = SecondaryCaptureImageStorage
    dataset.SOPInstanceUID = generate_uid()
    dataset.file_meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    dataset.Modality = "DX"
    if view_position is not None:
        dataset.ViewPosition = view_position
    dataset.set_pixel_data(pixels, photometric_interpretation, bits_stored, generate_instance_uid=False)
    return dataset


def save(dataset: Dataset, path: Path) -> Path:
    """Write `dataset` as a DICOM Part 10 file (preamble, "DICM", file meta) and return `path`."""
    dataset.save_as(path, enforce_file_format=True)
    return path


def ramp(low: int, high: int, dtype: type = np.uint16, side: int = SIDE) -> np.ndarray:
    """A `side` x `side` image whose values run evenly from `low` to `high`."""
    return np.linspace(low, high, side * side).round().astype(dtype).reshape(side, side)


def add_voi_lut(dataset: Dataset, first_mapped: int, lut_data: list[int], bits_per_entry: int = 16) -> None:
    """Give `dataset` a one-item VOI LUT Sequence (LUT Descriptor: entries, first mapped value, bits per entry)."""
    item = Dataset()
    item.add_new(0x00283002, "US", [len(lut_data), first_mapped, bits_per_entry])  # LUT Descriptor
    item.add_new(0x00283006, "US", lut_data)  # LUT Data
    dataset.VOILUTSequence = [item]


def encapsulated_file(path: Path, transfer_syntax: str, frame: bytes) -> Path:
    """A 16 x 16 8-bit MONOCHROME2 file whose Pixel Data are `frame`, encapsulated under `transfer_syntax`."""
    dataset = build_dataset(ramp(0, 255, np.uint8), bits_stored=8)
    dataset.file_meta.TransferSyntaxUID = transfer_syntax
    dataset.PixelData = encapsulate([frame])
    dataset["PixelData"].VR = "OB"
    return save(dataset, path)


def at(image: DicomImage, pixels: np.ndarray, stored_value: int) -> float:
    """The output value of the (first) pixel whose stored value is `stored_value`."""
    row, column = np.argwhere(pixels == stored_value)[0]
    return float(image.pixels[row, column])


# --------------------------------------------------------------------------------------------------------------------
# The real SIIM-ACR DICOM (JPEG Baseline, 8-bit MONOCHROME2, View Position PA)
# --------------------------------------------------------------------------------------------------------------------


def test_siim_dicom_metadata():
    image = read_dicom(SIIM_DICOM)
    assert image.pixels.shape == (1024, 1024) and image.pixels.dtype == np.float32
    assert image.view_position == "PA"
    assert (image.photometric_interpretation, image.bits_stored, image.voi_transform) == ("MONOCHROME2", 8, "none")
    assert image.transfer_syntax == pydicom.uid.JPEGBaseline8Bit
    assert image.path == SIIM_DICOM


def test_siim_dicom_pixels_are_the_decoded_stored_values():
    # No rescale, no VOI, MONOCHROME2: the intensities are the decoded JPEG samples themselves.
    image = read_dicom(SIIM_DICOM)
    decoded = pydicom.dcmread(SIIM_DICOM).pixel_array
    np.testing.assert_array_equal(image.pixels, decoded.astype(np.float32))
    assert image.pixels.std() > 10  # a real radiograph, not a blank frame


def test_siim_dicom_through_the_image_processor():
    image = read_dicom(SIIM_DICOM)
    processor = CdanImageProcessor(image_size=32, num_views=1)
    from_array = processor(images=image.pixels, return_tensors="np")["pixel_values"]
    from_pil = processor(images=image.to_pil(), return_tensors="np")["pixel_values"]
    assert from_array.shape == (1, 1, 3, 32, 32)
    np.testing.assert_allclose(from_array, from_pil, atol=1e-6)


# --------------------------------------------------------------------------------------------------------------------
# Grayscale pipeline on files written here
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def monochrome1_voi_lut_file(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """16-bit MONOCHROME1 with a VOI LUT mapping stored 1000..3000 linearly onto 0..60000 (clipped outside)."""
    stored = ramp(1000, 3000)
    stored[0, :5] = [500, 5000, 1000, 2000, 3000]  # 500 and 5000: below and above the LUT's input range
    dataset = build_dataset(stored, "MONOCHROME1", bits_stored=16)
    add_voi_lut(dataset, first_mapped=1000, lut_data=[30 * step for step in range(2001)])
    return save(dataset, tmp_path / "monochrome1_voi_lut.dcm"), stored


def test_monochrome1_is_inverted(monochrome1_voi_lut_file):
    path, stored = monochrome1_voi_lut_file
    image = read_dicom(path)
    # The highest stored value is the darkest in MONOCHROME1 and must come out lowest (MONOCHROME2 sense).
    assert at(image, stored, 3000) == image.pixels.min()
    assert at(image, stored, 1000) == image.pixels.max()
    assert at(image, stored, 1000) > at(image, stored, 2000) > at(image, stored, 3000)
    assert image.photometric_interpretation == "MONOCHROME1"


def test_voi_lut_sequence_is_applied(monochrome1_voi_lut_file):
    path, stored = monochrome1_voi_lut_file
    image = read_dicom(path)
    assert image.voi_transform == "lut"
    assert image.value_range == (0.0, 65535.0)  # 16 bits per LUT entry
    # LUT output 30 * (stored - 1000), inverted within 0..65535.
    assert at(image, stored, 2000) == 65535 - 30_000
    # Stored values outside the LUT's input range clip to its first / last entry.
    assert at(image, stored, 500) == at(image, stored, 1000) == 65535
    assert at(image, stored, 5000) == at(image, stored, 3000) == 65535 - 60_000


@pytest.fixture
def windowed_16_bit_file(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """16-bit MONOCHROME2, Window Center 30000 / Width 4000 and no VOI LUT, with values outside the window."""
    stored = ramp(20000, 40000)
    stored[0, :6] = [30000, 30001, 25000, 36000, 20000, 40000]
    dataset = build_dataset(stored, "MONOCHROME2", bits_stored=16)
    dataset.WindowCenter = 30000
    dataset.WindowWidth = 4000
    return save(dataset, tmp_path / "windowed_16_bit.dcm"), stored


def test_window_is_applied_and_clips(windowed_16_bit_file):
    path, stored = windowed_16_bit_file
    image = read_dicom(path)
    assert image.voi_transform == "window"
    # Below the window (28000..32000) everything is the minimum output, above it the maximum.
    assert at(image, stored, 20000) == at(image, stored, 25000) == 0.0
    assert at(image, stored, 40000) == at(image, stored, 36000) == 65535.0
    assert 0.0 < at(image, stored, 30000) < 65535.0


def test_16_bit_precision_is_kept(windowed_16_bit_file):
    path, stored = windowed_16_bit_file
    image = read_dicom(path)
    float01 = image.to_float01()
    first, second = np.argwhere(stored == 30000)[0], np.argwhere(stored == 30001)[0]
    assert image.pixels[tuple(second)] > image.pixels[tuple(first)]
    assert float01[tuple(second)] > float01[tuple(first)]
    # 8-bit quantisation merges the two (one stored step is ~1/16 of an 8-bit level in this window).
    assert image.to_uint8()[tuple(second)] == image.to_uint8()[tuple(first)]


def test_rescale_slope_and_intercept_are_applied(tmp_path):
    stored = ramp(0, 1000)
    dataset = build_dataset(stored, "MONOCHROME2", bits_stored=12)
    dataset.RescaleSlope = 2
    dataset.RescaleIntercept = -1000
    image = read_dicom(save(dataset, tmp_path / "rescaled.dcm"))
    np.testing.assert_array_equal(image.pixels, stored.astype(np.float32) * 2 - 1000)
    assert image.value_range == (-1000.0, 4095 * 2 - 1000.0)


def test_8_bit_without_voi_keeps_stored_values(tmp_path):
    stored = ramp(0, 255, np.uint8)
    image = read_dicom(save(build_dataset(stored, "MONOCHROME2", bits_stored=8), tmp_path / "plain_8_bit.dcm"))
    assert (image.voi_transform, image.bits_stored) == ("none", 8)
    np.testing.assert_array_equal(image.pixels, stored.astype(np.float32))
    np.testing.assert_array_equal(image.to_uint8(), stored)


def test_to_float01_and_to_pil(windowed_16_bit_file):
    image = read_dicom(windowed_16_bit_file[0])
    float01 = image.to_float01()
    assert float01.dtype == np.float32 and float01.min() == 0.0 and float01.max() == 1.0
    pil_image = image.to_pil()
    assert pil_image.mode == "RGB" and pil_image.size == (SIDE, SIDE)
    np.testing.assert_array_equal(np.asarray(pil_image)[..., 0], image.to_uint8())


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")  # lower case and spaces: seen in real files
@pytest.mark.parametrize(
    ("view_position", "expected"), [("PA", "PA"), (" ap ", "AP"), ("LATERAL", "LATERAL"), ("ll", "LL"), ("", None)]
)
def test_view_position_is_read(tmp_path, view_position, expected):
    dataset = build_dataset(ramp(0, 255, np.uint8), bits_stored=8, view_position=view_position)
    assert read_dicom(save(dataset, tmp_path / "view.dcm")).view_position == expected


def test_missing_view_position_is_none(tmp_path):
    dataset = build_dataset(ramp(0, 255, np.uint8), bits_stored=8)
    assert read_dicom(save(dataset, tmp_path / "no_view.dcm")).view_position is None


def test_multi_frame_reads_the_first_frame_with_a_warning(tmp_path):
    frames = np.stack([ramp(0, 100), ramp(500, 900)])
    dataset = build_dataset(frames, "MONOCHROME2", bits_stored=16)
    path = save(dataset, tmp_path / "two_frames.dcm")
    with pytest.warns(UserWarning, match="2 frames; only the first"):
        image = read_dicom(path)
    np.testing.assert_array_equal(image.pixels, frames[0].astype(np.float32))
    assert image.number_of_frames == 2


def test_rgb_is_converted_to_grey(tmp_path):
    rgb = np.zeros((SIDE, SIDE, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    image = read_dicom(save(build_dataset(rgb, "RGB", bits_stored=8), tmp_path / "rgb.dcm"))
    assert image.pixels.shape == (SIDE, SIDE)
    np.testing.assert_allclose(image.pixels, 0.299 * 200 + 0.587 * 100 + 0.114 * 50, rtol=1e-6)


# --------------------------------------------------------------------------------------------------------------------
# Compressed transfer syntaxes
# --------------------------------------------------------------------------------------------------------------------


def test_rle_compressed_16_bit_decodes_like_the_native_file(tmp_path):
    stored = ramp(0, 65535)
    native = read_dicom(save(build_dataset(stored), tmp_path / "native.dcm"))
    dataset = build_dataset(stored)
    dataset.compress(RLELossless, generate_instance_uid=False)  # pydicom's own RLE encoder
    compressed = read_dicom(save(dataset, tmp_path / "rle.dcm"))
    assert compressed.transfer_syntax == RLELossless
    np.testing.assert_array_equal(compressed.pixels, native.pixels)


def test_jpeg2000_lossless_16_bit_decodes_like_the_native_file(tmp_path):
    assert pydicom.pixels.get_encoder(JPEG2000Lossless).is_available, "the `dicom` extra (pylibjpeg-openjpeg)"
    stored = ramp(0, 65535, side=64)  # openjpeg's default 6 resolution levels need at least 32 px a side
    dataset = build_dataset(stored)
    dataset.compress(JPEG2000Lossless, generate_instance_uid=False)
    image = read_dicom(save(dataset, tmp_path / "j2k.dcm"))
    assert image.transfer_syntax == JPEG2000Lossless
    np.testing.assert_array_equal(image.pixels, stored.astype(np.float32))


def test_missing_decoder_names_the_transfer_syntax_and_packages(tmp_path, monkeypatch):
    path = encapsulated_file(tmp_path / "jpeg_lossless.dcm", JPEGLosslessSV1, b"\xff\xd8\xff\xd9")
    # Pretend no decoder package is installed: encapsulated syntaxes become unavailable.
    monkeypatch.setattr(Decoder, "is_available", property(lambda decoder: decoder.is_native))
    with pytest.raises(DicomDecoderMissingError) as raised:
        read_dicom(path)
    message = str(raised.value)
    assert isinstance(raised.value, ImportError) and isinstance(raised.value, ValueError)
    assert str(path) in message and "JPEG Lossless" in message and JPEGLosslessSV1 in message
    assert '"pylibjpeg>=2.0" "pylibjpeg-libjpeg>=2.1"' in message and '"python-gdcm>=3.0.10"' in message


def test_corrupt_compressed_pixel_data_is_a_value_error(tmp_path):
    # With a decoder installed the bytes fail to decode; without one, the missing-decoder error (a ValueError too).
    path = encapsulated_file(tmp_path / "corrupt_jpeg_lossless.dcm", JPEGLosslessSV1, b"\xff\xd8\xff\xd9")
    with pytest.raises(ValueError, match="JPEG Lossless") as raised:
        read_dicom(path)
    assert str(path) in str(raised.value)


def test_unsupported_transfer_syntax_is_refused(tmp_path):
    path = encapsulated_file(tmp_path / "mpeg2.dcm", MPEG2MPML, b"\x00\x00\x01\xb3" + bytes(12))
    with pytest.raises(ValueError, match="MPEG2.*not supported") as raised:
        read_dicom(path)
    assert str(path) in str(raised.value)
    assert not isinstance(raised.value, ImportError)


# --------------------------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------------------------


def test_dicom_without_pixel_data_is_refused(tmp_path):
    dataset = build_dataset(ramp(0, 255, np.uint8), bits_stored=8)
    del dataset.PixelData
    path = save(dataset, tmp_path / "no_pixels.dcm")
    with pytest.raises(ValueError, match=r"no Pixel Data \(7FE0,0010\)") as raised:
        read_dicom(path)
    assert str(path) in str(raised.value)


def test_non_dicom_file_with_dcm_extension_is_refused(tmp_path):
    path = tmp_path / "not_really.dcm"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    with pytest.raises(ValueError, match="not a DICOM file") as raised:
        read_dicom(path)
    assert str(path) in str(raised.value)


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.dcm"):
        read_dicom(tmp_path / "absent.dcm")


def test_headerless_dicom_needs_force(tmp_path):
    stored = ramp(0, 1000)
    dataset = build_dataset(stored, view_position="AP")
    del dataset.file_meta
    path = tmp_path / "acr_nema_style.dcm"
    dataset.save_as(path, implicit_vr=True, little_endian=True)  # no preamble, no "DICM", no file meta
    with pytest.raises(ValueError, match="not a DICOM file"):
        read_dicom(path)
    image = read_dicom(path, force=True)
    np.testing.assert_array_equal(image.pixels, stored.astype(np.float32))
    assert (image.view_position, image.transfer_syntax) == ("AP", pydicom.uid.ImplicitVRLittleEndian)


def test_an_invalid_window_is_a_value_error_naming_the_file(tmp_path):
    dataset = build_dataset(ramp(0, 1000))
    dataset.WindowCenter, dataset.WindowWidth = 500, 0  # LINEAR windows need a width of at least 1
    path = save(dataset, tmp_path / "zero_width_window.dcm")
    with pytest.raises(ValueError, match="Window Width") as raised:
        read_dicom(path)
    assert str(path) in str(raised.value)


@pytest.fixture
def views_processor(tmp_path):
    """A two-view processor, DICOM views tagged AP and LL and one untagged, and the view ids (unknown last)."""
    from image_processing_cdan import CdanImageProcessor
    from priorrg_modules import DEFAULT_VIEW_POSITIONS
    from processing_cdan import CdanProcessor
    from tokenization_cdan import build_report_tokenizer

    views = {
        "frontal": save(build_dataset(ramp(0, 4095), view_position="AP"), tmp_path / "frontal"),
        "lateral": save(build_dataset(ramp(0, 4095), view_position="LL"), tmp_path / "lateral"),
        "unnamed": save(build_dataset(ramp(0, 4095)), tmp_path / "unnamed"),
    }
    processor = CdanProcessor(
        image_processor=CdanImageProcessor(image_size=32, num_views=2),
        tokenizer=build_report_tokenizer(["the heart is normal ."], threshold=1),
    )
    ids = {name: index for index, name in enumerate(DEFAULT_VIEW_POSITIONS)}
    ids["unknown"] = len(DEFAULT_VIEW_POSITIONS)
    return processor, views, ids


def test_view_positions_come_from_the_dicom_header_when_a_study_gives_none(views_processor):
    processor, views, ids = views_processor
    frontal, lateral, unnamed = views["frontal"], views["lateral"], views["unnamed"]
    unknown = ids["unknown"]
    inputs = processor(
        images=[[frontal, lateral], [frontal, unnamed], [frontal, lateral]],
        view_positions=[None, None, ["PA", "LATERAL"]],
    )
    assert inputs["view_position_ids"].tolist() == [
        [ids["AP"], ids["LL"]],
        [ids["AP"], unknown],
        [ids["PA"], ids["LATERAL"]],  # names given by the caller win over the header
    ]


def test_prior_view_positions_come_from_the_dicom_header_when_a_study_gives_none(views_processor):
    processor, views, ids = views_processor
    frontal, lateral, unnamed = views["frontal"], views["lateral"], views["unnamed"]
    unknown = ids["unknown"]
    current = [frontal, frontal]
    inputs = processor(
        images=[current, current, current, current],
        prior_images=[[lateral, frontal], [frontal, unnamed], [frontal, lateral], None],
        prior_view_positions=[None, None, ["PA", "LATERAL"], None],
    )
    assert inputs["prior_view_position_ids"].tolist() == [
        [ids["LL"], ids["AP"]],  # the prior's own headers, in its own view order
        [ids["AP"], unknown],
        [ids["PA"], ids["LATERAL"]],  # names given by the caller win over the header
        [unknown, unknown],  # no prior
    ]
