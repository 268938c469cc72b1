"""The synthetic data set on disk: patients, DICOM files and ``manifest.csv``.

:func:`generate_dataset` splits the requested class mix into patients (one to several
images each, as in the paper), renders each image with
:func:`training.synthetic.xray.render_xray`, and writes it as a CR or DX DICOM file whose
encoding (photometric interpretation, bits stored, transfer syntax, rescale) is drawn
independently of the class. Patient data are fake but realistic (names, IDs, dates,
accession numbers, institutions) so that de-identification can be tested on them. The
manifest records what was drawn: class, patient, valve box and centre, and the pressure
setting (``valve_setting``: a ``<Choice>`` value of the model's scale; empty for "Other
valve").
Everything derives from the seed: UIDs from :func:`pydicom.uid.generate_uid` with seeded
entropy, dates from the random generator, never the clock.
"""

from __future__ import annotations

import csv
import datetime as dt
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import get_encoder
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)

from training.shared.dataset import MANIFEST_NAME
from training.shared.errors import DatasetError
from training.shared.parallel import ordered_map
from training.synthetic.valves import DRAWABLE_CLASSES, OTHER_VALVE, VALVE_CLASSES
from training.synthetic.xray import (
    DEFAULT_SIZE_RANGE_PX,
    PatientTraits,
    check_size_range,
    draw_patient_traits,
    render_xray,
)

__all__ = [
    "BALANCED_CLASS_MIX",
    "IMAGES_DIRNAME",
    "PAPER_CLASS_COUNTS",
    "PAPER_CLASS_MIX",
    "Patient",
    "Study",
    "allocate_class_counts",
    "generate_dataset",
    "plan_patients",
]

logger = logging.getLogger(__name__)

PAPER_CLASS_COUNTS: Mapping[str, int] = MappingProxyType(
    {"Codman Hakim": 774, "Codman Certas Plus": 117, "Sophysa Sophy SM8": 35, "proGAV 2.0": 33}
)
"""Images per class in the paper's final dataset (959 images, Table 1)."""

PAPER_CLASS_MIX: Mapping[str, float] = MappingProxyType(
    {name: count / sum(PAPER_CLASS_COUNTS.values()) for name, count in PAPER_CLASS_COUNTS.items()}
)
"""The paper's class proportions (81 / 12 / 4 / 3 %), the default mix."""

BALANCED_CLASS_MIX: Mapping[str, float] = MappingProxyType(
    {name: 1.0 / len(VALVE_CLASSES) for name in VALVE_CLASSES}
)
"""Equal proportions, for checks that need every class well represented."""

IMAGES_DIRNAME = "images"
"""Sub-folder of the output directory holding the DICOM files."""

_MEAN_IMAGES_PER_MULTI_PATIENT = 3.1
"""Mean images of a patient with more than one (paper: 659 images / 212 patients)."""
_SINGLE_IMAGE_PATIENT_FRACTION = 0.586
"""Fraction of patients with one image only (paper: 300 of 512)."""
_SAME_VISIT_PROBABILITY = 0.4
"""Probability that a patient's next image is a second view of the same study."""

_STUDY_PERIOD = (dt.date(2008, 5, 1), dt.date(2022, 11, 30))
"""Study dates fall in the paper's acquisition period."""
_AGE_YEARS = (47.0, 22.5)
"""Mean and standard deviation of the age at the first study (paper: 47 ± 22.5 years)."""
_FEMALE_FRACTION = 0.533
"""Fraction of female patients (paper: 53.3 %)."""

_TRANSFER_SYNTAX_WEIGHTS = {"native": 0.5, "rle": 0.3, "j2k": 0.2}
"""How often each encoding is used (identical for every class)."""
_MONOCHROME1_PROBABILITY = 0.4
"""Fraction of images stored inverted (MONOCHROME1), as many CR systems do."""
_BITS12_PROBABILITY = 0.5
"""Fraction of images with 12 of 16 bits stored (the rest use all 16)."""
_NONTRIVIAL_RESCALE_PROBABILITY = 0.3
"""Fraction of CR images with a rescale slope/intercept other than 1/0."""
_CR_PROBABILITY = 0.6
"""Fraction of Computed Radiography images; the rest are Digital X-Ray (for presentation)."""

