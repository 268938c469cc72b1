"""Tests for training.shared.dicom: every input kind ends as float32 2-D with bright bone.

Test DICOMs are built here with pydicom (``set_pixel_data``, ``compress``, and a tiny
JPEG Lossless SV1 encoder below, since pydicom cannot encode JPEG), plus the test files
that ship inside pydicom's wheel, which must be present (no download, no skip).
"""

from __future__ import annotations

import copy
import io
import logging
import struct
import time
import tracemalloc
import zlib
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.pixels import apply_modality_lut as pydicom_modality_lut
from pydicom.pixels import apply_windowing as pydicom_windowing
from pydicom.pixels import convert_color_space, pixel_array
from pydicom.sequence import Sequence
from pydicom.uid import (
    JPEG2000,
    ComputedRadiographyImageStorage,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    RLELossless,
    generate_uid,
)

from training.shared import dicom
from training.shared.dicom import (
    MAX_IMAGE_PIXELS,
    apply_window,
    decode_dicom,
    decode_raster,
    load_image,
    read_dicom_header,
)
from training.shared.errors import ImageDecodeError, UnsupportedImageError
from training.shared.preprocess import scale_to_unit_range

PATIENT_NAME = "Doe^Jane"
PATIENT_ID = "SECRET-PID-4711"
SIZE_PX = 64

BUNDLED = [
    "CT_small.dcm",
    "MR_small.dcm",
    "MR_small_RLE.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",
    "MR_truncated.dcm",
    "JPEG2000.dcm",
    "JPGExtended.dcm",
    "JPEG-lossy.dcm",
    "JPEGLSNearLossless_16.dcm",
    "693_J2KI.dcm",
    "image_dfl.dcm",
    "SC_rgb_rle.dcm",
    "SC_rgb_jpeg_gdcm.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",
    "SC_rgb_dcmtk_+eb+cy+np.dcm",
    "SC_ybr_full_422_uncompressed.dcm",
    "SC_rgb_jls_lossy_line.dcm",
    "SC_rgb_gdcm_KY.dcm",
    "SC_rgb_rle_2frame.dcm",
    "examples_palette.dcm",
    "rtplan.dcm",
]


# --------------------------------------------------------------------------- builders


def bundled(name: str) -> str:
    """Path of a test file shipped in pydicom's wheel; missing is a failure, not a skip."""
    assert name in BUNDLED, f"add {name} to BUNDLED"
    path = get_testdata_file(name, download=False)
    assert path, f"pydicom's bundled test file {name} is missing from this installation"
    return str(path)


def disc_mask(size: int = SIZE_PX) -> np.ndarray:
    """A "bone" disc, off-centre, on a background."""
    yy, xx = np.mgrid[:size, :size]
    return (yy - 0.55 * size) ** 2 + (xx - 0.4 * size) ** 2 < (0.25 * size) ** 2


def value_range(bits_stored: int, signed: bool) -> tuple[int, int]:
    if signed:
        return -(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1) - 1
    return 0, 2**bits_stored - 1


def dtype_for(bits_stored: int, signed: bool) -> type[np.integer]:
    if bits_stored <= 8:
        return np.int8 if signed else np.uint8
    return np.int16 if signed else np.uint16


def phantom(bits_stored: int = 12, signed: bool = False, *, inverted: bool = False) -> np.ndarray:
    """Bright disc, dark background with a faint ramp; stored inverted for MONOCHROME1."""
    lo, hi = value_range(bits_stored, signed)
    span = hi - lo
    ramp = np.linspace(0, 0.2 * span, SIZE_PX)[None, :].repeat(SIZE_PX, axis=0)
    values = lo + 0.05 * span + ramp
    values[disc_mask()] = lo + 0.9 * span
    values = np.rint(values).astype(np.int64)
    if inverted:
        values = hi + lo - values
    return values.astype(dtype_for(bits_stored, signed))


def ramp_image(bits_stored: int = 12) -> np.ndarray:
    """Every value of a 12-bit range once, for window/LUT shape checks."""
    lo, hi = value_range(bits_stored, False)
    return np.linspace(lo, hi, SIZE_PX * SIZE_PX).round().astype(np.uint16).reshape(SIZE_PX, -1)


def make_dataset(
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    **attributes: object,
) -> Dataset:
    """A CR image dataset around ``pixels`` (frames first if 3-D grayscale)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.Modality = "CR"
    bits = bits_stored or pixels.dtype.itemsize * 8
    ds.set_pixel_data(pixels, photometric, bits)
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def to_bytes(ds: Dataset, **encoding: bool) -> bytes:
    """The dataset in the DICOM File Format (preamble, "DICM", meta information)."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True, **encoding)
    return buf.getvalue()


