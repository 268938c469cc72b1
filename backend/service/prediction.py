"""What the served version answers for one image: a :class:`Prediction` or a
:class:`PredictionError`. Plain data without torch, so the pre-annotation path and the jobs
that consume answers load light; :mod:`backend.service.predictor` produces them."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Prediction", "PredictionError"]


@dataclass(frozen=True)
class Prediction:
    """One image's answer from the served version. Shared through the cache: read-only."""

    label: str
    """The class with the highest ensemble probability."""
    probs: dict[str, float]
    """Ensemble mean of the temperature-scaled softmax, per class."""
    score: float
    """Ranking score in [0, 1]: ascending = most uncertain first
    (:mod:`backend.service.ranking`)."""
    uncertainty: dict[str, float]
    """entropy (nats), normalized_entropy, margin, max_softmax, bald (nats; 0 for one model)."""
    model_version: str
    content_hash: str
    """sha256 of the image file bytes."""
    centre_px: tuple[float, float] | None = None
    """Where the valve is, ``(x, y)`` in pixels of the original image (x = column), or None
    when the version could not tell."""
    image_size_px: tuple[int, int] | None = None
    """``(width, height)`` of the original image, the frame of ``centre_px``."""
    centre_source: str | None = None
    """``locator`` (a locate-then-classify version's locator) or ``saliency`` (the peak of the
    classifier's Grad-CAM map, for whole-image versions)."""
    novelty: float | None = None
    """How unlike every learned valve model the X-ray looks: the fraction of the labelled
    X-rays (out of fold) it is more unusual than; None if the version has no novelty model."""
    unfamiliar: bool = False
    """Novelty at or above the version's flag quantile (0.90): possibly a valve model the
    version never learned ("Other valve"); such X-rays lead the review queue."""
    settings: dict[str, tuple[str, float]] = field(default_factory=dict)
    """Per valve model the version reads the setting of: its most probable setting (a value
    of the config's scale) and that probability. Empty when the version reads none."""

    @property
    def setting(self) -> tuple[str, float] | None:
        """The setting read under the proposed valve model, with its probability; or None."""
        return self.settings.get(self.label)


@dataclass(frozen=True)
class PredictionError:
    """Why one input got no prediction (the rest of the batch is unaffected)."""

    reason: str
    content_hash: str | None = None
