"""Turn an X-ray file (DICOM, PNG or JPEG) into a 2-D float32 image with bright bone.

:func:`load_image` is the one entry point: it sniffs the content (not the file name) and
hands DICOM to :func:`decode_dicom`, PNG/JPEG to :func:`decode_raster`. Whatever the
input, the result is float32, 2-D, finite and *bright bone on dark background*, ready
for :func:`training.shared.preprocess.prepare_image` (which scales it; this module does not).

As in pydicom, decoding is kept apart from processing. :func:`decode_dicom` decodes the
first frame's stored values, then :func:`render_grayscale` applies the DICOM grayscale
pipeline (PS3.4 N.2) as pure array steps:

1. **Modality LUT** (PS3.3 C.11.1), :func:`apply_modality_lut`: Rescale Slope/Intercept
   or a Modality LUT Sequence, stored values → modality values.
2. **VOI LUT** (PS3.3 C.11.2), :func:`apply_voi_lut`: the *first* VOI LUT Sequence item,
   else the *first* Window Center/Width pair (LINEAR, LINEAR_EXACT or SIGMOID). The
   stored window is applied when present: it is the contrast the modality chose for
   display, the one a radiologist reads the valve in. Without one the full range of
   modality values is kept.
3. **Polarity**, :func:`should_invert`: MONOCHROME1 (PS3.3 C.7.6.3.1.2, minimum value =
   white *after* the VOI LUT) is inverted once, after step 2. An image's Presentation
   LUT Shape (PS3.3 C.7.6.1 General Image and C.8.11.3 DX Image Modules; INVERSE as
   defined in C.11.6.1.2) must be INVERSE exactly when the image is MONOCHROME1, so the
   two describe the *same* inversion and are never applied one after the other. When
   they disagree the Photometric Interpretation (Type 1, it describes the stored pixels)
   wins and a warning is logged: vendors are known to write wrong shapes (dcm4chee-arc
   issue 3155), and PS3.4 N.2.1.4 lets a presentation *state*, not the image, override
   the polarity.

Colour images (RGB, YBR_* converted to RGB by the decoder, PALETTE COLOR through its
palette) skip steps 1–3, which PS3.3 defines for grayscale only, and become luminance
(ITU-R BT.601 weights). PNG/JPEG carry no photometric information: they are taken as
displayed (bright bone), alpha is composited over black, 16-bit PNG keeps 16 bits.

Only the first frame of a multi-frame DICOM is decoded (pydicom's ``pixel_array(ds,
index=0)``; the rest is never decompressed) and this is logged. Images above
:data:`MAX_IMAGE_PIXELS` are refused from their header, before any pixel is decoded.

Everything that cannot become an image raises :class:`~training.shared.errors.ImageDecodeError`
(or :class:`~training.shared.errors.UnsupportedImageError` for valid files of a kind we cannot
decode) naming the file; the pydicom/Pillow exception is kept as ``__cause__``. No
message or log line contains patient data. :func:`read_dicom_header` reads the header
only (for SOP Instance UID, Patient ID, ...) with the same errors. A change to the image a
file becomes must bump :data:`training.shared.dataset.CACHE_VERSION` (training caches it).
"""

from __future__ import annotations

import copy
import logging
import math
import os
from collections.abc import Sequence
from io import BytesIO
from typing import Literal

import numpy as np
import pydicom
from PIL import Image, ImageOps
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_color_lut, get_decoder, pixel_array
from pydicom.pixels import apply_modality_lut as _pydicom_modality_lut
from pydicom.pixels import apply_voi as _pydicom_voi_lut_sequence
from pydicom.pixels.utils import get_expected_length, get_nr_frames
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from training.shared.errors import ImageDecodeError, UnsupportedImageError

__all__ = [
    "DICOM_MAGIC",
    "DICOM_MAGIC_OFFSET",
    "JPEG_MAGIC",
    "LUMA_WEIGHTS",
    "MAX_IMAGE_PIXELS",
    "PNG_MAGIC",
    "apply_modality_lut",
    "apply_voi_lut",
    "apply_window",
    "decode_dicom",
    "decode_raster",
    "invert_grayscale",
    "load_image",
    "read_dicom_header",
    "render_grayscale",
    "should_invert",
    "to_luminance",
]

logger = logging.getLogger(__name__)

