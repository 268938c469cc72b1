"""What a published version needs to answer, shared by training and serving.

Decoding, the one preprocessing function, the class vocabulary, the network, batched
inference, uncertainty, the registry and the version contract, the loop's Redis keys. Nothing
here imports fastai or another ``training`` folder except :mod:`training.shared` itself
(tests/test_import_rules.py holds that boundary): the backend's service imports only this
and :mod:`training.labelstudio`.
"""
