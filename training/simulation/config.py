"""Everything that defines a simulation, as one saved, reloadable value.

A simulation is reproducible from its ``config.json``: this dataclass (with the recipe it
trains with) plus the data snapshot's hashes. Parameters sit one per line with a comment
(nanoGPT style), like :class:`training.fitting.config.RecipeConfig`. fastai-free, so the command
line
can build and check a configuration before anything heavy is imported.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from training.fitting.config import RecipeConfig
from training.simulation.strategies import STRATEGIES

__all__ = ["DEFAULT_STRATEGIES", "SimulationConfig"]

DEFAULT_STRATEGIES: tuple[str, ...] = ("random", "entropy", "margin", "bald", "coreset")
"""The baseline, the paper's measure, two other acquisitions and one batch-aware strategy."""


@dataclass(frozen=True)
class SimulationConfig:
    """A pool-based active-learning simulation; defaults are the CPU demo's."""

    data: str  # manifest.csv, its folder, or labelstudio:<project id> (as given)
    strategies: tuple[str, ...] = DEFAULT_STRATEGIES  # names in training.simulation.STRATEGIES
    seeds: int = 3  # replicates per strategy: seed set, training seeds and random picks differ
    budget: int = 120  # total labels, the seed set included (the curves end here)
    batch_size: int = 20  # labels revealed per round (k)
    seed_size: int = 20  # stratified, patient-grouped initial labelled set
    test_fraction: float = 0.25  # patient-grouped held-out test share, never seen by a strategy
    members: int = 1  # models trained per round (an ensemble, like the served folds)
    mc_passes: int = 20  # MC-dropout passes of the head for BALD when members == 1
    seed: int = 0  # base seed: test split; replicate r derives its own seeds from (seed, r)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)  # how each round trains

    def __post_init__(self) -> None:
        object.__setattr__(self, "strategies", tuple(self.strategies))
        unknown = [s for s in self.strategies if s not in STRATEGIES]
        if unknown:
            raise ValueError(f"unknown strategies {unknown}; choose from {', '.join(STRATEGIES)}")
        if not self.strategies or len(set(self.strategies)) != len(self.strategies):
            raise ValueError(f"strategies must be distinct and non-empty: {self.strategies}")
        for name in ("seeds", "batch_size", "seed_size", "members"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.budget <= self.seed_size:
            raise ValueError(
                f"budget ({self.budget}) must exceed the seed set ({self.seed_size}): "
                "otherwise no strategy ever picks anything"
            )
        if not 0.0 < self.test_fraction < 0.5:
            raise ValueError(f"test_fraction must be in (0, 0.5), got {self.test_fraction}")
        if self.members == 1 and self.mc_passes < 2 and "bald" in self.strategies:
            raise ValueError("BALD needs disagreement: members >= 2 or mc_passes >= 2")

    @property
    def rounds(self) -> int:
        """Acquisition rounds: ``ceil((budget - seed_size) / batch_size)``."""
        return -(-(self.budget - self.seed_size) // self.batch_size)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["strategies"] = list(self.strategies)
        data["recipe"] = self.recipe.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SimulationConfig:
        """Rebuild from :meth:`to_dict`'s output (a saved ``config.json``'s ``simulation``)."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown simulation settings: {sorted(unknown)}")
        values = dict(data)
        values["strategies"] = tuple(values.get("strategies", DEFAULT_STRATEGIES))
        values["recipe"] = RecipeConfig.from_dict(values.get("recipe", {}))
        return cls(**values)

    def with_overrides(self, **changes: Any) -> SimulationConfig:
        return replace(self, **changes)