MAX_IMAGE_PIXELS: int = 89_478_485
"""Largest image accepted, in pixels (Rows × Columns of one frame, or width × height).

Pillow's default decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``, about 89 Mpx,
0.25 GiB as 24-bit RGB); applied to DICOM too. A 43 × 43 cm detector at 0.1 mm pixels is
about 18 Mpx, so no real radiograph comes near it.
"""
DICOM_MAGIC: bytes = b"DICM"
"""Marker of the DICOM File Format (PS3.10 7.1), right after the preamble."""
DICOM_MAGIC_OFFSET: int = 128
"""Byte offset of :data:`DICOM_MAGIC`: it follows the 128-byte preamble."""
PNG_MAGIC: bytes = b"\x89PNG\r\n\x1a\n"
"""The 8-byte PNG signature."""
JPEG_MAGIC: bytes = b"\xff\xd8\xff"
"""Start-of-image marker followed by the first marker's 0xFF (JFIF, Exif, raw JPEG)."""
LUMA_WEIGHTS: tuple[float, float, float] = (0.299, 0.587, 0.114)
"""R, G, B weights of luminance (ITU-R BT.601, as in Pillow's "L" and JPEG's YCbCr)."""

_SNIFF_BYTES = 132
"""Bytes read to recognise a format: preamble plus :data:`DICOM_MAGIC`."""
_BARE_DICOM_GROUPS = (b"\x02\x00", b"\x08\x00", b"\x00\x02", b"\x00\x08")
"""First tag group (little or big endian) of a DICOM stream without preamble: the file
meta group 0x0002, or group 0x0008 when the meta information is missing too."""
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")
_COLOUR = (
    "RGB",
    "YBR_FULL",
    "YBR_FULL_422",
    "YBR_ICT",
    "YBR_RCT",
    "YBR_PARTIAL_420",
    "YBR_PARTIAL_422",
)
_PILLOW_FORMATS = ("PNG", "JPEG", "MPO")
"""Pillow plugins we let open a file (MPO: multi-picture JPEG from cameras)."""
_HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
"""Pillow modes of one channel deeper than 8 bits, kept at full precision."""
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")

_Kind = Literal["dicom", "png", "jpeg"]
Source = str | os.PathLike[str] | bytes


# --------------------------------------------------------------------------- entry point


def load_image(source: Source, *, name: str | None = None) -> np.ndarray:
    """Decode a DICOM, PNG or JPEG (a path or its bytes) to float32 2-D, bright bone.

    The format is recognised from the content: DICOM by "DICM" at byte 128, or without
    preamble by its first tag group; PNG and JPEG by their signatures. ``name`` labels
    the input in error messages (default: the path, or "in-memory image").
    """
    label = _label(source, name)
    kind = _sniff(_read_head(source, label))
    if kind == "dicom":
        return decode_dicom(source, name=label)
    if kind in ("png", "jpeg"):
        return decode_raster(source, name=label)
    raise ImageDecodeError("is neither a DICOM file nor a PNG or JPEG image", label)


# --------------------------------------------------------------------------- DICOM


def read_dicom_header(source: Source, *, name: str | None = None) -> Dataset:
    """Read a DICOM file's elements up to, not including, the pixel data.

    For the importer (SOP Instance UID, Patient ID, ...): cheap even for huge files.
    Raises :class:`ImageDecodeError` for anything that is not a readable DICOM file.
    """
    label = _label(source, name)
    return _read_dicom(source, label, stop_before_pixels=True)


def decode_dicom(source: Dataset | Source, *, name: str | None = None) -> np.ndarray:
    """Decode the first frame of a DICOM image to float32 2-D with bright bone.

    ``source`` is a path, the file's bytes, or a :class:`pydicom.dataset.Dataset` read
    with its pixel data (it is not modified). Steps: see the module docstring.
    """
    label = _label(source, name)
    if isinstance(source, Dataset):
        ds = source
    else:
        ds = _read_dicom(source, label, stop_before_pixels=False)
    try:
        decodable = _check_image_header(ds, label)
        frame = _decode_first_frame(decodable, label)
        image = render_grayscale(frame, decodable)
    except ImageDecodeError:
        raise
    except Exception as exc:
        raise ImageDecodeError(
            "DICOM image attributes are damaged or inconsistent; it cannot be decoded", label
        ) from exc
    return _finite_float32(image, label)