def encapsulated(ds: Dataset, frames: list[bytes], uid: str) -> Dataset:
    """``ds`` with its pixel data replaced by compressed ``frames`` under ``uid``."""
    ds.PixelData = encapsulate(frames)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = uid
    if len(frames) > 1:
        ds.NumberOfFrames = len(frames)
    return ds


def encode_jpeg_lossless_sv1(pixels: np.ndarray, precision: int) -> bytes:
    """Minimal JPEG Lossless, Process 14, Selection Value 1 (ITU T.81 Annex H) encoder.

    One component, predictor Ra (left; the first row uses left, the first column above,
    the first sample 2**(precision-1)), one Huffman table giving each difference
    category 0..16 a 5-bit code.
    """
    rows, cols = pixels.shape
    x = pixels.astype(np.int64)
    pred = np.empty_like(x)
    pred[0, 0] = 1 << (precision - 1)
    pred[0, 1:] = x[0, :-1]
    pred[1:, 0] = x[:-1, 0]
    pred[1:, 1:] = x[1:, :-1]
    diff = (x - pred) & 0xFFFF  # differences are taken modulo 2**16 (H.1.2.1)
    diff = np.where(diff >= 0x8000, diff - 0x10000, diff)
    bits: list[str] = []
    for d in diff.ravel().tolist():
        category = 16 if d == -32768 else abs(d).bit_length()
        bits.append(format(category, "05b"))
        if 0 < category < 16:
            bits.append(format(d if d > 0 else d + (1 << category) - 1, f"0{category}b"))
    stream = "".join(bits)
    stream += "1" * (-len(stream) % 8)
    scan = bytearray()
    for i in range(0, len(stream), 8):
        scan.append(int(stream[i : i + 8], 2))
        if scan[-1] == 0xFF:
            scan.append(0x00)  # byte stuffing

    def segment(marker: int, payload: bytes) -> bytes:
        return struct.pack(">HH", marker, len(payload) + 2) + payload

    code_counts = bytes([0, 0, 0, 0, 17] + [0] * 11)
    return (
        b"\xff\xd8"
        + segment(0xFFC3, struct.pack(">BHHB", precision, rows, cols, 1) + bytes([1, 0x11, 0]))
        + segment(0xFFC4, bytes([0x00]) + code_counts + bytes(range(17)))
        + segment(0xFFDA, bytes([1, 1, 0x00, 1, 0, 0]))
        + bytes(scan)
        + b"\xff\xd9"
    )


def png_bytes(image: Image.Image, **params: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG", **params)
    return buf.getvalue()


def jpeg_bytes(image: Image.Image, **params: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=95, **params)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG signature and IHDR claiming ``width`` × ``height`` and a stub IDAT."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


def pillow_luminance(rgb: np.ndarray) -> np.ndarray:
    """Independent oracle for colour → gray: Pillow's own "L" conversion (BT.601)."""
    return np.asarray(Image.fromarray(rgb.astype(np.uint8), "RGB").convert("L"), dtype=np.float32)


def unit(image: np.ndarray) -> np.ndarray:
    return scale_to_unit_range(image)


def assert_bright_disc(image: np.ndarray) -> None:
    """The disc (bone) is brighter than every background pixel."""
    assert image.dtype == np.float32 and image.ndim == 2 and np.isfinite(image).all()
    mask = disc_mask(image.shape[0])
    assert image[mask].min() > image[~mask].max(), "bone is not the bright region"


# --------------------------------------------------------------------------- entry point


def test_bundled_files_are_present() -> None:
    for name in BUNDLED:
        bundled(name)


def test_load_image_reads_paths_pathlikes_and_bytes_alike(tmp_path: Path) -> None:
    data = to_bytes(make_dataset(phantom()))
    path = tmp_path / "xray.dcm"
    path.write_bytes(data)
    from_bytes = load_image(data)
    assert_bright_disc(from_bytes)
    np.testing.assert_array_equal(load_image(path), from_bytes)
    np.testing.assert_array_equal(load_image(str(path)), from_bytes)
    np.testing.assert_array_equal(decode_dicom(data), from_bytes)


def test_dicom_is_recognised_by_content_not_by_name(tmp_path: Path) -> None:
    path = tmp_path / "image.png"  # a misleading extension
    path.write_bytes(to_bytes(make_dataset(phantom())))
    assert_bright_disc(load_image(path))


def test_dicom_without_preamble_is_recognised() -> None:
    ds = make_dataset(phantom())
    expected = decode_dicom(ds)

    meta_only = io.BytesIO()  # file meta information but no preamble/"DICM"
    ds.save_as(meta_only, enforce_file_format=False)
    assert meta_only.getvalue()[128:132] != b"DICM"
    np.testing.assert_array_equal(load_image(meta_only.getvalue()), expected)

    bare = DicomBytesIO()  # neither preamble nor meta information
    bare.is_little_endian, bare.is_implicit_VR = True, False
    write_dataset(bare, ds)
    assert bare.getvalue()[:2] == b"\x08\x00"
    np.testing.assert_array_equal(load_image(bare.getvalue()), expected)


def test_decode_dicom_does_not_modify_a_dataset_without_transfer_syntax() -> None:
    raw = DicomBytesIO()
    raw.is_little_endian, raw.is_implicit_VR = True, True
    write_dataset(raw, make_dataset(phantom()))
    ds = pydicom.dcmread(io.BytesIO(raw.getvalue()), force=True)
    assert not ds.file_meta.get("TransferSyntaxUID")
    assert_bright_disc(decode_dicom(ds))
    assert not ds.file_meta.get("TransferSyntaxUID")


# --------------------------------------------------------------------------- polarity


def test_monochrome1_and_monochrome2_of_the_same_anatomy_give_the_same_image() -> None:
    m2 = decode_dicom(make_dataset(phantom(), "MONOCHROME2", 12))
    m1 = decode_dicom(make_dataset(phantom(inverted=True), "MONOCHROME1", 12))
    assert_bright_disc(m2)
    assert_bright_disc(m1)
    np.testing.assert_allclose(unit(m1), unit(m2), atol=1e-6)


def test_presentation_lut_shape_inverse_on_monochrome1_inverts_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="training.shared.dicom")
    plain = make_dataset(phantom(inverted=True), "MONOCHROME1", 12)
    with_shape = make_dataset(
        phantom(inverted=True), "MONOCHROME1", 12, PresentationLUTShape="INVERSE"
    )
    out = decode_dicom(with_shape)
    assert_bright_disc(out)
    np.testing.assert_array_equal(out, decode_dicom(plain))
    assert "contradicts" not in caplog.text


