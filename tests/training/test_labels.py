"""The class vocabulary comes from the Label Studio config, and only from there."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from training.shared.errors import LabelConfigError
from training.shared.labels import load_label_config, parse_label_config

ROOT = Path(__file__).resolve().parents[2]
PAPER_CLASSES = ("Codman Hakim", "Codman Certas Plus", "Sophysa Sophy SM8", "proGAV 2.0")


def test_project_config_has_the_papers_four_models_plus_other_and_not_assessable() -> None:
    config = load_label_config(ROOT / "label_config.xml")
    assert config.classes == (*PAPER_CLASSES, "Other valve", "Not assessable")
    assert (config.image_name, config.image_key, config.choices_name) == ("image", "image", "valve")
    assert (config.keypoint_name, config.keypoint_label) == ("valve_centre", "Valve")
    assert len(config.config_hash) == 64


def test_project_config_is_valid_for_label_studio_and_the_keypoint_is_optional() -> None:
    # label-studio-sdk's LabelInterface runs the checks Label Studio runs on a config
    # (its JSON schema, unique names, every toName pointing at a tag).
    from label_studio_sdk.label_interface import LabelInterface

    xml = (ROOT / "label_config.xml").read_text()
    interface = LabelInterface(xml)
    interface.validate()
    assert {c.name: c.tag for c in interface.controls} == {
        "valve": "Choices",
        "valve_centre": "KeyPointLabels",
        "model_note": "TextArea",
        "setting_hakim": "Choices",
        "setting_certas": "Choices",
        "setting_sophy": "Choices",
        "setting_progav": "Choices",
    }
    assert parse_label_config(xml).note_name == "model_note"
    # The class stays required; the keypoint is not (annotators may skip it).
    tags = {el.get("name"): el for el in ET.fromstring(xml).iter() if el.get("name")}
    assert tags["valve"].get("required") == "true"
    assert tags["valve_centre"].get("required") in (None, "false")
    assert tags["valve_centre"].get("toName") == "image"


def test_configs_without_a_keypoint_keep_working() -> None:
    xml = """<View><Image name="xray" value="$img"/>
      <Choices name="valve" toName="xray"><Choice value="x"/><Choice value="y"/></Choices></View>"""
    config = parse_label_config(xml)
    assert config.classes == ("x", "y")
    assert (config.keypoint_name, config.keypoint_label) == (None, None)


def test_the_keypoint_is_the_first_keypointlabels_on_the_classified_image() -> None:
    xml = """<View><Image name="xray" value="$img"/><Image name="other" value="$other"/>
      <KeyPointLabels name="elsewhere" toName="other"><Label value="Ear"/></KeyPointLabels>
      <Choices name="valve" toName="xray"><Choice value="x"/><Choice value="y"/></Choices>
      <KeyPointLabels name="centre" toName="xray"><Label value=" "/><Label value="Valve"/>
        <Label value="Reservoir"/></KeyPointLabels>
      <KeyPointLabels name="second" toName="xray"><Label value="Tip"/></KeyPointLabels></View>"""
    config = parse_label_config(xml)
    assert (config.keypoint_name, config.keypoint_label) == ("centre", "Valve")
    no_label = xml.replace(
        '<Label value=" "/><Label value="Valve"/>\n        <Label value="Reservoir"/>', ""
    )
    assert "Valve" not in no_label
    assert (
        parse_label_config(no_label).keypoint_name,
        parse_label_config(no_label).keypoint_label,
    ) == ("centre", None)


def test_the_model_note_is_a_text_area_of_that_name_on_the_classified_image() -> None:
    base = """<View><Image name="xray" value="$img"/><Image name="other" value="$o"/>
      <Choices name="valve" toName="xray"><Choice value="x"/><Choice value="y"/></Choices>
      {extra}</View>"""
    assert parse_label_config(base.format(extra="")).note_name is None
    elsewhere = '<TextArea name="model_note" toName="other"/>'
    assert parse_label_config(base.format(extra=elsewhere)).note_name is None
    other_name = '<TextArea name="comments" toName="xray"/>'
    assert parse_label_config(base.format(extra=other_name)).note_name is None
    note = '<TextArea name="model_note" toName="xray" editable="true"/>'
    assert parse_label_config(base.format(extra=note)).note_name == "model_note"


def test_a_new_valve_model_in_the_config_becomes_a_class_without_code_change() -> None:
    xml = (ROOT / "label_config.xml").read_text()
    extended = xml.replace(
        '<Choice value="Other valve"',
        '<Choice value="Medtronic Strata"/>\n<Choice value="Other valve"',
    )
    config = parse_label_config(extended)
    assert "Medtronic Strata" in config.classes
    assert config.config_hash != load_label_config(ROOT / "label_config.xml").config_hash


def test_hash_ignores_whitespace_only_changes() -> None:
    xml = (ROOT / "label_config.xml").read_text()
    assert (
        parse_label_config(xml).config_hash == parse_label_config("  " + xml + "\n\n").config_hash
    )


def test_choices_must_point_at_an_image() -> None:
    xml = """<View><Image name="xray" value="$img"/><Text name="t" value="$txt"/>
      <Choices name="other" toName="t"><Choice value="a"/><Choice value="b"/></Choices>
      <Choices name="valve" toName="xray"><Choice value="x"/><Choice value="y"/></Choices></View>"""
    config = parse_label_config(xml)
    assert (config.choices_name, config.image_name, config.image_key) == ("valve", "xray", "img")
    assert config.classes == ("x", "y")


@pytest.mark.parametrize(
    ("xml", "message"),
    [
        ("", "empty"),
        ("<View><Image", "not valid XML"),
        ('<View><Choices name="c" toName="i"><Choice value="a"/></Choices></View>', "<Image>"),
        ('<View><Image name="i" value="$image"/></View>', "<Choices>"),
        (
            '<View><Image name="i" value="$image"/><Choices name="c" toName="x">'
            '<Choice value="a"/><Choice value="b"/></Choices></View>',
            "toName",
        ),
        (
            '<View><Image name="i" value="image"/><Choices name="c" toName="i">'
            '<Choice value="a"/><Choice value="b"/></Choices></View>',
            "value=",
        ),
        (
            '<View><Image name="i" value="$image"/><Choices name="c" toName="i">'
            '<Choice value="a"/></Choices></View>',
            "at least two",
        ),
        (
            '<View><Image name="i" value="$image"/><Choices name="c" toName="i">'
            '<Choice value="a"/><Choice value="a"/></Choices></View>',
            "unique",
        ),
    ],
)
def test_unusable_configs_get_a_clear_error(xml: str, message: str) -> None:
    with pytest.raises(LabelConfigError, match=message):
        parse_label_config(xml)


def test_missing_file_is_a_label_config_error(tmp_path: Path) -> None:
    with pytest.raises(LabelConfigError, match="cannot read"):
        load_label_config(tmp_path / "nope.xml")


def test_each_valve_model_has_one_reading_guide_shown_only_when_it_is_chosen() -> None:
    """docs/READING_GUIDES.md: a guide is a view that Label Studio shows while its model is
    the ``valve`` choice; it names its source and says what of it was checked against that
    source and what was not."""
    config = load_label_config(ROOT / "label_config.xml")
    guides = [
        el
        for el in ET.fromstring((ROOT / "label_config.xml").read_text()).iter()
        if el.tag == "View" and el.get("visibleWhen") == "choice-selected"
    ]
    assert all(g.get("whenTagName") == config.choices_name for g in guides)
    shown_for = [g.get("whenChoiceValue") for g in guides]
    assert sorted(shown_for) == sorted(PAPER_CLASSES)  # not "Other valve", "Not assessable"
    for guide in guides:
        text = " ".join(el.get("value") or "" for el in guide.iter())
        assert "Instructions for Use" in text
        assert "Checked against the IFU:" in text and "Not yet verified against the IFU:" in text
        assert "Scale:" in text and "On the X-ray:" in text
        (picture,) = [el for el in guide.iter() if el.tag == "Image"]
        assert picture.get("value", "").startswith("/data/local-files/?d=valve-id-guides/")
        assert "$" not in text  # a "$word" would become a task data key in Label Studio


def test_guide_images_do_not_change_which_image_is_classified() -> None:
    xml = """<View><Image name="guide" value="/data/local-files/?d=g/a.png"/>
      <Image name="xray" value="$img"/>
      <Choices name="valve" toName="xray"><Choice value="x"/><Choice value="y"/></Choices>
      <View visibleWhen="choice-selected" whenTagName="valve" whenChoiceValue="x">
        <Image name="guide_x" value="/data/local-files/?d=g/x.png"/></View></View>"""
    config = parse_label_config(xml)
    assert (config.image_name, config.image_key) == ("xray", "img")


def test_each_paper_model_has_its_setting_scale_lowest_first() -> None:
    config = load_label_config(ROOT / "label_config.xml")
    scales = {s.valve: s for s in config.settings}
    assert tuple(scales) == PAPER_CLASSES
    assert scales["Codman Hakim"].values == tuple(str(v) for v in range(30, 201, 10))
    assert scales["Codman Certas Plus"].values == tuple(str(v) for v in range(1, 9))
    assert scales["Sophysa Sophy SM8"].values == tuple(str(v) for v in range(1, 9))
    assert scales["proGAV 2.0"].values == tuple(str(v) for v in range(21))
    assert config.setting_scale("proGAV 2.0").name == "setting_progav"
    assert config.setting_scale("Other valve") is None
    # The valve classes are still the first <Choices>, not a scale's values.
    assert config.choices_name == "valve" and "30" not in config.classes


SCALED = """<View><Image name="xray" value="$img"/>
  <Choices name="valve" toName="xray"><Choice value="x"/><Choice value="y"/></Choices>
  {extra}</View>"""


def test_a_setting_scale_is_a_choices_shown_only_for_one_valve_model() -> None:
    shown = (
        '<Choices name="sx" toName="xray" visibleWhen="choice-selected" whenTagName="valve" '
        'whenChoiceValue="x"><Choice value="low"/><Choice value="high"/></Choices>'
    )
    always = (
        '<Choices name="quality" toName="xray"><Choice value="ok"/><Choice value="bad"/></Choices>'
    )
    config = parse_label_config(SCALED.format(extra=shown + always))
    assert [(s.valve, s.name, s.values) for s in config.settings] == [("x", "sx", ("low", "high"))]
    assert config.setting_scale("y") is None
    assert parse_label_config(SCALED.format(extra=always)).settings == ()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            '<Choices name="s" toName="xray" visibleWhen="choice-selected" whenTagName="valve" '
            'whenChoiceValue="z"><Choice value="1"/><Choice value="2"/></Choices>',
            "not a valve <Choice>",
        ),
        (
            '<Choices name="s" toName="xray" visibleWhen="choice-selected" whenTagName="valve" '
            'whenChoiceValue="x"><Choice value="1"/><Choice value="1"/></Choices>',
            "unique",
        ),
        (
            '<Choices name="s" toName="xray" visibleWhen="choice-selected" whenTagName="valve" '
            'whenChoiceValue="x"><Choice value="1"/><Choice value="2"/></Choices>'
            '<Choices name="t" toName="xray" visibleWhen="choice-selected" whenTagName="valve" '
            'whenChoiceValue="x"><Choice value="1"/><Choice value="2"/></Choices>',
            "two setting",
        ),
    ],
)
def test_a_broken_setting_scale_is_refused_with_what_to_fix(extra: str, message: str) -> None:
    with pytest.raises(LabelConfigError, match=message):
        parse_label_config(SCALED.format(extra=extra))
