"""A version proposes only the settings it has shown it can read out of fold."""

from __future__ import annotations

from training.shared.setting_gate import MIN_EXACT, MIN_SCORED, proposed_settings


def test_only_models_read_well_on_enough_x_rays_are_proposed() -> None:
    metrics = {
        "settings": {
            "well read": {"n": MIN_SCORED, "exact": MIN_EXACT},
            "guessed": {"n": 50, "exact": 0.12},
            "too few": {"n": MIN_SCORED - 1, "exact": 1.0},
        }
    }
    assert proposed_settings(metrics) == {"well read"}
    # Versions without setting metrics (older ones, whole-image ones) propose none.
    assert proposed_settings({}) == frozenset()
    assert proposed_settings(None) == frozenset()
