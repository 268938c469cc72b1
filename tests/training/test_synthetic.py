"""The synthetic data set: deterministic, consistent, varied, and hard in the right way."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import math
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless

from training.shared.dicom import load_image
from training.shared.errors import DatasetError
from training.shared.labels import load_label_config
from training.shared.preprocess import PreprocessParams, crop_to_foreground, scale_to_unit_range
from training.synthetic import (
    BALANCED_CLASS_MIX,
    DRAWABLE_CLASSES,
    OTHER_VALVE,
    OTHER_VALVE_GEOMETRIES,
    PAPER_CLASS_COUNTS,
    PAPER_CLASS_MIX,
    SETTING_SCALES,
    VALVE_CLASSES,
    allocate_class_counts,
    draw_patient_traits,
    generate_dataset,
    render_xray,
)
from training.synthetic.generate import plan_patients
from training.synthetic.valves import (
    draw_valve,
    other_valve_geometry,
    render_valve,
    setting_angle,
    valve_matrix,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
SMALL_SIZES_PX = (400, 640)
"""Image sides for the shared data set: small enough to be quick, large enough for detail."""
TINY_SIZES_PX = (160, 220)
"""Image sides where only the bookkeeping matters."""


def _read_manifest(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def balanced(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, str]]]:
    """120 images, 30 per class: shared by the consistency, variety and hardness checks."""
    out = tmp_path_factory.mktemp("balanced")
    manifest = generate_dataset(
        out, 120, seed=7, class_mix=BALANCED_CLASS_MIX, size_range_px=SMALL_SIZES_PX
    )
    return out, _read_manifest(manifest)


@pytest.fixture(scope="module")
def decoded(balanced: tuple[Path, list[dict[str, str]]]) -> list[np.ndarray]:
    """Every image of ``balanced`` through the project's decoder (bright bone)."""
    out, rows = balanced
    return [load_image(out / row["file"]) for row in rows]


# ------------------------------------------------------------------ constants and class mix


def test_classes_are_label_config_choices() -> None:
    config = load_label_config(REPO_ROOT / "label_config.xml")
    assert set(VALVE_CLASSES) <= set(config.classes)
    assert OTHER_VALVE in config.classes
    assert (*VALVE_CLASSES, OTHER_VALVE) == DRAWABLE_CLASSES
    assert set(PAPER_CLASS_COUNTS) == set(VALVE_CLASSES)
    assert sum(PAPER_CLASS_COUNTS.values()) == 959
    assert math.isclose(sum(PAPER_CLASS_MIX.values()), 1.0)
    assert round(PAPER_CLASS_MIX["Codman Hakim"], 2) == 0.81


def test_setting_scales_are_the_label_configs() -> None:
    """The generator draws exactly the settings the labeling config asks for, per model."""
    config = load_label_config(REPO_ROOT / "label_config.xml")
    assert {s.valve: s.values for s in config.settings} == SETTING_SCALES
    assert tuple(SETTING_SCALES) == VALVE_CLASSES
    assert SETTING_SCALES["Codman Hakim"][:2] == ("30", "40")
    assert [len(v) for v in SETTING_SCALES.values()] == [18, 8, 8, 21]


def test_setting_k_of_n_is_k_nths_of_a_turn() -> None:
    assert setting_angle("Codman Hakim", 0) == 0.0
    assert setting_angle("Codman Hakim", 1) == pytest.approx(math.radians(20))
    assert setting_angle("proGAV 2.0", 20) == pytest.approx(2 * math.pi * 20 / 21)
    for bad in (-1, 8):
        with pytest.raises(ValueError, match="settings 0..7"):
            setting_angle("Codman Certas Plus", bad)
    with pytest.raises(KeyError):
        setting_angle(OTHER_VALVE, 0)


def test_paper_mix_gives_paper_counts() -> None:
    assert allocate_class_counts(959) == dict(PAPER_CLASS_COUNTS)


@pytest.mark.parametrize("n", [1, 2, 7, 10, 33, 100, 481])
@pytest.mark.parametrize("mix", [None, BALANCED_CLASS_MIX, {"proGAV 2.0": 2, "Codman Hakim": 1}])
def test_allocation_is_exact_and_close_to_the_mix(n: int, mix) -> None:
    counts = allocate_class_counts(n, mix)
    assert sum(counts.values()) == n
    weights = dict(PAPER_CLASS_MIX if mix is None else mix)
    total = sum(weights.values())
    for name in VALVE_CLASSES:
        assert abs(counts[name] - n * weights.get(name, 0) / total) < 1.0


