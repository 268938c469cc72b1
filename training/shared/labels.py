"""The valve class vocabulary, read from the Label Studio labeling config.

``label_config.xml`` is the single source of the class list: a project that adds a
``<Choice>`` for a new valve model and labels examples gets a model that knows it, with no
code change (the paper's main stated limitation was its fixed four classes). Every model
version records the classes it was trained on; the backend checks a project's config
against them.

An optional ``<KeyPointLabels>`` on the image lets the annotator mark where the valve is
(:attr:`LabelConfig.keypoint_name`); configs without one keep working.

A valve model's pressure setting is a further ``<Choices>`` shown only while that model is
chosen (``visibleWhen="choice-selected" whenTagName="<valve choices>"
whenChoiceValue="<model>"``); its ``<Choice>`` values, in config order, are the model's
scale (:class:`SettingScale`). A project that adds a scale for a model gets versions that
learn and propose it, with no code change.
"""

from __future__ import annotations

import hashlib
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from training.shared.errors import LabelConfigError

__all__ = [
    "NOTE_NAME",
    "LabelConfig",
    "SettingScale",
    "load_label_config",
    "parse_label_config",
]

NOTE_NAME = "model_note"
"""``name`` of the ``<TextArea>`` in which a pre-annotation tells the annotator something the
classes cannot say (an X-ray unlike every learned valve model); optional in a config."""

_MAX_CONFIG_BYTES = 1_000_000
"""A labeling config is a few hundred bytes; refuse anything absurdly large."""


@dataclass(frozen=True)
class SettingScale:
    """The pressure settings of one valve model, as the labeling config lists them."""

    valve: str
    """The valve model (a class of the valve ``<Choices>``) this scale belongs to."""
    name: str
    """``name`` of its ``<Choices>`` tag (the ``from_name`` of a setting result)."""
    values: tuple[str, ...]
    """Its ``<Choice>`` values in config order: the scale, lowest setting first, so that
    neighbouring values are one step apart."""


@dataclass(frozen=True)
class LabelConfig:
    """What valve-id needs from a labeling config."""

    image_name: str
    """``name`` of the ``<Image>`` tag (the ``to_name`` of predictions)."""
    image_key: str
    """Task data key holding the image URL (``value="$image"`` → ``image``)."""
    choices_name: str
    """``name`` of the ``<Choices>`` tag (the ``from_name`` of predictions)."""
    classes: tuple[str, ...]
    """Choice values in config order: the class vocabulary, index = class id."""
    config_hash: str
    """sha256 of the whitespace-normalised XML, recorded with every model version."""
    keypoint_name: str | None = None
    """``name`` of the first ``<KeyPointLabels>`` whose ``toName`` is that image (the
    ``from_name`` of a valve-centre result); None when the config has none."""
    keypoint_label: str | None = None
    """Its first ``<Label value>`` (what a valve-centre result carries in
    ``keypointlabels``); None without a keypoint tag or label."""
    note_name: str | None = None
    """:data:`NOTE_NAME` when the config has that ``<TextArea>`` on the image, else None."""
    settings: tuple[SettingScale, ...] = ()
    """The valve models' setting scales, in config order; at most one per model."""

    def setting_scale(self, valve: str) -> SettingScale | None:
        """The setting scale of ``valve``, or None when the config asks for none."""
        return next((s for s in self.settings if s.valve == valve), None)


def _find_one(root: ET.Element, tag: str) -> ET.Element:
    found = [el for el in root.iter() if el.tag.lower() == tag.lower()]
    if not found:
        raise LabelConfigError(f"the labeling config has no <{tag}> tag; valve-id needs one")
    return found[0]


