"""Which part of the fast path moves a trained Lite0's answers: bf16 weights, autocast, channels_last?"""
import sys, tempfile
from pathlib import Path
import numpy as np
import torch
torch.set_num_threads(2)
from benchmarks.bench_predict import _evaluation_pngs, _trained_versions, PredictOptions, _torch_threads
from benchmarks.fixtures import train_quadrant_version
import backend.predictor as bp
from backend.predictor import Predictor, Prediction

images = _evaluation_pngs(48, np.random.default_rng(1))
from benchmarks.fixtures import class_names
NAMES = class_names()
def probs(pred):
    rs = pred.predict(images)
    return np.array([[r.probs.get(c, 0.0) for c in NAMES[:4]] for r in rs])
work = Path(tempfile.mkdtemp())
for i, v in enumerate(_trained_versions(PredictOptions(), False)[1:]):
    md = work / f"m{i}"
    with _torch_threads(1):
        train_quadrant_version(md, work, n_images=64, epochs=8, recipe=v.recipe)
    with Predictor(md, device="cpu", fast_path=False) as p: ref = probs(p)
    with Predictor(md, device="cpu", fast_path=True) as p: full = probs(p)
    keep = bp._keep_weights_in_autocast_dtype
    bp._keep_weights_in_autocast_dtype = lambda m: None
    with Predictor(md, device="cpu", fast_path=True) as p: autocast_only = probs(p)
    import training.inference as ti
    orig = ti.autocast_for
    bp._keep_weights_in_autocast_dtype = keep
    for name, x in [("full fast path", full), ("autocast, fp32 weights", autocast_only)]:
        agree = (x.argmax(1) == ref.argmax(1)).sum()
        y = np.arange(48) % 4
        acc = lambda q: (q.argmax(1) == y).mean()
        print(v.name, "|", name, f"| acc fast {acc(x):.3f} fp32 {acc(ref):.3f}",  f"| top-1 {agree}/48 | max |dp| {np.abs(x-ref).max():.4f} | mean {np.abs(x-ref).mean():.5f}", flush=True)
