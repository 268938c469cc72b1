"""A run's out-of-fold setting metrics: each X-ray read in its true model's block."""

from __future__ import annotations

import numpy as np

from training.fitting.run import _setting_metrics


def test_settings_are_read_in_the_true_model_s_block_of_the_logits() -> None:
    plan = {
        "classes": ["A", "B"],
        "settings": [
            {"valve": "B", "name": "sb", "values": ["x", "y"]},
            {"valve": "A", "name": "sa", "values": ["1", "2", "3"]},
        ],
        "snapshot": [{"setting": "2"}, {"setting": "3"}, {"setting": "y"}, {"setting": None}],
    }
    # Columns: B's block (x, y), then A's block (1, 2, 3).
    readings = np.array(
        [
            [9, 0, 0, 5, 0],  # A: read "2" (B's larger logit is outside A's block)
            [0, 0, 9, 0, 0],  # A: read "1", labelled "3"
            [0, 4, 9, 9, 9],  # B: read "y"
            [1, 0, 0, 0, 0],  # A without a labelled setting
        ],
        dtype=float,
    )
    found = _setting_metrics(plan, np.array([0, 0, 1, 0]), readings)
    assert found["A"]["n"] == 2 and found["A"]["exact"] == 0.5
    assert found["A"]["confusion"] == [[0, 0, 0], [0, 1, 0], [1, 0, 0]]
    assert found["B"]["n"] == 1 and found["B"]["exact"] == 1.0
