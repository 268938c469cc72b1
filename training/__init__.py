"""valve-id training side: decoding, preprocessing, datasets, the paper's recipe, jobs.

Never imports :mod:`backend`. Heavy modules (the recipe, fastai) are imported only where used.
"""

__version__ = "0.1.0"