_UID_ROOT = "valve-id synthetic"
"""First entropy source of every UID, so synthetic UIDs never collide with other tools'."""
_CR_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1"
"""Computed Radiography Image Storage."""
_DX_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1.1"
"""Digital X-Ray Image Storage - For Presentation."""

_FAMILY_NAMES = (
    "Müller", "Schmidt", "Schneider", "Fischer", "Weber", "Meyer", "Wagner", "Becker",
    "Hoffmann", "Schäfer", "Koch", "Richter", "Klein", "Wolf", "Neumann", "Schwarz",
    "Yilmaz", "Kaya", "Nowak", "Kowalski", "Rossi", "Bianchi", "Garcia", "Martin",
    "Smith", "Jones", "Brown", "Dubois", "Jansen", "Novak", "Ivanova", "Popescu",
)  # fmt: skip
_GIVEN_NAMES_FEMALE = (
    "Anna", "Maria", "Ursula", "Monika", "Petra", "Sabine", "Julia", "Laura", "Lena",
    "Sophie", "Emine", "Zeynep", "Agnieszka", "Giulia", "Elena", "Claire", "Emma", "Olga",
)  # fmt: skip
_GIVEN_NAMES_MALE = (
    "Peter", "Michael", "Thomas", "Andreas", "Stefan", "Jürgen", "Klaus", "Lukas", "Jonas",
    "Felix", "Mehmet", "Ahmet", "Piotr", "Marco", "Luca", "Pierre", "James", "Ivan",
)  # fmt: skip
_INSTITUTIONS = (
    "Synthetic University Hospital",
    "Klinikum Nordstadt (synthetic)",
    "St. Elsewhere Medical Centre",
    "Marienhospital Süd (synthetic)",
)
_STUDY_DESCRIPTIONS = ("SKULL 2 VIEWS", "Schädel 2 Ebenen", "SHUNT VALVE CHECK", "XR SKULL")


def _normalise_mix(class_mix: Mapping[str, float] | None) -> dict[str, float]:
    """Proportions of the four models, then of "Other valve" only if the mix names it (so a
    mix of the four, the default included, allocates and renders exactly as before)."""
    mix = dict(PAPER_CLASS_MIX if class_mix is None else class_mix)
    unknown = sorted(set(mix) - set(DRAWABLE_CLASSES))
    if unknown:
        raise ValueError(f"class_mix names classes this generator cannot draw: {unknown}")
    if any(not math.isfinite(p) or p < 0 for p in mix.values()):
        raise ValueError("class_mix proportions must be finite and non-negative")
    total = sum(mix.values())
    if total <= 0:
        raise ValueError("class_mix needs at least one positive proportion")
    names = DRAWABLE_CLASSES if OTHER_VALVE in mix else VALVE_CLASSES
    return {name: mix.get(name, 0.0) / total for name in names}


def allocate_class_counts(n: int, class_mix: Mapping[str, float] | None = None) -> dict[str, int]:
    """Images per class for ``n`` images: largest-remainder rounding, ties in class order.

    Deterministic and exact: the paper's mix with ``n=959`` gives the paper's counts. The
    result has the four models, plus "Other valve" when ``class_mix`` names it.
    """
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    mix = _normalise_mix(class_mix)
    exact = {name: n * p for name, p in mix.items()}
    counts = {name: math.floor(value) for name, value in exact.items()}
    left = n - sum(counts.values())
    order = sorted(counts, key=lambda c: (-(exact[c] - counts[c]), DRAWABLE_CLASSES.index(c)))
    for name in order[:left]:
        counts[name] += 1
    return counts


def _images_per_patient(rng: np.random.Generator) -> int:
    """1 image for ~59 % of patients, otherwise 2 + Poisson: mean ≈ 1.87 as in the paper."""
    if rng.random() < _SINGLE_IMAGE_PATIENT_FRACTION:
        return 1
    return 2 + int(rng.poisson(_MEAN_IMAGES_PER_MULTI_PATIENT - 2.0))


