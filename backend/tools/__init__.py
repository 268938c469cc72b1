"""The operator's tools: the ``valve-id`` command line, its commands, the importer and the
local stack (``make up``).
"""
