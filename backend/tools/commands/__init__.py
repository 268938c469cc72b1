"""Sub-apps of the ``valve-id`` command line, mounted by :mod:`backend.tools.cli`."""