def test_unknown_or_empty_mix_is_refused() -> None:
    with pytest.raises(ValueError, match="Not assessable"):
        allocate_class_counts(10, {"Not assessable": 1.0})
    with pytest.raises(ValueError):
        allocate_class_counts(10, {"Codman Hakim": 0.0})
    with pytest.raises(ValueError):
        allocate_class_counts(10, {"Codman Hakim": -1.0, "proGAV 2.0": 2.0})


def test_generated_counts_follow_the_requested_mix(tmp_path: Path) -> None:
    rows = _read_manifest(generate_dataset(tmp_path, 30, seed=2, size_range_px=TINY_SIZES_PX))
    assert Counter(r["label"] for r in rows) == Counter(
        {k: v for k, v in allocate_class_counts(30).items() if v}
    )


def test_balanced_fixture_has_equal_classes(balanced) -> None:
    _, rows = balanced
    assert Counter(r["label"] for r in rows) == {name: 30 for name in VALVE_CLASSES}


# --------------------------------------------------------------------------------- patients


def test_images_per_patient_like_the_paper() -> None:
    """959 images of 512 patients (1.87 each), 41.4 % of patients with more than one."""
    patients = plan_patients(0, allocate_class_counts(959))
    sizes = np.array([len(p.studies) for p in patients])
    assert sizes.sum() == 959
    assert 1.7 <= sizes.mean() <= 2.05
    assert 0.33 <= (sizes > 1).mean() <= 0.5
    assert sizes.min() == 1


def test_patients_are_consistent(balanced) -> None:
    out, rows = balanced
    per_patient: dict[str, set[tuple[str, ...]]] = defaultdict(set)
    for row in rows:
        ds = pydicom.dcmread(out / row["file"], stop_before_pixels=True)
        assert ds.PatientID == row["patient_id"]
        per_patient[row["patient_id"]].add(
            (row["label"], str(ds.PatientName), ds.PatientBirthDate, ds.PatientSex)
        )
        assert ds.PatientBirthDate < ds.StudyDate
        assert "^" in str(ds.PatientName)
    assert all(len(v) == 1 for v in per_patient.values()), "a patient changed valve or identity"
    names = [next(iter(v))[1] for v in per_patient.values()]
    assert len(per_patient) < len(rows), "no patient has several images"
    assert len(set(names)) > len(names) // 2


# ---------------------------------------------------------------------------- determinism


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    def run(folder: str, seed: int) -> dict[str, bytes]:
        root = tmp_path / folder
        generate_dataset(root, 6, seed=seed, size_range_px=TINY_SIZES_PX)
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.*"))}

    first, again, other = run("a", 3), run("b", 3), run("c", 4)
    assert len(first) == 7  # six images and the manifest
    assert first == again
    assert first.keys() == other.keys()
    assert all(first[k] != other[k] for k in first)


def test_render_is_a_pure_function_of_the_rng() -> None:
    a, info_a = render_xray(np.random.default_rng(5), "Codman Hakim", shape=(200, 240))
    b, info_b = render_xray(np.random.default_rng(5), "Codman Hakim", shape=(200, 240))
    c, _ = render_xray(np.random.default_rng(6), "Codman Hakim", shape=(200, 240))
    assert np.array_equal(a, b) and info_a == info_b
    assert not np.array_equal(a, c)


# ------------------------------------------------------------------------ files and DICOM


def test_manifest_matches_files(balanced) -> None:
    out, rows = balanced
    assert {p.name for p in (out / "images").iterdir()} == {Path(r["file"]).name for r in rows}
    sop_uids = set()
    for row in rows:
        assert row["label"] in VALVE_CLASSES
        ds = pydicom.dcmread(out / row["file"])
        assert ds.file_meta.TransferSyntaxUID == row["transfer_syntax"]
        assert ds.PhotometricInterpretation == row["photometric"]
        assert ds.BitsAllocated == 16 and ds.BitsStored == int(row["bits_stored"])
        assert (ds.Rows, ds.Columns) == (int(row["rows"]), int(row["columns"]))
        assert ds.Modality == row["modality"] and ds.BodyPartExamined == "SKULL"
        assert ds.SOPClassUID in ("1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1")
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        for keyword in ("AccessionNumber", "InstitutionName", "ReferringPhysicianName"):
            assert str(ds.get(keyword, "")).strip(), keyword
        assert ds.pixel_array.shape == (ds.Rows, ds.Columns)
        assert int(ds.pixel_array.max()) < 2**ds.BitsStored
        sop_uids.add(ds.SOPInstanceUID)
    assert len(sop_uids) == len(rows)