@dataclass(frozen=True)
class Study:
    """One imaging visit; a patient's second view on the same day shares it."""

    date: dt.date
    time: str  # DICOM TM, HHMMSS
    key: int  # index of the study within the patient (same-visit images share it)
    accession: str
    institution: str
    referring: str  # DICOM PN of the referring physician
    description: str


@dataclass(frozen=True)
class Patient:
    """A synthetic patient: one valve model, one head, one (fake) identity."""

    index: int
    label: str
    patient_id: str
    name: str
    sex: str
    birth_date: dt.date
    traits: PatientTraits
    studies: tuple[Study, ...]  # one per image, in image order


def _person_name(rng: np.random.Generator, sex: str) -> str:
    """A DICOM PN "Family^Given" from the built-in lists."""
    givens = _GIVEN_NAMES_FEMALE if sex == "F" else _GIVEN_NAMES_MALE
    family = _FAMILY_NAMES[int(rng.integers(len(_FAMILY_NAMES)))]
    return f"{family}^{givens[int(rng.integers(len(givens)))]}"


def plan_patients(seed: int, counts: Mapping[str, int]) -> list[Patient]:
    """Split each class's image count into patients and give every patient a history.

    Patient sizes follow the paper (1.87 images per patient, 41 % with several); the
    patients come out in a shuffled order so their index and ID say nothing of the class.
    """
    plan_rng = np.random.default_rng([seed, 1])
    sizes: list[tuple[str, int]] = []
    for label in DRAWABLE_CLASSES:
        left = counts.get(label, 0)
        while left > 0:
            k = min(left, _images_per_patient(plan_rng))
            sizes.append((label, k))
            left -= k
    order = plan_rng.permutation(len(sizes))  # patient ids must not follow the class

    used_ids: set[str] = set()
    used_accessions: set[str] = set()
    patients = []
    period_days = (_STUDY_PERIOD[1] - _STUDY_PERIOD[0]).days
    for index, pos in enumerate(order):
        label, k = sizes[int(pos)]
        rng = np.random.default_rng([seed, 2, index])
        patient_id = f"{int(rng.integers(10_000_000, 100_000_000))}"
        while patient_id in used_ids:
            patient_id = f"{int(rng.integers(10_000_000, 100_000_000))}"
        used_ids.add(patient_id)
        sex = "F" if rng.random() < _FEMALE_FRACTION else "M"
        gaps = [0] + [
            0 if rng.random() < _SAME_VISIT_PROBABILITY else int(rng.integers(30, 900))
            for _ in range(k - 1)
        ]
        span = min(sum(gaps), period_days)
        first = _STUDY_PERIOD[0] + dt.timedelta(days=int(rng.integers(0, period_days - span + 1)))
        age_years = float(np.clip(rng.normal(*_AGE_YEARS), 1.0, 95.0))
        birth = first - dt.timedelta(days=int(age_years * 365.25))
        studies = []
        day, key = first, -1
        study: Study | None = None
        for gap in gaps:
            if study is None or gap > 0:
                day = min(day + dt.timedelta(days=gap), _STUDY_PERIOD[1])
                key += 1
                accession = f"{int(rng.integers(10**9, 10**10))}"
                while accession in used_accessions:
                    accession = f"{int(rng.integers(10**9, 10**10))}"
                used_accessions.add(accession)
                seconds = int(rng.integers(7 * 3600, 19 * 3600))
                study = Study(
                    date=day,
                    time=f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}",
                    key=key,
                    accession=accession,
                    institution=_INSTITUTIONS[int(rng.integers(len(_INSTITUTIONS)))],
                    referring=_person_name(rng, "F" if rng.random() < 0.5 else "M"),
                    description=_STUDY_DESCRIPTIONS[int(rng.integers(len(_STUDY_DESCRIPTIONS)))],
                )
            studies.append(study)
        patients.append(
            Patient(
                index=index,
                label=label,
                patient_id=patient_id,
                name=_person_name(rng, sex),
                sex=sex,
                birth_date=birth,
                traits=draw_patient_traits(rng),
                studies=tuple(studies),
            )
        )
    return patients