def _read_dicom(source: Source, label: str, *, stop_before_pixels: bool) -> Dataset:
    kind = _sniff(_read_head(source, label))
    if kind != "dicom":
        found = f" (it is a {kind.upper()} image)" if kind else ""
        raise ImageDecodeError(f"is not a DICOM file{found}", label)
    try:
        return pydicom.dcmread(
            _open_source(source), force=True, stop_before_pixels=stop_before_pixels
        )
    except Exception as exc:
        raise ImageDecodeError(
            "is not a readable DICOM file: its header is damaged or truncated", label
        ) from exc


def _check_image_header(ds: Dataset, label: str) -> Dataset:
    """Refuse what cannot or must not be decoded, from the header alone.

    Returns ``ds``, or a shallow copy with a Transfer Syntax UID where the file had no
    meta information (pydicom needs one to pick a decoder).
    """
    pixel_keyword = next((k for k in _PIXEL_KEYWORDS if k in ds), None)
    if pixel_keyword is None:
        sop_class = ds.get("SOPClassUID")
        if sop_class and "Rows" not in ds:
            kind = UID(str(sop_class)).name
            raise ImageDecodeError(
                f"contains no image: there is no Pixel Data (a {kind} object)", label
            )
        raise ImageDecodeError(
            "contains no Pixel Data: the file is truncated, or it is not an image", label
        )

    rows, columns = _int_or_zero(ds, "Rows"), _int_or_zero(ds, "Columns")
    if rows <= 0 or columns <= 0:
        raise ImageDecodeError(
            f"has an empty image: Rows={rows}, Columns={columns} in the DICOM header", label
        )
    if rows * columns > MAX_IMAGE_PIXELS:
        raise ImageDecodeError(
            f"claims {columns} × {rows} = {rows * columns:,} pixels, more than the limit "
            f"of {MAX_IMAGE_PIXELS:,} (a decompression-bomb guard); refusing to decode it",
            label,
        )

    samples = _int_or_zero(ds, "SamplesPerPixel") or 1
    photometric = _photometric(ds)
    if samples not in (1, 3):
        raise UnsupportedImageError(
            f"has {samples} samples per pixel; only grayscale (1) and colour (3) are supported",
            label,
        )
    known = (*_GRAYSCALE, "PALETTE COLOR") if samples == 1 else _COLOUR
    if photometric not in known:
        raise UnsupportedImageError(
            f"has Photometric Interpretation {photometric or 'missing'!r} with {samples} "
            f"sample(s) per pixel, which valve-id cannot render",
            label,
        )
    if "BitsAllocated" not in ds:
        raise ImageDecodeError("lacks Bits Allocated, so its pixels cannot be read", label)

    tsyntax = _transfer_syntax(ds)
    if tsyntax is None:
        raise ImageDecodeError("has no Transfer Syntax UID, so its pixels cannot be read", label)
    described = tsyntax if tsyntax.name == str(tsyntax) else f"{tsyntax.name} ({tsyntax})"
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError as exc:
        raise UnsupportedImageError(
            f"uses transfer syntax {described}, which valve-id cannot decode; "
            "re-export it uncompressed or as JPEG/JPEG-LS/JPEG 2000/RLE",
            label,
        ) from exc
    if not decoder.is_available:
        raise UnsupportedImageError(
            f"uses {described}, but no decoder for it is installed "
            f"({'; '.join(decoder.missing_dependencies)})",
            label,
        )

    if not tsyntax.is_encapsulated:
        expected, actual = get_expected_length(ds, "bytes"), len(ds[pixel_keyword].value)
        if actual < expected:
            raise ImageDecodeError(
                f"has {actual:,} bytes of pixel data where its header needs {expected:,}: "
                "the file is truncated or its header is wrong",
                label,
            )

    file_meta = getattr(ds, "file_meta", None)
    if file_meta is not None and file_meta.get("TransferSyntaxUID"):
        return ds
    patched = copy.copy(ds)  # shares the elements; only the file meta is replaced
    patched.file_meta = FileMetaDataset()
    patched.file_meta.TransferSyntaxUID = tsyntax
    return patched


def _decode_first_frame(ds: Dataset, label: str) -> np.ndarray:
    """Decode frame 0 only; pydicom's ``index=0`` leaves the other frames compressed."""
    frames = get_nr_frames(ds, warn=False)
    if frames > 1:
        logger.info("%s: multi-frame image with %d frames, using the first only", label, frames)
    tsyntax = ds.file_meta.TransferSyntaxUID
    try:
        return pixel_array(ds, index=0)
    except Exception as exc:
        raise ImageDecodeError(
            f"its {UID(tsyntax).name} pixel data could not be decoded: "
            "the data is corrupt or truncated",
            label,
        ) from exc


