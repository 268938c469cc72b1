"""Pool-based active-learning simulation: what does the uncertainty-sorted queue save?

``strategies`` (the registry; numpy only), ``config`` (the saved configuration), ``loop``
(train → score → reveal, with the recipe), ``analysis`` (curves, AUC, labels saved) and
``report`` (HTML). Importing this package loads neither torch nor fastai; ``loop`` does.
"""

from training.simulation.config import DEFAULT_STRATEGIES, SimulationConfig
from training.simulation.strategies import STRATEGIES, get_strategy

__all__ = ["DEFAULT_STRATEGIES", "STRATEGIES", "SimulationConfig", "get_strategy"]