def test_dicom_variety(balanced) -> None:
    _, rows = balanced
    assert {r["photometric"] for r in rows} == {"MONOCHROME1", "MONOCHROME2"}
    assert {r["bits_stored"] for r in rows} == {"12", "16"}
    assert {r["modality"] for r in rows} == {"CR", "DX"}
    syntaxes = Counter(r["transfer_syntax"] for r in rows)
    assert {ExplicitVRLittleEndian, RLELossless, JPEG2000Lossless} <= set(syntaxes)
    assert any(r["rescale_slope"] != "1" or r["rescale_intercept"] != "0" for r in rows)


def test_nuisances_do_not_depend_on_the_class(balanced) -> None:
    """Each nuisance value appears in every class (a class-specific one would be a leak)."""
    _, rows = balanced
    for column in ("photometric", "bits_stored", "transfer_syntax", "modality", "view"):
        by_class = {name: {r[column] for r in rows if r["label"] == name} for name in VALVE_CLASSES}
        assert all(values == by_class[VALVE_CLASSES[0]] for values in by_class.values()), column


# -------------------------------------------------------------------- pixels and geometry


def _field(row: dict[str, str]) -> tuple[int, int, int, int]:
    top, bottom, left, right = (
        int(row[k]) for k in ("field_top", "field_bottom", "field_left", "field_right")
    )
    return top, bottom, left, right


def test_collimation_border_is_exactly_black_and_crop_finds_the_field(balanced, decoded) -> None:
    _, rows = balanced
    params = PreprocessParams()
    bordered = 0
    for row, image in zip(rows, decoded, strict=True):
        top, bottom, left, right = _field(row)
        mask = np.ones(image.shape, dtype=bool)
        mask[top:bottom, left:right] = False
        unit = scale_to_unit_range(image)
        cropped = crop_to_foreground(
            unit, params.background_threshold, params.min_foreground_fraction
        )
        if mask.any():
            bordered += 1
            black = image.min()
            assert np.all(image[mask] == black)
            assert np.all(image[~mask] > black)
            assert cropped.shape == (bottom - top, right - left)
        else:  # no border: the darkest air is the minimum, the crop may nibble at it
            assert cropped.shape[0] >= 0.96 * image.shape[0]
            assert cropped.shape[1] >= 0.96 * image.shape[1]
    assert 0.6 * len(rows) <= bordered < len(rows), "borders should be common, not universal"


def test_whole_valve_inside_the_field(balanced) -> None:
    _, rows = balanced
    gaps = []
    for row in rows:
        top, bottom, left, right = _field(row)
        x0, y0, x1, y1 = (int(row[k]) for k in ("valve_x0", "valve_y0", "valve_x1", "valve_y1"))
        assert left <= x0 < x1 <= right and top <= y0 < y1 <= bottom
        gaps.append(min(x0 - left, right - x1, y0 - top, bottom - y1))
        assert 0.06 <= float(row["valve_scale"]) <= 0.15
    near = [g for g, r in zip(gaps, rows, strict=True) if r["near_edge"] == "1"]
    assert near and max(near) <= 8, "some valves should hug the field edge"
    tilts = [float(r["valve_tilt_deg"]) for r in rows]
    assert max(tilts) > 40 and min(tilts) < 10


@pytest.mark.parametrize("label", VALVE_CLASSES)
def test_render_xray_contract(label: str) -> None:
    rng = np.random.default_rng(11)
    traits = draw_patient_traits(rng)
    for _ in range(6):
        image, info = render_xray(rng, label, size_range_px=(200, 300), traits=traits)
        assert image.dtype == np.float32 and image.ndim == 2
        assert (image.shape[0], image.shape[1]) == (info["height"], info["width"])
        assert min(image.shape) >= 200 and max(image.shape) <= 300
        top, bottom, left, right = info["field"]
        inside = image[top:bottom, left:right]
        assert inside.min() > 0.03 and image.max() <= 1.0
        assert image.sum() == pytest.approx(inside.sum())  # outside the field: exactly 0
        x0, y0, x1, y1 = info["valve_bbox"]
        assert left <= x0 < x1 <= right and top <= y0 < y1 <= bottom
        assert x0 <= info["valve_x"] < x1 and y0 <= info["valve_y"] < y1
        k, scale = info["valve_setting_index"], SETTING_SCALES[label]
        assert info["valve_setting"] == scale[k]
        assert info["valve_setting_deg"] == pytest.approx(360.0 * k / len(scale))