def _transfer_syntax(ds: Dataset) -> UID | None:
    """The dataset's Transfer Syntax UID, or the one its encoding implies when it has no
    file meta information (then the pixel data is necessarily uncompressed)."""
    file_meta = getattr(ds, "file_meta", None)
    if file_meta is not None and (uid := file_meta.get("TransferSyntaxUID")):
        return UID(str(uid))
    implicit, little = ds.original_encoding
    if little is False:
        return ExplicitVRBigEndian
    if implicit is True:
        return ImplicitVRLittleEndian
    if implicit is False or little is True:
        return ExplicitVRLittleEndian
    return None


# --------------------------------------------------------------------------- pure steps


def render_grayscale(frame: np.ndarray, ds: Dataset) -> np.ndarray:
    """One decoded frame (as pydicom returns it: YBR already RGB) → 2-D, bright bone.

    Grayscale: modality LUT, VOI LUT/window, then MONOCHROME1 inversion (PS3.4 N.2).
    Colour: luminance (PALETTE COLOR through its palette first, PS3.3 C.7.6.3.1.5).
    """
    photometric = _photometric(ds)
    if photometric == "PALETTE COLOR":
        return to_luminance(apply_color_lut(frame, ds))
    if frame.ndim == 3:
        return to_luminance(frame)
    values = apply_voi_lut(apply_modality_lut(frame, ds), ds)
    return invert_grayscale(values) if should_invert(ds) else values


