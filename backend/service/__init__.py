"""The HTTP service Label Studio talks to: routes and metrics (``app.py``), the predictor,
the one prelabel path, the review ranking and the Label Studio project adapter.
Imports no fastai (tests/test_import_rules.py).
"""
