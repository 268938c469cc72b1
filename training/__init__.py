"""valve-id's training side, in rooms by reason of change (docs/ARCHITECTURE.md):

``shared/`` (what serving needs: decoding, preprocessing, the network, the registry; no
fastai), ``labelstudio/`` (the one Label Studio client and image-fetch policy), ``fitting/``
(the recipes, evaluation, the report, the run as RQ jobs), ``synthetic/`` and ``simulation/``.
Never imports :mod:`backend`.
"""

__version__ = "0.1.0"
