"""Synthetic skull X-rays with a shunt valve: the stand-in data set for demos and tests.

No real radiographs can ship with valve-id, so this package draws look-alikes of the
paper's data (Vach et al. 2025, Dataset section, Fig. 2/3): one programmable valve per
skull radiograph, written as DICOM files plus a ``manifest.csv``.

The images are meant to be *hard in the right way*. Everything that is not the valve —
skull, exposure, noise, collimation, image size, catheters, side markers and every DICOM
property (photometric interpretation, bit depth, transfer syntax, rescale) — is drawn from
one distribution for all classes, so a classifier only succeeds by looking at the valve.
The valve sits anywhere in the field (sometimes a few pixels from its edge, never cut off:
the paper's inclusion criterion), turned in-plane and tilted out of plane, which is what
made the paper's misclassified examples (Fig. 3) hard.

Each of the four models is drawn at one of its discrete pressure settings (the scale the
labeling config lists), recorded in the manifest.

Modules: :mod:`~training.synthetic.valves` (the four models' geometry and settings, and
"Other valve" devices unlike them),
:mod:`~training.synthetic.xray` (one radiograph, :func:`render_xray`),
:mod:`~training.synthetic.generate` (patients, DICOM, manifest: :func:`generate_dataset`),
:mod:`~training.synthetic.raster` (array helpers).
"""

from __future__ import annotations

from training.synthetic.generate import (
    BALANCED_CLASS_MIX,
    PAPER_CLASS_COUNTS,
    PAPER_CLASS_MIX,
    allocate_class_counts,
    generate_dataset,
)
from training.synthetic.valves import (
    DRAWABLE_CLASSES,
    OTHER_VALVE,
    OTHER_VALVE_GEOMETRIES,
    SETTING_SCALES,
    VALVE_CLASSES,
)
from training.synthetic.xray import (
    DEFAULT_SIZE_RANGE_PX,
    PatientTraits,
    draw_patient_traits,
    render_xray,
)

__all__ = [
    "BALANCED_CLASS_MIX",
    "DEFAULT_SIZE_RANGE_PX",
    "DRAWABLE_CLASSES",
    "OTHER_VALVE",
    "OTHER_VALVE_GEOMETRIES",
    "PAPER_CLASS_COUNTS",
    "PAPER_CLASS_MIX",
    "SETTING_SCALES",
    "VALVE_CLASSES",
    "PatientTraits",
    "allocate_class_counts",
    "draw_patient_traits",
    "generate_dataset",
    "render_xray",
]
