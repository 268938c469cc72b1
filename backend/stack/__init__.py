"""The local stack behind ``valve-id up`` / ``down`` / ``status`` (no Docker).

One module per part: :mod:`~backend.stack.processes` (child processes by PID file),
:mod:`~backend.stack.redis_server`, :mod:`~backend.stack.labelstudio_server` (its own
virtualenv, data dir, start), :mod:`~backend.stack.bootstrap` (the project inside Label
Studio, idempotent) and :mod:`~backend.stack.local` (the order of things, the state dir).
The end-to-end tests drive the same modules against a real Label Studio.
"""
