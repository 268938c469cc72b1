"""valve-id's backend: ``service/`` (the HTTP service Label Studio talks to), ``loop/`` (when
to train and the jobs around a run) and ``tools/`` (the command line, the importer, the local
stack); ``settings.py`` is read by all three.
"""