def test_render_xray_refuses_unknown_class() -> None:
    with pytest.raises(ValueError, match="unknown valve class"):
        render_xray(np.random.default_rng(0), "Not assessable")


# ------------------------------------------------------------------------------ settings


def test_manifest_settings_are_on_each_models_scale(balanced) -> None:
    _, rows = balanced
    for row in rows:
        assert row["valve_setting"] in SETTING_SCALES[row["label"]], row["file"]
    for label in VALVE_CLASSES:
        assert len({r["valve_setting"] for r in rows if r["label"] == label}) >= 5, label


def _setting_image(label: str, index: int, mirror: bool, length_px: float = 120.0) -> np.ndarray:
    """The valve at setting ``index``, flow to the right, seen from the front or (``mirror``)
    from the back, peak 1 (as the renderer scales it), on a 320² canvas."""
    drawing = draw_valve(label, setting_angle(label, index), 0.9)
    matrix = valve_matrix(length_px, 0.0, 0.0, 0.0, mirror)
    patch, x0, y0 = render_valve(drawing, matrix, (160.5, 160.5))
    canvas = np.zeros((320, 320), dtype=np.float32)
    canvas[y0 : y0 + patch.shape[0], x0 : x0 + patch.shape[1]] = patch
    return canvas / canvas.max()


def _look_different(a: np.ndarray, b: np.ndarray) -> bool:
    """Some part differs by a fifth of the peak, two pixels' worth of it in all: a marker or
    a rotor part moved, not an anti-aliased edge."""
    diff = np.abs(a - b)
    return bool(diff.max() >= 0.2 and diff.sum() >= 2.0)


@pytest.mark.parametrize("label", VALVE_CLASSES)
def test_every_setting_and_its_mirror_image_look_different(label: str) -> None:
    """The setting is readable: no two settings are drawn alike (a rotor part with a
    half-turn symmetry alone would make k and k + n/2 alike), and a valve seen from its
    back (mirrored, as the generator draws half of them) looks like no setting seen from
    the front (a body symmetric about its axis would make setting k look like n - k)."""
    scale = SETTING_SCALES[label]
    front = [_setting_image(label, k, mirror=False) for k in range(len(scale))]
    back = [_setting_image(label, k, mirror=True) for k in range(len(scale))]
    for j, image in enumerate(front):
        for k in range(j + 1, len(scale)):
            assert _look_different(image, front[k]), (scale[j], scale[k])
    for j, mirrored in enumerate(back):
        for k, image in enumerate(front):
            assert _look_different(mirrored, image), (f"mirrored {scale[j]}", scale[k])
    assert not _look_different(front[0], _setting_image(label, 0, mirror=False))


@pytest.mark.parametrize("label", VALVE_CLASSES)
def test_settings_and_faces_differ_visibly_at_the_size_valves_are_drawn(label: str) -> None:
    """The test above at a valve length of 64 px (a small valve of the generator on the
    reader's 768-px square), and by more than an edge: any two settings, and a setting seen
    from the back against any seen from the front, differ by at least 5 pixels' worth of the
    valve's peak. With the first drawings the Certas Plus's ball and right-hand marker and
    the Sophy's orientation bar were 1-2 px there (1.6-3.2 pixels' worth), and the reader read
    setting k + 4 or the mirror partner -k as often as k (docs/TRAINING.md, "The pressure
    setting")."""
    n = len(SETTING_SCALES[label])
    front = [_setting_image(label, k, mirror=False, length_px=64.0) for k in range(n)]
    back = [_setting_image(label, k, mirror=True, length_px=64.0) for k in range(n)]
    for j in range(n):
        for k in range(n):
            if j != k:
                assert np.abs(front[j] - front[k]).sum() >= 5.0, (label, j, k)
            assert np.abs(back[j] - front[k]).sum() >= 5.0, (label, f"mirrored {j}", k)


