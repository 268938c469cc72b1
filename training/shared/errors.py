"""The one exception family of valve-id.

Every error valve-id raises on purpose derives from :class:`ValveIdError`, so a caller
(the CLI, an RQ job, the HTTP backend) can catch the root and turn it into a clear message
for *that* item while the rest of the batch goes on::

    ValveIdError
    ├── ImageDecodeError            an X-ray file cannot be turned into a grayscale image
    │   └── UnsupportedImageError   valid file, but a kind we refuse (multi-frame, codec, ...)
    ├── LabelConfigError            a Label Studio config without the tags valve-id needs
    ├── DatasetError                a dataset / manifest that cannot be used as given
    ├── ImageFetchError             a task's image URL is refused or cannot be fetched
    ├── ModelLoadError              a weights/checkpoint file that cannot become a model
    ├── LabelStudioError            Label Studio refused a call or could not be reached
    ├── StackError                  the local stack (``valve-id up``) cannot start or stop a part
    └── RegistryError               the model registry refuses an operation (bad id, incomplete
        │                           version, nothing to roll back to)
        └── ModelNotFound           no such model version, or no current one

Messages are written for the person who handed in the input: what is wrong and, where it
helps, what to do. They never contain patient data.
"""

from __future__ import annotations

__all__ = [
    "DatasetError",
    "ImageDecodeError",
    "ImageFetchError",
    "LabelConfigError",
    "LabelStudioError",
    "ModelLoadError",
    "ModelNotFound",
    "RegistryError",
    "StackError",
    "UnsupportedImageError",
    "ValveIdError",
]


class ValveIdError(Exception):
    """Root of every error valve-id raises deliberately."""


class ImageDecodeError(ValveIdError):
    """An input file could not be decoded into a grayscale X-ray.

    Raised for anything that is not a usable DICOM/PNG/JPEG: not an image at all,
    truncated, no pixel data, zero-sized, or too large (decompression bomb).
    ``source`` names the offending file (a path or a short label), never patient data.
    """

    def __init__(self, message: str, source: str | None = None) -> None:
        self.source = source
        super().__init__(f"{source}: {message}" if source else message)


class UnsupportedImageError(ImageDecodeError):
    """A well-formed image of a kind valve-id deliberately does not handle."""


class LabelConfigError(ValveIdError):
    """A Label Studio labeling config lacks the ``<Image>``/``<Choices>`` valve-id needs."""


class DatasetError(ValveIdError):
    """A dataset folder or manifest is missing, malformed or inconsistent."""


class ImageFetchError(ValveIdError):
    """A task's image could not be fetched: a refused URL (foreign host, scheme, path outside
    the local-files root), an HTTP error, a timeout, or a body over the size cap.

    Kept apart from :class:`ImageDecodeError` so the message says whether to fix the URL or
    access (this) or the file itself (that). Messages name the host, never the file path.
    ``transient`` says the host did not answer usefully (unreachable, timeout, 5xx, 408, 429),
    as opposed to a refusal or a missing image: worth trying again later.
    """

    def __init__(self, message: str, *, transient: bool = False) -> None:
        self.transient = transient
        super().__init__(message)


class ModelLoadError(ValveIdError):
    """A checkpoint or pretrained-weights file is missing, truncated, corrupt or mismatched.

    ``source`` names the file, so the message says which one to replace.
    """

    def __init__(self, message: str, source: str | None = None) -> None:
        self.source = source
        super().__init__(f"{source}: {message}" if source else message)


class LabelStudioError(ValveIdError):
    """A call to Label Studio failed: refused (4xx), broken (5xx) or unreachable.

    ``status_code`` is the HTTP status Label Studio answered, or ``None`` when it could not
    be reached. The message names the operation and the status; it never contains the API
    key (tokens travel in headers, which are never put into messages).
    """

    def __init__(self, message: str, status_code: int | None = None) -> None:
        self.status_code = status_code
        super().__init__(message)


class StackError(ValveIdError):
    """``valve-id up``/``down`` could not install, start, reach or stop a part of the local
    stack (Label Studio, Redis, the backend, a worker); the message names the part and its log.
    """


class RegistryError(ValveIdError):
    """The model registry refused an operation (invalid id, incomplete version, ...)."""


class ModelNotFound(RegistryError):
    """The requested model version does not exist (or no version is current)."""
