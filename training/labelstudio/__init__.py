"""Label Studio as valve-id talks to it: one API client, one image-fetch policy, one retry rule.

Built from Label Studio's URL, an API key, the local-files root and the allowed image hosts,
never from the backend's settings, so the backend, a training run, ``valve-id import`` and
the local stack share it. Imports neither fastai nor :mod:`backend` (the serving path loads
it too); label-studio-sdk is imported on first use.
"""

from training.labelstudio.client import LabelStudio
from training.labelstudio.images import ImageFetcher
from training.labelstudio.retry import NO_RETRY, Retry

__all__ = ["NO_RETRY", "ImageFetcher", "LabelStudio", "Retry"]