def _uid(seed: int, n: int, *parts: object) -> str:
    """A UID that depends only on the seed, n and ``parts`` (no clock, no randomness)."""
    return str(generate_uid(entropy_srcs=[_UID_ROOT, str(seed), str(n), *map(str, parts)]))


def _age_string(birth: dt.date, on: dt.date) -> str:
    years = on.year - birth.year - ((on.month, on.day) < (birth.month, birth.day))
    return f"{max(0, years):03d}Y"


@dataclass(frozen=True)
class _Encoding:
    modality: str
    photometric: str
    bits_stored: int
    transfer_syntax: str
    slope: float
    intercept: float
    dynamic_range: float  # fraction of the code range used


def _draw_encoding(rng: np.random.Generator) -> _Encoding:
    """DICOM nuisance properties, drawn identically for every class."""
    modality = "CR" if rng.random() < _CR_PROBABILITY else "DX"
    photometric = "MONOCHROME1" if rng.random() < _MONOCHROME1_PROBABILITY else "MONOCHROME2"
    bits = 12 if rng.random() < _BITS12_PROBABILITY else 16
    names = list(_TRANSFER_SYNTAX_WEIGHTS)
    weights = np.array([_TRANSFER_SYNTAX_WEIGHTS[k] for k in names])
    choice = names[int(rng.choice(len(names), p=weights / weights.sum()))]
    syntax = {"native": ExplicitVRLittleEndian, "rle": RLELossless, "j2k": JPEG2000Lossless}[choice]
    if syntax == JPEG2000Lossless and not get_encoder(JPEG2000Lossless).is_available:
        syntax = RLELossless  # pylibjpeg-openjpeg missing: keep the file compressed anyway
    slope, intercept = 1.0, 0.0
    if modality == "CR" and rng.random() < _NONTRIVIAL_RESCALE_PROBABILITY:
        slope = float(rng.choice([0.5, 1.5, 2.0]))
        intercept = float(rng.choice([-1024.0, -100.0, 0.0, 100.0]))
    return _Encoding(
        modality=modality,
        photometric=photometric,
        bits_stored=bits,
        transfer_syntax=str(syntax),
        slope=slope,
        intercept=intercept,
        dynamic_range=float(rng.uniform(0.7, 1.0)),
    )


def _format_ds(value: float) -> str:
    """A Decimal String without exponent noise (≤ 16 characters)."""
    text = f"{value:.4f}".rstrip("0").rstrip(".")
    return text if text not in ("", "-0") else "0"


