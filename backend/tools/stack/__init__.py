"""The local stack behind ``valve-id up`` / ``down`` / ``status`` (no Docker).

One module per part: :mod:`~backend.tools.stack.processes` (child processes by PID file),
:mod:`~backend.tools.stack.redis_server`, :mod:`~backend.tools.stack.labelstudio_server` (its own
virtualenv, data dir, start), :mod:`~backend.tools.stack.bootstrap` (the project inside Label
Studio, idempotent) and :mod:`~backend.tools.stack.local` (the order of things, the state dir).
The end-to-end tests drive the same modules against a real Label Studio.
"""