# ------------------------------------------------------------------------- hard enough


def _nuisance_features(row: dict[str, str], image: np.ndarray, syntaxes: list[str]) -> list:
    from training.shared.preprocess import prepare_image

    prepared = prepare_image(image, PreprocessParams(size_px=64))
    hist = np.histogram(prepared, bins=16, range=(0.0, 1.0))[0] / prepared.size
    stats = [prepared.mean(), prepared.std(), *np.percentile(prepared, [1, 5, 25, 50, 75, 95, 99])]
    rows, cols = int(row["rows"]), int(row["columns"])
    meta = [
        rows,
        cols,
        cols / rows,
        row["photometric"] == "MONOCHROME1",
        int(row["bits_stored"]),
        row["modality"] == "CR",
        float(row["rescale_slope"]),
        float(row["rescale_intercept"]),
        *(row["transfer_syntax"] == ts for ts in syntaxes),
        float(row["valve_x"]) / cols,
        float(row["valve_y"]) / rows,
        int(row["near_edge"]),
    ]
    return [*hist, *stats, *meta]


def _valve_features(row: dict[str, str], image: np.ndarray, side: int = 48) -> list[float]:
    """Rotation-invariant description of a square crop around the known valve centre:
    per ring, mean, spread and the magnitudes of angular harmonics 1–6."""
    cx, cy = float(row["valve_x"]), float(row["valve_y"])
    half = 0.65 * float(row["valve_length_px"])
    crop = Image.fromarray(scale_to_unit_range(image), mode="F").transform(
        (side, side),
        Image.Transform.EXTENT,
        (cx - half, cy - half, cx + half, cy + half),
        Image.Resampling.BILINEAR,
    )
    patch = np.asarray(crop, dtype=np.float64)
    patch = patch - np.median(patch)
    yy, xx = np.mgrid[0:side, 0:side] + 0.5 - side / 2
    ring = np.minimum((np.hypot(xx, yy) / (side / 2) * 12).astype(int), 12)
    angle = np.arctan2(yy, xx)
    features: list[float] = []
    for k in range(12):
        values, theta = patch[ring == k], angle[ring == k]
        features += [values.mean(), values.std()]
        features += [abs(np.mean(values * np.exp(-1j * m * theta))) for m in range(1, 7)]
    return features


def _cv_balanced_accuracy(x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> dict[str, float]:
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    cv = StratifiedGroupKFold(n_splits=5, shuffle=True, random_state=0)
    models = {
        "logistic": make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)),
        "forest": RandomForestClassifier(n_estimators=200, random_state=0),
    }
    return {
        name: balanced_accuracy_score(y, cross_val_predict(model, x, y, groups=groups, cv=cv))
        for name, model in models.items()
    }


def test_only_the_valve_tells_the_class(balanced, decoded) -> None:
    """Nuisance features (intensity histogram/statistics of the prepared image, size,
    photometric, bits, transfer syntax, rescale, valve position) predict the class at
    chance level, while a crop around the valve predicts it well: the class lives in the
    valve. Patient-grouped 5-fold CV, 4 balanced classes (chance = 0.25)."""
    _, rows = balanced
    syntaxes = sorted({r["transfer_syntax"] for r in rows})
    y = np.array([VALVE_CLASSES.index(r["label"]) for r in rows])
    groups = np.array([r["patient_id"] for r in rows])
    nuisance = np.array(
        [_nuisance_features(r, im, syntaxes) for r, im in zip(rows, decoded, strict=True)],
        dtype=float,
    )
    valve = np.array(
        [_valve_features(r, im) for r, im in zip(rows, decoded, strict=True)], dtype=float
    )
    nuisance_scores = _cv_balanced_accuracy(nuisance, y, groups)
    valve_scores = _cv_balanced_accuracy(valve, y, groups)
    print(f"nuisance: {nuisance_scores}  valve: {valve_scores}")
    assert max(nuisance_scores.values()) < 0.40, nuisance_scores
    assert min(valve_scores.values()) > 0.70, valve_scores


# --------------------------------------------------------------------------- the writer


