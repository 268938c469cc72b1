"""Fitting a version: the paper's recipe (fastai), locate-then-classify, evaluation, the report,
and the run's stages as RQ jobs. fastai is imported only here, and only where used.
"""