@pytest.mark.parametrize(
    ("photometric", "shape", "inverted"),
    [("MONOCHROME1", "IDENTITY", True), ("MONOCHROME2", "INVERSE", False)],
)
def test_contradicting_presentation_lut_shape_follows_photometric_interpretation(
    photometric: str, shape: str, inverted: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="training.shared.dicom")
    ds = make_dataset(phantom(inverted=inverted), photometric, 12, PresentationLUTShape=shape)
    assert_bright_disc(decode_dicom(ds))
    assert "contradicts Photometric Interpretation" in caplog.text


def test_monochrome1_is_inverted_after_the_window() -> None:
    lo, hi = value_range(12, False)
    stored = ramp_image()
    center, width = 1000.0, 801.0
    ds = make_dataset(stored, "MONOCHROME1", 12, WindowCenter=center, WindowWidth=width)
    out = decode_dicom(ds)
    # Min value = white after the VOI LUT: values below the window are the brightest.
    expected = 1.0 - np.clip((stored - (center - 0.5 - (width - 1) / 2)) / (width - 1), 0, 1)
    np.testing.assert_allclose(unit(out), expected, atol=1e-6)


# --------------------------------------------------------------------------- modality + VOI


def pydicom_reference(ds: Dataset, index: int = 0) -> np.ndarray:
    """pydicom's own modality LUT + windowing, scaled to [0, 1]: the oracle."""
    reference = copy.deepcopy(ds)
    stored = pixel_array(reference, index=0)
    return unit(pydicom_windowing(pydicom_modality_lut(stored, reference), reference, index))


def test_no_window_keeps_the_full_modality_range() -> None:
    ds = pydicom.dcmread(bundled("CT_small.dcm"))
    assert "WindowCenter" not in ds
    out = load_image(bundled("CT_small.dcm"))
    expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(out, expected.astype(np.float32))


def test_rescale_slope_and_intercept_put_the_window_in_modality_units() -> None:
    stored = ramp_image()
    ds = make_dataset(
        stored,
        bits_stored=12,
        RescaleSlope=2.0,
        RescaleIntercept=-1000.0,
        WindowCenter=3000.0,
        WindowWidth=2001.0,
    )
    out = decode_dicom(to_bytes(ds))
    np.testing.assert_allclose(unit(out), pydicom_reference(ds), atol=1e-6)
    # The same window on the stored values would select a different range.
    assert not np.allclose(unit(out), unit(apply_window(stored, 3000.0, 2001.0)), atol=1e-2)