def parse_label_config(xml: str) -> LabelConfig:
    """Parse a Label Studio config; raise :class:`LabelConfigError` if it cannot serve us.

    Uses the first ``<Choices>`` whose ``toName`` is an ``<Image>``; its ``<Choice value>``s
    become the classes (duplicates and empty values are refused). The first
    ``<KeyPointLabels>`` pointing at the same image, if any, is the valve-centre keypoint.
    """
    if not xml or not xml.strip():
        raise LabelConfigError("the labeling config is empty")
    if len(xml.encode("utf-8", "replace")) > _MAX_CONFIG_BYTES:
        raise LabelConfigError("the labeling config is larger than 1 MB")
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise LabelConfigError(f"the labeling config is not valid XML: {exc}") from None

    images = {el.get("name"): el for el in root.iter() if el.tag.lower() == "image"}
    if not images:
        _find_one(root, "Image")
    choices_tags = [el for el in root.iter() if el.tag.lower() == "choices"]
    if not choices_tags:
        _find_one(root, "Choices")
    choices = next((c for c in choices_tags if c.get("toName") in images), None)
    if choices is None:
        raise LabelConfigError("no <Choices> tag points (toName) at an <Image> tag")
    image = images[choices.get("toName")]

    value = image.get("value", "")
    if not value.startswith("$") or len(value) < 2:
        raise LabelConfigError('the <Image> tag needs value="$<data key>", e.g. value="$image"')
    classes = tuple(
        (el.get("value") or "").strip() for el in choices.iter() if el.tag.lower() == "choice"
    )
    if len(classes) < 2:
        raise LabelConfigError("the <Choices> tag needs at least two <Choice> values")
    if any(not c for c in classes):
        raise LabelConfigError("every <Choice> needs a non-empty value")
    if len(set(classes)) != len(classes):
        raise LabelConfigError("the <Choice> values must be unique")

    keypoints = next(
        (
            el
            for el in root.iter()
            if el.tag.lower() == "keypointlabels"
            and choices.get("toName") in (el.get("toName") or "").split(",")
            and el.get("name")
        ),
        None,
    )
    keypoint_label = None
    if keypoints is not None:
        keypoint_label = next(
            (
                (el.get("value") or "").strip()
                for el in keypoints.iter()
                if el.tag.lower() == "label" and (el.get("value") or "").strip()
            ),
            None,
        )

    note = next(
        (
            el
            for el in root.iter()
            if el.tag.lower() == "textarea"
            and el.get("name") == NOTE_NAME
            and choices.get("toName") in (el.get("toName") or "").split(",")
        ),
        None,
    )

    settings = _setting_scales(choices_tags, choices, classes)
    normalised = " ".join(xml.split())
    return LabelConfig(
        image_name=str(image.get("name")),
        image_key=value[1:],
        choices_name=str(choices.get("name")),
        classes=classes,
        config_hash=hashlib.sha256(normalised.encode("utf-8")).hexdigest(),
        keypoint_name=None if keypoints is None else str(keypoints.get("name")),
        keypoint_label=keypoint_label,
        note_name=None if note is None else NOTE_NAME,
        settings=settings,
    )


def _setting_scales(
    choices_tags: list[ET.Element], valve: ET.Element, classes: tuple[str, ...]
) -> tuple[SettingScale, ...]:
    """The ``<Choices>`` shown only while one valve model is chosen: that model's scale."""
    scales: list[SettingScale] = []
    for tag in choices_tags:
        if tag is valve or tag.get("visibleWhen") != "choice-selected":
            continue
        if tag.get("whenTagName") != valve.get("name"):
            continue
        model = (tag.get("whenChoiceValue") or "").strip()
        name = tag.get("name") or ""
        where = f"setting <Choices name={name!r}>"
        if model not in classes:
            raise LabelConfigError(
                f"{where} is shown for {model!r}, which is not a valve <Choice>; "
                "set whenChoiceValue to one valve model"
            )
        if not name:
            raise LabelConfigError(f"the setting <Choices> for {model!r} needs a name")
        if any(s.valve == model for s in scales):
            raise LabelConfigError(f"two setting <Choices> are shown for {model!r}; keep one")
        values = tuple(
            (el.get("value") or "").strip() for el in tag.iter() if el.tag.lower() == "choice"
        )
        if len(values) < 2 or any(not v for v in values) or len(set(values)) != len(values):
            raise LabelConfigError(f"{where} needs at least two non-empty, unique <Choice> values")
        scales.append(SettingScale(valve=model, name=name, values=values))
    return tuple(scales)


def load_label_config(path: str | Path) -> LabelConfig:
    """Read and parse a config file (the project's ``label_config.xml`` by default)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise LabelConfigError(f"cannot read labeling config {path}: {exc.strerror}") from None
    return parse_label_config(text)