def _build_dicom(
    image: np.ndarray,
    info: Mapping[str, Any],
    patient: Patient,
    study: Study,
    image_number: int,
    index: int,
    seed: int,
    n: int,
    encoding: _Encoding,
    rng: np.random.Generator,
) -> Dataset:
    """A complete single-frame CR/DX dataset holding ``image`` (bright bone in [0, 1])."""
    max_code = (1 << encoding.bits_stored) - 1
    codes = np.rint(image * (max_code * encoding.dynamic_range)).astype(np.int64)
    if encoding.photometric == "MONOCHROME1":
        codes = max_code - codes  # stored dark-bone; the black border becomes max_code
    stored = codes.astype(np.uint16)

    sop_class = _CR_SOP_CLASS if encoding.modality == "CR" else _DX_SOP_CLASS
    sop_uid = _uid(seed, n, "image", index)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["DERIVED", "PRIMARY"] if encoding.modality == "DX" else ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    date = study.date.strftime("%Y%m%d")
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = study.time
    ds.AccessionNumber = study.accession
    ds.Modality = encoding.modality
    ds.Manufacturer = "valve-id synthetic"
    ds.InstitutionName = study.institution
    ds.ReferringPhysicianName = study.referring
    ds.StationName = f"XR{int(rng.integers(1, 9))}"
    ds.StudyDescription = study.description
    ds.SeriesDescription = "Skull lateral" if info["view"] == "lateral" else "Skull AP"
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = patient.birth_date.strftime("%Y%m%d")
    ds.PatientSex = patient.sex
    ds.PatientAge = _age_string(patient.birth_date, study.date)
    ds.BodyPartExamined = "SKULL"
    ds.ViewPosition = ("LL" if rng.random() < 0.5 else "RL") if info["view"] == "lateral" else "AP"
    ds.StudyInstanceUID = _uid(seed, n, "study", patient.index, study.key)
    ds.SeriesInstanceUID = _uid(seed, n, "series", index)
    ds.StudyID = study.accession[-6:]
    ds.SeriesNumber = 1 + image_number
    ds.InstanceNumber = 1
    ds.PatientOrientation = ["A", "F"] if info["view"] == "lateral" else ["L", "F"]
    spacing = _format_ds(rng.uniform(240.0, 300.0) / max(image.shape))
    ds.ImagerPixelSpacing = [spacing, spacing]
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    if encoding.modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.PresentationLUTShape = "INVERSE" if encoding.photometric == "MONOCHROME1" else "IDENTITY"

    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = encoding.photometric
    ds.Rows, ds.Columns = image.shape
    ds.BitsAllocated = 16
    ds.BitsStored = encoding.bits_stored
    ds.HighBit = encoding.bits_stored - 1
    ds.PixelRepresentation = 0
    ds.RescaleSlope = _format_ds(encoding.slope)
    ds.RescaleIntercept = _format_ds(encoding.intercept)
    if encoding.modality == "CR":
        ds.RescaleType = "US"

    # Window (in modality values) from the black border to a little past the brightest
    # field pixel: nothing in the field is clipped to black, the valve never saturates.
    top, bottom, left, right = info["field"]
    field = stored[top:bottom, left:right]
    inverted = encoding.photometric == "MONOCHROME1"
    black = encoding.slope * (max_code if inverted else 0) + encoding.intercept
    bright = encoding.slope * float(field.min() if inverted else field.max()) + encoding.intercept
    bright += (bright - black) * rng.uniform(0.0, 0.08)
    lo, hi = min(black, bright), max(black, bright)
    width = hi - lo + 1.0  # LINEAR (PS3.3 C.11.2.1.2.1): maps [lo, hi] onto the output range
    ds.WindowCenter = _format_ds(lo + 0.5 + (width - 1.0) / 2)
    ds.WindowWidth = _format_ds(width)
    ds.WindowCenterWidthExplanation = "SYNTHETIC FULL RANGE"

    if encoding.transfer_syntax == ExplicitVRLittleEndian:
        ds.PixelData = stored.tobytes()
    else:
        ds.compress(encoding.transfer_syntax, stored, generate_instance_uid=False)
    return ds


_MANIFEST_COLUMNS = (
    "file",
    "label",
    "patient_id",
    "study_date",
    "view",
    "modality",
    "photometric",
    "bits_stored",
    "transfer_syntax",
    "rescale_slope",
    "rescale_intercept",
    "rows",
    "columns",
    "field_top",
    "field_bottom",
    "field_left",
    "field_right",
    "valve_x",
    "valve_y",
    "valve_x0",
    "valve_y0",
    "valve_x1",
    "valve_y1",
    "valve_angle_deg",
    "valve_tilt_deg",
    "valve_scale",
    "valve_length_px",
    "near_edge",
    "valve_setting",
)


def _image_plan(seed: int, patients: Sequence[Patient]) -> list[tuple[Patient, int]]:
    """Every (patient, image number) in a shuffled order, so files don't follow the class."""
    items = [(p, k) for p in patients for k in range(len(p.studies))]
    order = np.random.default_rng([seed, 3]).permutation(len(items))
    return [items[int(i)] for i in order]


@dataclass(frozen=True)
class _ImageJob:
    """Everything one image needs: any process can render and write it, in any order, and
    the bytes are the same (every random draw is seeded by ``(seed, index)``)."""

    index: int
    patient: Patient
    number: int
    seed: int
    n: int
    size_range_px: tuple[int, int]
    images_dir: Path