def test_multi_valued_window_uses_the_first_pair() -> None:
    stored = ramp_image()
    ds = make_dataset(
        stored, bits_stored=12, WindowCenter=[1500.0, 3000.0], WindowWidth=[1000.0, 400.0]
    )
    out = unit(decode_dicom(to_bytes(ds)))
    np.testing.assert_allclose(out, pydicom_reference(ds, index=0), atol=1e-6)
    assert not np.allclose(out, pydicom_reference(ds, index=1), atol=1e-2)


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
def test_voi_lut_functions_match_pydicom(function: str) -> None:
    ds = make_dataset(
        ramp_image(),
        bits_stored=12,
        WindowCenter=2000.0,
        WindowWidth=1500.0,
        VOILUTFunction=function,
    )
    np.testing.assert_allclose(unit(decode_dicom(ds)), pydicom_reference(ds), atol=1e-6)


def test_window_of_width_one_is_a_threshold() -> None:
    out = apply_window(np.array([99.0, 99.5, 100.0, 101.0]), center=100.0, width=1.0)
    np.testing.assert_array_equal(out, [0.0, 0.0, 1.0, 1.0])


def test_an_invalid_window_is_ignored_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="training.shared.dicom")
    stored = phantom()
    out = decode_dicom(make_dataset(stored, bits_stored=12, WindowCenter=100, WindowWidth=0))
    np.testing.assert_array_equal(out, stored.astype(np.float32))
    assert "window ignored" in caplog.text


def lut_item(first_mapped: int, data: list[int], bits: int = 16) -> Dataset:
    item = Dataset()
    item.LUTDescriptor = [len(data), first_mapped, bits]
    item.LUTData = data
    item["LUTData"].VR = "US"
    return item


def test_voi_lut_sequence_is_applied() -> None:
    stored = ramp_image()
    first_mapped, entries = 500, 3000
    lut = [int(4095 * (i / (entries - 1)) ** 2) for i in range(entries)]  # non-linear
    ds = make_dataset(stored, bits_stored=12)
    ds.VOILUTSequence = Sequence([lut_item(first_mapped, lut)])
    out = decode_dicom(to_bytes(ds))
    expected = np.asarray(lut)[np.clip(stored.astype(int) - first_mapped, 0, entries - 1)]
    np.testing.assert_array_equal(out, expected.astype(np.float32))


def test_voi_lut_sequence_takes_precedence_over_a_window() -> None:
    stored = ramp_image()
    lut = [4095 - i for i in range(4096)]  # a decreasing LUT: unmistakable
    ds = make_dataset(stored, bits_stored=12, WindowCenter=2048, WindowWidth=4096)
    ds.VOILUTSequence = Sequence([lut_item(0, lut)])
    np.testing.assert_array_equal(decode_dicom(ds), (4095 - stored).astype(np.float32))


