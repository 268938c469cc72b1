"""The HTML report is self-contained, complete and escapes user-supplied strings."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.evaluation import evaluate_oof
from training.report import GALLERY_IMAGE_PX, GALLERY_PER_CLASS, write_report

EVIL = "<script>alert('x')</script>"
CLASSES = ["Codman Hakim", EVIL, "proGAV 2.0"]
PNG_SRC = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


@pytest.fixture(scope="module")
def oof() -> dict:
    rng = np.random.default_rng(1)
    n = 90
    y = np.arange(n) % 3
    logits = rng.normal(size=(n, 3))
    logits[np.arange(n), y] += 2.5
    return {"y_true": y, "logits": logits, "fold": (np.arange(n) // 3) % 3}


@pytest.fixture(scope="module")
def metrics(oof: dict) -> dict:
    return evaluate_oof(oof["y_true"], oof["logits"], oof["fold"], CLASSES)


def _examples(n_per_class: int, side: int = 300) -> list[dict]:
    rng = np.random.default_rng(2)
    yy, xx = np.mgrid[0:side, 0:side] / side
    out = []
    for name in CLASSES:
        for i in range(n_per_class):
            out.append(
                {
                    "image": np.clip(
                        0.5 + 0.3 * np.sin(8 * xx) + 0.05 * rng.random(xx.shape), 0, 1
                    ),
                    "cam": np.exp(-((xx - 0.5) ** 2 + (yy - 0.3) ** 2) * 20),
                    "true": name,
                    "pred": name if i else CLASSES[0],
                    "prob": 0.91,
                }
            )
    return out


def _write(tmp_path: Path, metrics: dict, **kwargs) -> str:
    kwargs.setdefault("run_info", {"date": "2026-01-02", "version": "v7", "pretrained": True})
    path = write_report(metrics, tmp_path / "sub" / "report.html", title="valve-id v7", **kwargs)
    assert path == tmp_path / "sub" / "report.html"
    return path.read_text(encoding="utf-8")


def test_report_is_self_contained_and_escapes_class_names(
    tmp_path: Path, metrics: dict, oof: dict
) -> None:
    text = _write(tmp_path, metrics, gradcam_examples=_examples(2), oof=oof)
    assert "<script" not in text.lower()
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in text
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text)
    assert "<link" not in text.lower() and "@import" not in text and "url(" not in text
    pngs = PNG_SRC.findall(text)
    # confusion matrix + reliability + uncertainty histogram + 6 gallery images
    assert len(pngs) == 3 + 3 * 2
    for data in pngs:
        with Image.open(io.BytesIO(base64.b64decode(data))) as im:
            assert im.format == "PNG"
    assert len(text) < 3_000_000


def test_report_has_the_paper_tables(tmp_path: Path, metrics: dict) -> None:
    text = _write(tmp_path, metrics)
    for fold in (0, 1, 2):
        assert f"Split {fold}</td>" in text
    acc, sd = metrics["mean"]["accuracy"], metrics["std"]["accuracy"]
    assert f"{acc:.2f} ± {sd:.2f}" in text
    assert f"{round(100 * acc)} % of held-out X-rays" in text
    hakim = metrics["per_class"]["Codman Hakim"]
    assert f"{hakim['error_rate']:.2f} ± {hakim['std']['error_rate']:.2f}" in text
    unc = metrics["uncertainty"]["per_class"]["proGAV 2.0"]
    assert f"{unc['entropy']:.2f} ± {unc['std']['entropy']:.2f}" in text
    for heading in ("Performance per valve model", "Uncertainty", "Calibration", "Confusion"):
        assert heading in text
    best = metrics["uncertainty"]["best_acquisition"]
    auc = metrics["uncertainty"]["error_detection_auroc"][best]
    assert f'<tr class="best"><td class="l">{best.replace("_", " ")}</td><td>{auc:.2f}</td>' in text
    assert f"{metrics['calibration']['ece_before']:.3f}" in text
    assert "Saliency" not in text  # no gallery without examples
    assert len(PNG_SRC.findall(text)) == 2


def test_random_init_shows_a_warning_banner(tmp_path: Path, metrics: dict) -> None:
    assert 'class="warning"' not in _write(tmp_path, metrics)
    text = _write(tmp_path, metrics, run_info={"pretrained": False, "n_images": 90})
    assert 'class="warning"' in text and "random initialisation" in text


def test_random_init_from_the_recorded_init_info(tmp_path: Path, metrics: dict) -> None:
    imagenet = {"arch": "resnet34", "init": "imagenet", "weights_file": "w.pth", "reason": "ok"}
    assert 'class="warning"' not in _write(tmp_path, metrics, run_info={"init": imagenet})
    fallback = {**imagenet, "init": "random", "reason": "weights file <missing>"}
    text = _write(tmp_path, metrics, run_info={"init": fallback})
    assert 'class="warning"' in text
    assert "Reason recorded: weights file &lt;missing&gt;" in text


def test_run_info_values_are_escaped(tmp_path: Path, metrics: dict) -> None:
    text = _write(
        tmp_path,
        metrics,
        run_info={"<b>note</b>": "a & b", "class_counts": {EVIL: 3}},
    )
    assert "&lt;b&gt;note&lt;/b&gt;" in text and "a &amp; b" in text
    assert "<b>" not in text and "<script" not in text.lower()


def test_gallery_is_capped_per_class_and_downscaled(tmp_path: Path, metrics: dict) -> None:
    text = _write(tmp_path, metrics, gradcam_examples=_examples(GALLERY_PER_CLASS + 2, side=600))
    gallery = text.split("Saliency maps")[1]
    pngs = PNG_SRC.findall(gallery)
    assert len(pngs) == GALLERY_PER_CLASS * len(CLASSES)
    with Image.open(io.BytesIO(base64.b64decode(pngs[0]))) as im:
        assert im.height == GALLERY_IMAGE_PX and im.width <= 2 * GALLERY_IMAGE_PX + 10
    assert "predicted: Codman Hakim (91 %) · wrong" in gallery


def test_report_renders_nulls(tmp_path: Path) -> None:
    y = np.array([0, 1, 0, 1])
    logits = 4.0 * np.eye(2)[y]
    m = evaluate_oof(y, logits, np.zeros(4, dtype=int), ["a", "b"])
    text = _write(tmp_path, m)
    assert "100 % of held-out X-rays (mean over 1 fold;" in text
    assert "<td>–</td>" in text  # undefined AUROC and cross-fitted ECE