def test_progress_and_refusal_to_overwrite(tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    generate_dataset(
        tmp_path, 3, seed=1, size_range_px=TINY_SIZES_PX, progress=lambda d, t: calls.append((d, t))
    )
    assert calls == [(1, 3), (2, 3), (3, 3)]
    with pytest.raises(DatasetError, match="already exists"):
        generate_dataset(tmp_path, 2, seed=1, size_range_px=TINY_SIZES_PX)
    rows = _read_manifest(
        generate_dataset(tmp_path, 2, seed=1, size_range_px=TINY_SIZES_PX, overwrite=True)
    )
    assert len(rows) == 2
    assert len(list((tmp_path / "images").glob("*.dcm"))) == 2


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        generate_dataset(tmp_path, 0)
    with pytest.raises(ValueError):
        generate_dataset(tmp_path / "x", 2, size_range_px=(10, 20))


# -------------------------------------------------------------------------- the preview


def test_write_preview_makes_a_png(balanced, tmp_path: Path) -> None:
    from training.fitting.preview import write_preview

    out, _ = balanced
    target = write_preview(
        out / "manifest.csv",
        tmp_path / "sheet" / "preview.png",
        per_class=2,
        params=PreprocessParams(size_px=96),
        classes=VALVE_CLASSES,
    )
    with Image.open(target) as png:
        assert png.format == "PNG"
        width, height = png.size
    assert width > 300 and height > 600  # 2 columns, 4 rows of tiles
    assert target.stat().st_size > 20_000  # real pictures, not blank tiles


def test_write_preview_without_manifest(tmp_path: Path) -> None:
    from training.fitting.preview import write_preview

    with pytest.raises(DatasetError):
        write_preview(tmp_path / "manifest.csv", tmp_path / "p.png")


# ------------------------------------------------------------------- "Other valve" devices

_OTHER_VARIANTS = (1 / 6, 1 / 2, 5 / 6)
"""One per-patient ``variant`` inside each third: one per "Other valve" geometry."""


def _tree_digest(root: Path) -> str:
    """Names, decoded pixels and bytes of everything ``generate_dataset`` wrote, except the
    bytes of JPEG 2000 files (the encoder library's output may change between versions)."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.*")):
        digest.update(path.name.encode())
        if path.suffix == ".dcm":
            ds = pydicom.dcmread(path)
            digest.update(ds.pixel_array.tobytes())
            if ds.file_meta.TransferSyntaxUID == JPEG2000Lossless:
                continue
        digest.update(path.read_bytes())
    return digest.hexdigest()


ONE_PROCESS_DIGEST = "f6b6adced70fef0d211f057c5bf540c9486c6bb574a5e1cbdacf493ccaf180e9"
"""The default mix, 8 images, seed 3: what one process writes."""


@pytest.mark.parametrize(
    ("mix", "expected"),
    [
        (None, ONE_PROCESS_DIGEST),
        (BALANCED_CLASS_MIX, "82678ee86ed2e231196009519a121206523bbb4e6524954a487f308ac8904c2b"),
    ],
)
def test_four_class_output_unchanged_by_other_valves(tmp_path: Path, mix, expected) -> None:
    """The default and the balanced mix write what they wrote before "Other valve" existed
    (digests taken from that code, seed 3; whole files were byte-identical too). Retaken
    when the settings became discrete: the manifest gained ``valve_setting``, the rotors
    turn in steps and the bodies gained their off-axis marks; and when the Certas Plus's ball
    and right-hand marker and the Sophy's orientation bar grew to be seen at the sizes drawn
    (:func:`test_settings_and_faces_differ_visibly_at_the_size_valves_are_drawn`)."""
    generate_dataset(tmp_path, 8, seed=3, class_mix=mix, size_range_px=TINY_SIZES_PX)
    assert _tree_digest(tmp_path) == expected


def test_worker_processes_write_the_same_bytes(tmp_path: Path) -> None:
    """Images written by two spawned processes are the files one process writes (the digest
    above), and progress still counts up one image at a time."""
    seen: list[tuple[int, int]] = []
    generate_dataset(
        tmp_path, 8, seed=3, size_range_px=TINY_SIZES_PX, workers=2,
        progress=lambda done, total: seen.append((done, total)),
    )  # fmt: skip
    assert _tree_digest(tmp_path) == ONE_PROCESS_DIGEST
    assert seen == [(k, 8) for k in range(1, 9)]


def test_discrete_settings_draw_nothing_else_differently(tmp_path: Path) -> None:
    """The setting is still one uniform draw, only quantised: without its new column the
    manifest is byte for byte what the code with continuous settings wrote (seed 3)."""
    rows = _read_manifest(generate_dataset(tmp_path, 8, seed=3, size_range_px=TINY_SIZES_PX))
    columns = [c for c in rows[0] if c != "valve_setting"]
    text = ",".join(columns) + "\n" + "".join(",".join(r[c] for c in columns) + "\n" for r in rows)
    expected = "24eff92efac55e499fb16395ebe75e9a93381e94bebb153b9a9191da8e40f460"
    assert hashlib.sha256(text.encode()).hexdigest() == expected


def test_other_valve_allocation() -> None:
    assert OTHER_VALVE not in allocate_class_counts(10)
    assert OTHER_VALVE not in allocate_class_counts(10, BALANCED_CLASS_MIX)
    assert allocate_class_counts(10, {OTHER_VALVE: 1.0}) == {
        **{name: 0 for name in VALVE_CLASSES},
        OTHER_VALVE: 10,
    }
    counts = allocate_class_counts(11, {name: 1.0 for name in DRAWABLE_CLASSES})
    assert sum(counts.values()) == 11 and set(counts.values()) == {2, 3}
    patients = plan_patients(0, allocate_class_counts(40, {OTHER_VALVE: 1, "proGAV 2.0": 1}))
    assert Counter(p.label for p in patients for _ in p.studies) == {
        OTHER_VALVE: 20,
        "proGAV 2.0": 20,
    }


def test_variant_picks_each_other_geometry() -> None:
    assert len(set(OTHER_VALVE_GEOMETRIES)) >= 3
    picked = [other_valve_geometry(v) for v in _OTHER_VARIANTS]
    assert picked == list(OTHER_VALVE_GEOMETRIES)
    assert other_valve_geometry(0.0) == OTHER_VALVE_GEOMETRIES[0]
    assert other_valve_geometry(0.9999) == OTHER_VALVE_GEOMETRIES[-1]


def _valve_image(label: str, variant: float, angle: float = 0.4, tilt: float = 0.0) -> np.ndarray:
    """The valve alone, peak 1, its local origin at pixel (160, 160) of a 320² canvas."""
    drawing = draw_valve(label, 1.0, variant)
    patch, x0, y0 = render_valve(
        drawing, valve_matrix(120.0, angle, tilt, 0.3, False), (160.5, 160.5)
    )
    canvas = np.zeros((320, 320), dtype=np.float32)
    canvas[y0 : y0 + patch.shape[0], x0 : x0 + patch.shape[1]] = patch
    return canvas / canvas.max()


@pytest.mark.parametrize("variant", _OTHER_VARIANTS)
def test_other_valves_are_drawn_around_their_centre(variant: float) -> None:
    """Each geometry: the centre (local origin) lies on the valve's bright body, and the
    drawing's extent holds everything drawn."""
    for angle, tilt in ((0.0, 0.0), (0.4, 0.0), (2.0, 0.9)):
        image = _valve_image(OTHER_VALVE, variant, angle, tilt)
        assert image[160, 160] > 0.1
    drawing = draw_valve(OTHER_VALVE, 1.0, variant)
    x0, x1, y0, y1 = drawing.extent
    matrix = valve_matrix(120.0, 0.0, 0.0, 0.0, False)
    patch, px0, py0 = render_valve(drawing, matrix, (0.0, 0.0))
    ys, xs = np.nonzero(patch > 0.01 * patch.max())
    assert px0 + xs.min() >= 120 * x0 - 2 and px0 + xs.max() <= 120 * x1 + 2
    assert py0 + ys.min() >= 120 * y0 - 2 and py0 + ys.max() <= 120 * y1 + 2
    assert drawing.outlet_x == 0.5


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_other_valves_differ_from_the_four_and_each_other() -> None:
    """At the same pose, the outline (everything drawn) overlaps each of the four models'
    and the other geometries' by at most 0.8 IoU, and the dense parts (a quarter of the
    peak: metal, markers, plates) by at most 0.35: the shapes differ, not just the size."""
    poses = ((0.4, 0.0), (1.9, 0.6))
    references = [(name, 0.9) for name in VALVE_CLASSES] + [
        (OTHER_VALVE, v) for v in _OTHER_VARIANTS
    ]
    for variant in _OTHER_VARIANTS:
        for angle, tilt in poses:
            image = _valve_image(OTHER_VALVE, variant, angle, tilt)
            for name, ref_variant in references:
                if (name, ref_variant) == (OTHER_VALVE, variant):
                    continue
                ref = _valve_image(name, ref_variant, angle, tilt)
                where = (other_valve_geometry(variant), name, ref_variant, angle)
                assert _iou(image > 0.01, ref > 0.01) < 0.8, where
                assert _iou(image > 0.25, ref > 0.25) < 0.35, where


def test_other_valves_have_a_total_opacity_like_the_four() -> None:
    """Scaled to the same peak (as the renderer does), each "Other valve" geometry has a
    total attenuation within the four models' range (± 10 %): brightness does not tell it."""
    totals = {
        (name, variant): float(_valve_image(name, variant).sum())
        for name, variant in [(n, v) for n in VALVE_CLASSES for v in (0.1, 0.9)]
    }
    low, high = min(totals.values()), max(totals.values())
    for variant in (*_OTHER_VARIANTS, 0.05, 0.45, 0.95):
        total = float(_valve_image(OTHER_VALVE, variant).sum())
        assert 0.9 * low <= total <= 1.1 * high, (other_valve_geometry(variant), total, low, high)


def test_render_xray_other_valve_is_deterministic() -> None:
    traits = draw_patient_traits(np.random.default_rng(3))
    for variant in _OTHER_VARIANTS:
        patient = dataclasses.replace(traits, valve_variant=variant)
        a, info_a = render_xray(
            np.random.default_rng(8), OTHER_VALVE, shape=(220, 260), traits=patient
        )
        b, info_b = render_xray(
            np.random.default_rng(8), OTHER_VALVE, shape=(220, 260), traits=patient
        )
        assert np.array_equal(a, b) and info_a == info_b
        x0, y0, x1, y1 = info_a["valve_bbox"]
        assert x0 <= info_a["valve_x"] < x1 and y0 <= info_a["valve_y"] < y1
        assert info_a["valve_setting"] is None and info_a["valve_setting_index"] is None


def test_other_valve_data_set(tmp_path: Path) -> None:
    """A data set of "Other valve" only: labelled so in the manifest, every geometry
    drawn, the same bytes for the same seed, and each recorded centre inside the image,
    inside the valve's box and on its bright body (brighter than most of the box)."""
    manifest = generate_dataset(
        tmp_path / "a", 12, seed=1, class_mix={OTHER_VALVE: 1.0}, size_range_px=TINY_SIZES_PX
    )
    rows = _read_manifest(manifest)
    assert {r["label"] for r in rows} == {OTHER_VALVE}
    assert {r["valve_setting"] for r in rows} == {""}  # no setting to read
    planned = plan_patients(1, allocate_class_counts(12, {OTHER_VALVE: 1.0}))
    assert {other_valve_geometry(p.traits.valve_variant) for p in planned} == set(
        OTHER_VALVE_GEOMETRIES
    )
    for row in rows:
        image = load_image(tmp_path / "a" / row["file"])
        x, y = float(row["valve_x"]), float(row["valve_y"])
        x0, y0, x1, y1 = (int(row[k]) for k in ("valve_x0", "valve_y0", "valve_x1", "valve_y1"))
        assert 0 <= x < int(row["columns"]) and 0 <= y < int(row["rows"])
        assert x0 <= x < x1 and y0 <= y < y1
        centre = image[int(y) - 1 : int(y) + 2, int(x) - 1 : int(x) + 2].mean()
        assert np.mean(image[y0:y1, x0:x1] < centre) > 0.6, row["file"]
    generate_dataset(
        tmp_path / "b", 12, seed=1, class_mix={OTHER_VALVE: 1.0}, size_range_px=TINY_SIZES_PX
    )
    assert _tree_digest(tmp_path / "a") == _tree_digest(tmp_path / "b")


def test_other_valve_in_a_mixed_data_set(tmp_path: Path) -> None:
    mix = {**BALANCED_CLASS_MIX, OTHER_VALVE: 0.25}
    rows = _read_manifest(
        generate_dataset(tmp_path, 10, seed=4, class_mix=mix, size_range_px=TINY_SIZES_PX)
    )
    assert Counter(r["label"] for r in rows) == {name: 2 for name in DRAWABLE_CLASSES}
