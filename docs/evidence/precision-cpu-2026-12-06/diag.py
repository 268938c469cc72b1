"""Which part of bf16 serving costs accuracy: the locator head, or the classifier?"""
import json, sys, time
from pathlib import Path
import numpy as np
import torch
sys.path.insert(0, "/tmp/prec")
from exp import *  # noqa
import exp
from training.shared.locate_classify import soft_argmax

def run(seed):
    root = Path("/tmp/prec")
    classes = list(VALVE_CLASSES)
    items = load_manifest(root / "demo", classes)
    from collections import defaultdict
    by_class = defaultdict(dict)
    for i, it in enumerate(items):
        by_class[it.label].setdefault(it.group, []).append(i)
    queues = {c: list(p.values()) for c, p in sorted(by_class.items())}
    train = []
    while len(train) < 160 and any(queues.values()):
        for q in queues.values():
            if q and len(train) < 160:
                train += q.pop(0)
    test = [i for i in range(len(items)) if i not in set(train)]
    order = train + test
    cfg = RecipeConfig.from_profile("cpu", design="locate_classify", seed=seed)
    prep = cfg.preprocess_params()
    prepared = prepare_images([items[i] for i in order], prep, root / "cache")
    labels = np.array([classes.index(it.label) for it in prepared.items])
    n = len(train)
    path = root / f"model_s{seed}.pt"
    if path.exists():
        model = torch.load(path, weights_only=False)
    else:
        res = train_two_stage_fold(prepared.arrays, labels, prepared.centres, np.arange(n),
                                   np.arange(n, len(labels)), len(classes), cfg,
                                   device=torch.device("cpu"))
        model = res.model
        torch.save(model, path)
        print("oof acc", float((res.val_logits.argmax(1) == labels[n:]).mean()), flush=True)
    model.eval()
    y = labels[n:]
    true_c = prepared.centres[n:]
    x = to_network_input(torch.from_numpy(prepared.arrays[n:]).float(), prep)
    bf = lambda on: torch.autocast("cpu", dtype=torch.bfloat16, enabled=on)
    out = {}
    with torch.inference_mode():
        with bf(False):
            c32 = model.locate(x)
        with bf(True):
            cbf = model.locate(x)
            feats = model.locator_features(x)
        with bf(False):
            cmix = soft_argmax(model.locator_head(feats.float()))
        for name, c in (("fp32", c32), ("bf16", cbf), ("bf16 body+fp32 head", cmix)):
            err = np.linalg.norm((c.float().numpy() - true_c) * 768, axis=1)
            for cls_prec in ("fp32", "bf16"):
                with bf(cls_prec == "bf16"):
                    logits = model.answer(x, c.float()).logits.float()
                acc = float((logits.argmax(1).numpy() == y).mean())
                out[f"locate {name}, classify {cls_prec}"] = acc
            out[f"locate {name}: median err px"] = float(np.median(err))
            out[f"locate {name}: p95 err px"] = float(np.percentile(err, 95))
            out[f"locate {name}: max err px"] = float(err.max())
        d = np.linalg.norm((cbf.float().numpy() - c32.numpy()) * 768, axis=1)
        out["bf16 vs fp32 centre shift px (median, max)"] = (float(np.median(d)), float(d.max()))
    for k, v in out.items():
        print(k, v, flush=True)

if __name__ == "__main__":
    run(int(sys.argv[1]))