def _write_image(job: _ImageJob) -> dict[str, Any]:
    """Render, encode and write one image; return its manifest row."""
    seed, index, patient, number = job.seed, job.index, job.patient, job.number
    rng = np.random.default_rng([seed, 4, index])
    image, info = render_xray(
        rng, patient.label, size_range_px=job.size_range_px, traits=patient.traits
    )
    enc_rng = np.random.default_rng([seed, 5, index])
    encoding = _draw_encoding(enc_rng)
    study = patient.studies[number]
    ds = _build_dicom(image, info, patient, study, number, index, seed, job.n, encoding, enc_rng)
    name = f"IM{index + 1:05d}.dcm"
    dcmwrite(job.images_dir / name, ds, enforce_file_format=True)
    bx0, by0, bx1, by1 = info["valve_bbox"]
    top, bottom, left, right = info["field"]
    return {
        "file": f"{IMAGES_DIRNAME}/{name}",
        "label": patient.label,
        "patient_id": patient.patient_id,
        "study_date": study.date.isoformat(),
        "view": info["view"],
        "modality": encoding.modality,
        "photometric": encoding.photometric,
        "bits_stored": encoding.bits_stored,
        "transfer_syntax": encoding.transfer_syntax,
        "rescale_slope": _format_ds(encoding.slope),
        "rescale_intercept": _format_ds(encoding.intercept),
        "rows": info["height"],
        "columns": info["width"],
        "field_top": top,
        "field_bottom": bottom,
        "field_left": left,
        "field_right": right,
        "valve_x": f"{info['valve_x']:.2f}",
        "valve_y": f"{info['valve_y']:.2f}",
        "valve_x0": bx0,
        "valve_y0": by0,
        "valve_x1": bx1,
        "valve_y1": by1,
        "valve_angle_deg": f"{info['valve_angle_deg']:.1f}",
        "valve_tilt_deg": f"{info['valve_tilt_deg']:.1f}",
        "valve_scale": f"{info['valve_scale']:.4f}",
        "valve_length_px": f"{info['valve_length_px']:.1f}",
        "near_edge": int(info["near_edge"]),
        "valve_setting": info["valve_setting"] or "",
    }


def _clear_previous(out_dir: Path, overwrite: bool) -> None:
    manifest = out_dir / MANIFEST_NAME
    if manifest.exists() and not overwrite:
        raise DatasetError(f"{manifest} already exists; choose an empty folder or overwrite it")
    if overwrite:
        for old in (out_dir / IMAGES_DIRNAME).glob("IM*.dcm"):
            old.unlink()


def generate_dataset(
    out_dir: Path,
    n: int,
    seed: int = 0,
    *,
    class_mix: Mapping[str, float] | None = None,
    size_range_px: tuple[int, int] = DEFAULT_SIZE_RANGE_PX,
    progress: Callable[[int, int], None] | None = None,
    overwrite: bool = False,
    workers: int | None = None,
) -> Path:
    """Write ``n`` synthetic radiographs to ``out_dir/images/`` and return the manifest path.

    Classes follow ``class_mix`` (default: the paper's 81/12/4/3 %) exactly, by
    largest-remainder rounding; it may include ``"Other valve"`` (:data:`OTHER_VALVE`),
    which the default never does. Patients have one to several images (≈ 1.9 on average), always
    with the same valve model, skull and identity. ``progress(done, total)`` is called after
    each image. The same ``(n, seed)`` gives byte-identical files, whatever ``workers``
    (processes writing images; default
    :func:`training.shared.parallel.default_workers`); an existing manifest is
    only replaced with ``overwrite=True`` (which also removes the old ``IM*.dcm`` files).
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    check_size_range(size_range_px)
    allocate_class_counts(n, class_mix)  # refuses a bad mix before anything is written
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _clear_previous(out_dir, overwrite)
    images_dir = out_dir / IMAGES_DIRNAME
    images_dir.mkdir(exist_ok=True)

    patients = plan_patients(seed, allocate_class_counts(n, class_mix))
    jobs = [
        _ImageJob(index, patient, number, seed, n, size_range_px, images_dir)
        for index, (patient, number) in enumerate(_image_plan(seed, patients))
    ]
    rows = []
    for row in ordered_map(_write_image, jobs, workers):
        rows.append(row)
        if progress is not None:
            progress(len(rows), n)

    manifest = out_dir / MANIFEST_NAME
    with manifest.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=_MANIFEST_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    logger.info("wrote %d synthetic images (seed %d) to %s", n, seed, out_dir)
    return manifest