def test_modality_lut_sequence_is_applied() -> None:
    stored = (ramp_image() // 16).astype(np.uint16)  # 0..255
    lut = [int(1000 * np.sqrt(i)) for i in range(256)]
    ds = make_dataset(stored, bits_stored=8)
    ds.ModalityLUTSequence = Sequence([lut_item(0, lut)])
    expected = np.asarray(lut)[stored]
    np.testing.assert_array_equal(decode_dicom(to_bytes(ds)), expected.astype(np.float32))


# --------------------------------------------------------------------------- bit depths


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
@pytest.mark.parametrize("bits_stored", [8, 12, 14, 16])
def test_bit_depths_and_signedness_keep_the_stored_values(bits_stored: int, signed: bool) -> None:
    stored = phantom(bits_stored, signed)
    lo, hi = value_range(bits_stored, signed)
    stored[0, 0], stored[0, 1] = lo, hi  # the extremes must survive too
    ds = make_dataset(stored, bits_stored=bits_stored)
    assert ds.PixelRepresentation == int(signed)
    out = load_image(to_bytes(ds))
    np.testing.assert_array_equal(out, stored.astype(np.float32))
    out[0, :2] = out[0, 2]  # the extremes are not part of the anatomy
    assert_bright_disc(out)


def test_bits_above_bits_stored_are_ignored() -> None:
    unsigned = np.array([[0, 1, 4095, 2048]], dtype=np.uint16)
    ds = make_dataset(unsigned, bits_stored=12)
    ds.PixelData = (unsigned | 0xF000).astype("<u2").tobytes()  # overlay bits set
    np.testing.assert_array_equal(decode_dicom(ds), unsigned.astype(np.float32))

    signed = np.array([[-2048, -1, 0, 2047]], dtype=np.int16)
    ds = make_dataset(signed, bits_stored=12)
    ds.PixelData = (signed.view(np.uint16) & 0x0FFF).astype("<u2").tobytes()  # no sign bits
    np.testing.assert_array_equal(decode_dicom(ds), signed.astype(np.float32))


# --------------------------------------------------------------------------- transfer syntaxes


def compressed_with(uid: str, stored: np.ndarray, bits_stored: int) -> Dataset:
    ds = make_dataset(stored, bits_stored=bits_stored)
    if uid == JPEGLosslessSV1:
        return encapsulated(ds, [encode_jpeg_lossless_sv1(stored, bits_stored)], uid)
    ds.compress(uid)
    return ds


@pytest.mark.parametrize(
    ("uid", "bits_stored", "signed"),
    [
        (RLELossless, 8, False),
        (RLELossless, 12, True),
        (RLELossless, 16, False),
        (JPEG2000Lossless, 12, False),
        (JPEG2000Lossless, 16, True),
        (JPEGLosslessSV1, 8, False),
        (JPEGLosslessSV1, 12, False),
        (JPEGLosslessSV1, 16, False),
    ],
    ids=lambda v: getattr(v, "name", str(v)),
)
def test_lossless_transfer_syntaxes_decode_exactly(
    uid: str, bits_stored: int, signed: bool
) -> None:
    stored = phantom(bits_stored, signed)
    ds = compressed_with(uid, stored, bits_stored)
    assert ds.file_meta.TransferSyntaxUID == uid
    out = load_image(to_bytes(ds))
    np.testing.assert_array_equal(out, stored.astype(np.float32))
    assert_bright_disc(out)


def test_jpeg_2000_lossy_decodes_close_to_the_original() -> None:
    stored = phantom(12)
    ds = make_dataset(stored, bits_stored=12)
    ds.compress(JPEG2000, j2k_cr=[8])
    out = load_image(to_bytes(ds))
    assert np.abs(unit(out) - unit(stored)).mean() < 0.02
    assert_bright_disc(out)


def test_jpeg_baseline_decodes_close_to_the_original() -> None:
    stored = phantom(8)
    ds = make_dataset(stored, bits_stored=8)
    encapsulated(ds, [jpeg_bytes(Image.fromarray(stored, "L"))], JPEGBaseline8Bit)
    out = load_image(to_bytes(ds))
    assert np.abs(out - stored.astype(np.float32)).mean() < 2.0
    assert_bright_disc(out)


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_RLE.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_implicit.dcm",
        "MR_small_bigendian.dcm",
    ],
)
def test_bundled_lossless_encodings_equal_the_uncompressed_original(name: str) -> None:
    np.testing.assert_array_equal(load_image(bundled(name)), load_image(bundled("MR_small.dcm")))


def test_bundled_stored_window_is_applied_like_pydicom() -> None:
    ds = pydicom.dcmread(bundled("MR_small.dcm"))
    assert "WindowCenter" in ds
    np.testing.assert_allclose(
        unit(load_image(bundled("MR_small.dcm"))), pydicom_reference(ds), atol=1e-6
    )


@pytest.mark.parametrize(
    ("name", "tolerance"),
    [
        ("SC_rgb_jpeg_gdcm.dcm", 0.51),  # JPEG Lossless SV1, RGB
        ("SC_rgb_jpeg_dcmtk.dcm", 3.0),  # JPEG Baseline, YBR_FULL
        ("SC_rgb_dcmtk_+eb+cy+np.dcm", 10.0),  # JPEG Baseline, YBR_FULL_422
        ("SC_ybr_full_422_uncompressed.dcm", 3.0),  # native YBR_FULL_422
        ("SC_rgb_jls_lossy_line.dcm", 3.0),  # JPEG-LS near-lossless, RGB
        ("SC_rgb_gdcm_KY.dcm", 0.51),  # JPEG 2000, RGB
    ],
)
def test_bundled_colour_files_become_luminance(name: str, tolerance: float) -> None:
    reference = pillow_luminance(pydicom.dcmread(bundled("SC_rgb_rle.dcm")).pixel_array)
    out = load_image(bundled(name))
    assert out.shape == reference.shape
    assert np.abs(out - reference).max() <= tolerance


@pytest.mark.parametrize(
    "name", ["JPGExtended.dcm", "JPEGLSNearLossless_16.dcm", "693_J2KI.dcm", "image_dfl.dcm"]
)
def test_other_bundled_encodings_decode(name: str) -> None:
    ds = pydicom.dcmread(bundled(name))
    out = load_image(bundled(name))
    assert out.shape == (ds.Rows, ds.Columns) and out.dtype == np.float32
    assert np.isfinite(out).all() and out.max() > out.min()


# --------------------------------------------------------------------------- multi-frame + colour