def apply_modality_lut(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """Stored values → modality values, float64 (PS3.3 C.11.1).

    A Modality LUT Sequence (through pydicom's ``apply_modality_lut``) wins over Rescale
    Slope/Intercept; a missing slope counts as 1 and a missing intercept as 0. An unusable
    modality LUT (zero slope, broken LUT) is skipped with a warning: the anatomy stays
    visible, only the value scale is off, and the scale is normalised downstream anyway.
    """
    if ds.get("ModalityLUTSequence"):
        try:
            return np.asarray(_pydicom_modality_lut(arr, ds), dtype=np.float64)
        except Exception:
            logger.warning("unusable Modality LUT Sequence ignored")
            return arr.astype(np.float64)
    values = arr.astype(np.float64)
    slope = _first_number(ds, "RescaleSlope")
    intercept = _first_number(ds, "RescaleIntercept")
    if slope == 0.0:
        logger.warning("Rescale Slope of 0 ignored")
        slope = None
    if slope is not None and slope != 1.0:
        values *= slope
    if intercept:
        values += intercept
    return values


def apply_voi_lut(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """Modality values → display values with the *first* stored VOI transform (PS3.3 C.11.2).

    The first VOI LUT Sequence item (pydicom's ``apply_voi``, ``index=0``) wins over the
    first Window Center/Width pair (:func:`apply_window`), as in pydicom's ``apply_voi_lut``.
    Without either, or with an unusable one (warning), the values pass unchanged: the full
    modality range.
    """
    if ds.get("VOILUTSequence"):
        try:
            return _apply_voi_lut_sequence(arr, ds)
        except Exception:
            logger.warning("unusable VOI LUT Sequence ignored")
    center = _first_number(ds, "WindowCenter")
    width = _first_number(ds, "WindowWidth")
    if center is None or width is None:
        return arr
    function = str(ds.get("VOILUTFunction") or "LINEAR").strip().upper()
    try:
        return apply_window(arr, center, width, function)
    except ValueError as exc:
        logger.warning("stored window ignored: %s", exc)
        return arr


def _apply_voi_lut_sequence(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    item = ds.VOILUTSequence[0]
    entries, first_mapped = int(item.LUTDescriptor[0]) or 2**16, int(item.LUTDescriptor[1])
    # The LUT is indexed by integer modality values; clipping to the mapped range here
    # (C.11.2.1.1: values below/above map to the first/last entry) also keeps pydicom's
    # unsigned index arithmetic from wrapping around.
    indices = np.clip(np.rint(arr), first_mapped, first_mapped + entries - 1).astype(np.int64)
    return np.asarray(_pydicom_voi_lut_sequence(indices, ds, index=0), dtype=np.float64)


def apply_window(
    arr: np.ndarray, center: float, width: float, function: str = "LINEAR"
) -> np.ndarray:
    """Window Center/Width → display values in [0, 1], float64 (PS3.3 C.11.2.1.2–3).

    ``function`` is the VOI LUT Function: LINEAR (C.11.2.1.2.1, the default),
    LINEAR_EXACT (C.11.2.1.3.2) or SIGMOID (C.11.2.1.3.1). The output range is [0, 1]
    rather than the standard's bit depth, because only the shape of the curve matters
    before :func:`training.shared.preprocess.prepare_image` rescales. Raises ``ValueError`` for
    a width the standard forbids (< 1 for LINEAR, <= 0 otherwise) or an unknown function.
    """
    x = np.asarray(arr, dtype=np.float64)
    if not (math.isfinite(center) and math.isfinite(width)):
        raise ValueError(f"window center/width must be finite, got {center}/{width}")
    if function == "LINEAR":
        if width < 1:
            raise ValueError(f"LINEAR window width must be >= 1, got {width}")
        # Below ``low`` → 0, above ``low + width - 1`` → 1, linear in between.
        low, span = center - 0.5 - (width - 1) / 2, width - 1
        if span == 0:  # width 1: a threshold at center - 0.5
            return (x > low).astype(np.float64)
        return np.clip((x - low) / span, 0.0, 1.0)
    if width <= 0:
        raise ValueError(f"{function} window width must be > 0, got {width}")
    if function == "LINEAR_EXACT":
        return np.clip((x - (center - width / 2)) / width, 0.0, 1.0)
    if function == "SIGMOID":
        with np.errstate(over="ignore"):
            return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    raise ValueError(f"unknown VOI LUT Function {function!r}")


def should_invert(ds: Dataset) -> bool:
    """Whether the VOI output must be inverted to show high values white: MONOCHROME1.

    MONOCHROME1 displays the minimum value as white after the VOI LUT (PS3.3
    C.7.6.3.1.2). In an image, Presentation LUT Shape INVERSE (C.11.6.1.2) is the same
    statement: C.7.6.1 and C.8.11.3 require INVERSE for MONOCHROME1 and IDENTITY for
    MONOCHROME2, so both together still mean one inversion. If they contradict each
    other, the Photometric Interpretation decides and a warning says so.
    """
    inverted = _photometric(ds) == "MONOCHROME1"
    shape = str(ds.get("PresentationLUTShape") or "").strip().upper()
    if shape in ("INVERSE", "IDENTITY") and (shape == "INVERSE") != inverted:
        logger.warning(
            "Presentation LUT Shape %s contradicts Photometric Interpretation %s; "
            "following the Photometric Interpretation",
            shape,
            _photometric(ds),
        )
    return inverted


def invert_grayscale(arr: np.ndarray) -> np.ndarray:
    """Swap dark and bright within the image's own range: ``max + min - x``."""
    values = np.asarray(arr, dtype=np.float64)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return values
    return float(finite.max()) + float(finite.min()) - values


def to_luminance(rgb: np.ndarray) -> np.ndarray:
    """(…, 3) or (…, 4) colour → luminance with :data:`LUMA_WEIGHTS`, float32 (alpha ignored)."""
    r, g, b = LUMA_WEIGHTS
    out = rgb[..., 0].astype(np.float32) * np.float32(r)
    out += rgb[..., 1].astype(np.float32) * np.float32(g)
    out += rgb[..., 2].astype(np.float32) * np.float32(b)
    return out


# --------------------------------------------------------------------------- PNG / JPEG


def decode_raster(source: Source, *, name: str | None = None) -> np.ndarray:
    """Decode a PNG or JPEG (path or bytes) with Pillow to float32 2-D, as displayed.

    No photometric information exists, so the image is taken as displayed (bright bone).
    16-bit grayscale keeps its precision; colour becomes luminance; alpha is composited
    over black; EXIF orientation is applied. Pillow's decompression-bomb check stays on,
    and anything above :data:`MAX_IMAGE_PIXELS` is refused before decoding.
    """
    label = _label(source, name)
    kind = _sniff(_read_head(source, label))
    if kind not in ("png", "jpeg"):
        found = " (it is a DICOM file)" if kind == "dicom" else ""
        raise ImageDecodeError(f"is not a PNG or JPEG image{found}", label)
    fmt = kind.upper()
    try:
        with Image.open(_open_source(source), formats=_PILLOW_FORMATS) as im:
            width, height = im.size
            _check_raster_size(width, height, label)
            return _finite_float32(_raster_to_gray(ImageOps.exif_transpose(im)), label)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(
            f"is a {fmt} whose header claims more pixels than the limit of "
            f"{MAX_IMAGE_PIXELS:,} (a decompression-bomb guard); refusing to decode it",
            label,
        ) from exc
    except Exception as exc:
        raise ImageDecodeError(
            f"{fmt} data could not be decoded: the file is truncated or damaged", label
        ) from exc


def _check_raster_size(width: int, height: int, label: str) -> None:
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"has an empty image ({width} × {height} pixels)", label)
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageDecodeError(
            f"claims {width} × {height} = {width * height:,} pixels, more than the limit of "
            f"{MAX_IMAGE_PIXELS:,} (a decompression-bomb guard); refusing to decode it",
            label,
        )


def _raster_to_gray(im: Image.Image) -> np.ndarray:
    """Any Pillow mode → 2-D float32; alpha composited over black (background dark)."""
    has_alpha = im.mode in _ALPHA_MODES or "transparency" in im.info
    if im.mode in _HIGH_DEPTH_MODES and not has_alpha:
        return np.asarray(im).astype(np.float32)
    if im.mode in ("L", "1") and not has_alpha:
        return np.asarray(im.convert("L"), dtype=np.float32)
    target = "RGBA" if has_alpha else "RGB"
    pixels = np.asarray(im if im.mode == target else im.convert(target))
    gray = to_luminance(pixels)
    if has_alpha:
        gray *= pixels[..., 3].astype(np.float32) / np.float32(255)
    return gray


# --------------------------------------------------------------------------- helpers


def _label(source: Dataset | Source, name: str | None) -> str:
    """How an input is named in messages: ``name``, else its path."""
    if name:
        return name
    if isinstance(source, Dataset):
        return "DICOM dataset"
    if isinstance(source, bytes):
        return "in-memory image"
    return os.fspath(source)


def _open_source(source: Source) -> BytesIO | str:
    """What pydicom and Pillow open: a file-like over bytes, or the path."""
    return BytesIO(source) if isinstance(source, bytes) else os.fspath(source)


def _read_head(source: Source, label: str) -> bytes:
    """The first bytes, enough to recognise the format; empty or unreadable input raises."""
    if isinstance(source, bytes):
        head = source[:_SNIFF_BYTES]
    else:
        try:
            with open(os.fspath(source), "rb") as f:
                head = f.read(_SNIFF_BYTES)
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise ImageDecodeError(f"cannot be read: {reason}", label) from exc
    if not head:
        raise ImageDecodeError("is empty (0 bytes)", label)
    return head


def _sniff(head: bytes) -> _Kind | None:
    """Recognise DICOM, PNG or JPEG from the first :data:`_SNIFF_BYTES` bytes."""
    if head[DICOM_MAGIC_OFFSET : DICOM_MAGIC_OFFSET + len(DICOM_MAGIC)] == DICOM_MAGIC:
        return "dicom"
    if head.startswith(PNG_MAGIC):
        return "png"
    if head.startswith(JPEG_MAGIC):
        return "jpeg"
    if len(head) >= 8 and head[:2] in _BARE_DICOM_GROUPS:
        return "dicom"
    return None


def _photometric(ds: Dataset) -> str:
    return str(ds.get("PhotometricInterpretation") or "").strip().upper()


def _int_or_zero(ds: Dataset, keyword: str) -> int:
    value = ds.get(keyword)
    try:
        return int(value) if value not in (None, "") else 0
    except (TypeError, ValueError):
        return 0


def _first_number(ds: Dataset, keyword: str) -> float | None:
    """First value of a numeric (possibly multi-valued) element; None if absent/invalid."""
    value = ds.get(keyword)
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        value = value[0] if len(value) else None
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        logger.warning("%s is not a number; ignored", keyword)
        return None
    return number if math.isfinite(number) else None


def _finite_float32(image: np.ndarray, label: str) -> np.ndarray:
    """The output contract: float32, 2-D, finite (NaN/inf → the nearest finite extreme)."""
    out = np.asarray(image, dtype=np.float32)
    if out.ndim != 2:
        raise ImageDecodeError(f"decoded to shape {out.shape}, not a 2-D image", label)
    finite = np.isfinite(out)
    if not finite.all():
        if not finite.any():
            raise ImageDecodeError("has no finite pixel values", label)
        lo, hi = float(out[finite].min()), float(out[finite].max())
        out = np.nan_to_num(out, nan=lo, posinf=hi, neginf=lo)
    return np.ascontiguousarray(out)