def test_multi_frame_decodes_only_the_first_frame(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="training.shared.dicom")
    first = phantom()
    ds = make_dataset(np.stack([first, first // 2, first // 3]), bits_stored=12)
    ds.compress(RLELossless)
    fragments = list(generate_frames(ds.PixelData, number_of_frames=3))
    fragments[1] = b"\xff" * len(fragments[1])  # frame 2 is undecodable
    encapsulated(ds, fragments, RLELossless)
    with pytest.raises(Exception):  # noqa: B017 - decoding all frames must fail here
        pixel_array(ds)
    np.testing.assert_array_equal(load_image(to_bytes(ds)), first.astype(np.float32))
    assert "3 frames, using the first only" in caplog.text


def test_bundled_multi_frame_colour_gives_the_first_frame() -> None:
    ds = pydicom.dcmread(bundled("SC_rgb_rle_2frame.dcm"))
    frames = ds.pixel_array
    assert not np.array_equal(frames[0], frames[1])
    np.testing.assert_allclose(
        load_image(bundled("SC_rgb_rle_2frame.dcm")), pillow_luminance(frames[0]), atol=0.51
    )


def test_rgb_and_ybr_become_luminance() -> None:
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (SIZE_PX, SIZE_PX, 3), dtype=np.uint8)
    expected = pillow_luminance(rgb)
    out_rgb = load_image(to_bytes(make_dataset(rgb, "RGB", 8)))
    np.testing.assert_allclose(out_rgb, expected, atol=0.51)

    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    out_ybr = load_image(to_bytes(make_dataset(ybr, "YBR_FULL", 8)))
    np.testing.assert_allclose(out_ybr, expected, atol=1.6)


def test_grey_rgb_keeps_the_anatomy() -> None:
    gray = phantom(8)
    out = decode_dicom(make_dataset(np.repeat(gray[..., None], 3, axis=2), "RGB", 8))
    np.testing.assert_allclose(out, gray.astype(np.float32), atol=1e-3)
    assert_bright_disc(out)


def test_palette_colour_is_rendered_through_its_palette() -> None:
    out = load_image(bundled("examples_palette.dcm"))
    ds = pydicom.dcmread(bundled("examples_palette.dcm"))
    assert out.shape == (ds.Rows, ds.Columns) and np.isfinite(out).all()
    assert out.max() > out.min()


# --------------------------------------------------------------------------- bad input


def with_dicom(**changes: object) -> bytes:
    ds = make_dataset(phantom())
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    return to_bytes(ds)


def without_pixel_data() -> bytes:
    ds = make_dataset(phantom())
    del ds.PixelData
    return to_bytes(ds)


def with_transfer_syntax(uid: str) -> bytes:
    ds = make_dataset(phantom())
    return to_bytes(encapsulated(ds, [b"\x00" * 64], uid), implicit_vr=False, little_endian=True)


def truncated(fraction: float) -> bytes:
    data = to_bytes(make_dataset(phantom()))
    return data[: int(len(data) * fraction)]


def gif_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, "GIF")
    return buf.getvalue()


def corrupt_jpeg_2000() -> bytes:
    ds = make_dataset(phantom())
    ds.compress(JPEG2000Lossless)
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    return to_bytes(encapsulated(ds, [frame[: len(frame) // 3]], JPEG2000Lossless))


BAD_INPUTS = {
    "empty": (lambda: b"", ImageDecodeError, "empty"),
    "text": (lambda: b"Patient Doe^Jane, skull AP\n" * 20, ImageDecodeError, "neither"),
    "gif": (gif_bytes, ImageDecodeError, "neither a DICOM file nor a PNG or JPEG"),
    "no pixel data": (without_pixel_data, ImageDecodeError, "no Pixel Data"),
    "zero rows": (lambda: with_dicom(Rows=0), ImageDecodeError, "Rows=0"),
    "zero columns": (lambda: with_dicom(Columns=0), ImageDecodeError, "Columns=0"),
    "pixel data shorter than header": (
        lambda: with_dicom(Rows=SIZE_PX * 2),
        ImageDecodeError,
        "bytes of pixel data where its header needs",
    ),
    "truncated in pixel data": (lambda: truncated(0.7), ImageDecodeError, "file is truncated"),
    "truncated in header": (lambda: truncated(0.03), ImageDecodeError, "truncated"),
    "truncated in preamble": (lambda: truncated(0.005), ImageDecodeError, "neither"),
    "made-up transfer syntax": (
        lambda: with_transfer_syntax("1.2.826.0.1.3680043.99999.1"),
        UnsupportedImageError,
        "cannot decode",
    ),
    "corrupt JPEG 2000": (corrupt_jpeg_2000, ImageDecodeError, "could not be decoded"),
    "four samples per pixel": (
        lambda: with_dicom(SamplesPerPixel=4),
        UnsupportedImageError,
        "samples per pixel",
    ),
    "unknown photometric": (
        lambda: with_dicom(PhotometricInterpretation="HSV"),
        UnsupportedImageError,
        "Photometric Interpretation",
    ),
    "truncated PNG": (
        lambda: png_bytes(Image.fromarray(phantom(8), "L"))[:-40],
        ImageDecodeError,
        "PNG data could not be decoded",
    ),
    "truncated JPEG": (
        lambda: jpeg_bytes(Image.fromarray(phantom(8), "L"))[:300],
        ImageDecodeError,
        "JPEG data could not be decoded",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_a_clear_error(
    case: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    build, error, fragment = BAD_INPUTS[case]
    path = tmp_path / "bad-input.bin"
    path.write_bytes(build())
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ImageDecodeError) as info:
        load_image(path)
    assert type(info.value) is error
    message = str(info.value)
    assert message.startswith(f"{path}: ") and fragment in message
    for secret in (PATIENT_ID, "Doe"):
        assert secret not in message
        assert secret not in caplog.text


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("MR_truncated.dcm", "8,130 bytes of pixel data where its header needs 8,192"),
        ("rtplan.dcm", "no Pixel Data (a RT Plan Storage object)"),
        ("JPEG-lossy.dcm", "could not be decoded"),  # broken JPEG Extended stream
    ],
)
def test_bundled_bad_files_raise_clear_errors(name: str, fragment: str) -> None:
    with pytest.raises(ImageDecodeError) as info:
        load_image(bundled(name), name=name)
    assert str(info.value).startswith(f"{name}: ") and fragment in str(info.value)


def test_a_missing_file_is_a_decode_error(tmp_path: Path) -> None:
    with pytest.raises(ImageDecodeError, match="cannot be read"):
        load_image(tmp_path / "nowhere.dcm")


def test_a_transfer_syntax_without_installed_decoder_is_unsupported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ds = make_dataset(phantom())
    ds.compress(RLELossless)
    decoder_class = type(pydicom.pixels.get_decoder(RLELossless))
    monkeypatch.setattr(decoder_class, "is_available", property(lambda self: False))
    with pytest.raises(UnsupportedImageError, match="no decoder for it is installed"):
        decode_dicom(ds, name="rle.dcm")


def test_the_dicom_and_raster_decoders_refuse_each_others_input() -> None:
    dcm = to_bytes(make_dataset(phantom()))
    png = png_bytes(Image.fromarray(phantom(8), "L"))
    with pytest.raises(ImageDecodeError, match="is not a PNG or JPEG image .it is a DICOM"):
        decode_raster(dcm)
    with pytest.raises(ImageDecodeError, match="is not a DICOM file .it is a PNG"):
        decode_dicom(png)
    with pytest.raises(ImageDecodeError, match="is not a DICOM file"):
        read_dicom_header(png)


def test_name_labels_in_memory_input() -> None:
    with pytest.raises(ImageDecodeError, match="^upload 17: is empty"):
        load_image(b"", name="upload 17")
    with pytest.raises(ImageDecodeError, match="^in-memory image: is empty"):
        load_image(b"")


def measure(call: Callable[[], object]) -> tuple[BaseException, float, int]:
    """Run ``call``, expecting ImageDecodeError; return it, seconds and peak bytes."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(ImageDecodeError) as info:
            call()
        return info.value, time.perf_counter() - start, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_huge_dicom_is_refused_from_its_header() -> None:
    ds = make_dataset(phantom())
    ds.Rows, ds.Columns = 60_000, 60_000  # the pixel data stays 8 KiB
    data = to_bytes(ds)
    error, seconds, peak = measure(lambda: load_image(data))
    assert f"limit of {MAX_IMAGE_PIXELS:,}" in str(error)
    assert seconds < 1.0 and peak < 5_000_000


# --------------------------------------------------------------------------- PNG / JPEG


def test_png_8_bit_grayscale_is_exact() -> None:
    stored = phantom(8)
    out = load_image(png_bytes(Image.fromarray(stored, "L")))
    np.testing.assert_array_equal(out, stored.astype(np.float32))
    assert_bright_disc(out)


def test_png_16_bit_keeps_its_precision() -> None:
    stored = phantom(16)
    stored[0, :3] = [1, 2, 65535]  # differences below 1/256 of the range
    image = Image.fromarray(stored)
    assert image.mode == "I;16"
    out = load_image(png_bytes(image))
    np.testing.assert_array_equal(out, stored.astype(np.float32))


def test_png_rgb_becomes_luminance() -> None:
    rgb = np.random.default_rng(5).integers(0, 256, (SIZE_PX, SIZE_PX, 3), dtype=np.uint8)
    out = load_image(png_bytes(Image.fromarray(rgb, "RGB")))
    np.testing.assert_allclose(out, pillow_luminance(rgb), atol=0.51)


def test_png_alpha_is_composited_over_black() -> None:
    gray = np.full((4, 4), 200, dtype=np.uint8)
    alpha = np.array([0, 64, 128, 255], dtype=np.uint8)[None, :].repeat(4, axis=0)
    rgba = np.dstack([gray, gray, gray, alpha])
    expected = 200 * alpha.astype(np.float64) / 255
    out_rgba = load_image(png_bytes(Image.fromarray(rgba, "RGBA")))
    np.testing.assert_allclose(out_rgba, expected, atol=0.01)
    out_la = load_image(png_bytes(Image.fromarray(np.dstack([gray, alpha]), "LA")))
    np.testing.assert_allclose(out_la, expected, atol=0.01)


def test_png_palette_with_and_without_transparency() -> None:
    stored = phantom(8)
    palette_image = Image.fromarray(stored, "L").convert("P")
    np.testing.assert_allclose(load_image(png_bytes(palette_image)), stored, atol=0.51)

    background_index = int(np.asarray(palette_image)[0, 0])
    out = load_image(png_bytes(palette_image, transparency=background_index))
    assert out[0, 0] == 0.0  # the transparent background became black
    assert_bright_disc(out)


def test_png_bilevel() -> None:
    mask = disc_mask()
    out = load_image(png_bytes(Image.fromarray(mask).convert("1")))
    assert_bright_disc(out)


@pytest.mark.parametrize("mode", ["L", "RGB", "CMYK"])
def test_jpeg_grayscale_rgb_and_cmyk(mode: str) -> None:
    stored = phantom(8)
    image = Image.fromarray(stored, "L").convert(mode)
    out = load_image(jpeg_bytes(image))
    assert np.abs(out - stored.astype(np.float32)).mean() < 3.0
    assert_bright_disc(out)


def test_jpeg_exif_orientation_is_applied() -> None:
    stored = phantom(8)[:, : SIZE_PX // 2]  # not square, so a rotation shows
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    out = load_image(jpeg_bytes(Image.fromarray(stored, "L"), exif=exif.tobytes()))
    assert out.shape == (stored.shape[1], stored.shape[0])
    expected = np.rot90(stored, k=-1).astype(np.float32)
    assert np.abs(out - expected).mean() < 3.0


@pytest.mark.parametrize(("width", "height"), [(40_000, 40_000), (10_000, 10_000)])
def test_a_png_decompression_bomb_is_refused_without_decoding(width: int, height: int) -> None:
    # 40000² is above twice Pillow's limit (Pillow itself raises); 10000² is between
    # the limit and twice it (Pillow only warns, valve-id refuses).
    data = png_header_only(width, height)
    with pytest.warns(Image.DecompressionBombWarning) if width == 10_000 else nullcontext():
        error, seconds, peak = measure(lambda: decode_raster(data, name="bomb.png"))
    assert str(error).startswith("bomb.png: ") and f"{MAX_IMAGE_PIXELS:,}" in str(error)
    assert seconds < 1.0 and peak < 5_000_000


def test_a_jpeg_decompression_bomb_is_refused_without_decoding() -> None:
    data = bytearray(jpeg_bytes(Image.fromarray(phantom(8), "L")))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", 60_000, 60_000)  # height, width
    error, seconds, peak = measure(lambda: load_image(bytes(data)))
    assert "decompression-bomb" in str(error)
    assert seconds < 1.0 and peak < 5_000_000


# --------------------------------------------------------------------------- header


def test_read_dicom_header_stops_before_the_pixels(tmp_path: Path) -> None:
    ds = make_dataset(phantom())
    path = tmp_path / "x.dcm"
    path.write_bytes(to_bytes(ds))
    for source in (path, to_bytes(ds)):
        header = read_dicom_header(source)
        assert header.SOPInstanceUID == ds.SOPInstanceUID
        assert header.PatientID == PATIENT_ID
        assert "PixelData" not in header


def test_read_dicom_header_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ImageDecodeError, match="is empty"):
        read_dicom_header(b"")
    with pytest.raises(ImageDecodeError, match="cannot be read"):
        read_dicom_header(tmp_path / "missing.dcm")


def test_module_declares_its_public_surface() -> None:
    for name in dicom.__all__:
        assert hasattr(dicom, name)
