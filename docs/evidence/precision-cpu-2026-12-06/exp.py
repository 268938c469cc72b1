"""Scratch: does bf16 autocast (training and/or serving) cost the cpu profile accuracy?

Demo data (240 balanced, seed 0, as `valve-id up`), whole patients ~161 train / 79 test as the
demo seeds them; one locate->classify model per (seed, training precision), each scored on the
79 test images in fp32 and in bf16 autocast (crops at predicted centres, 4 test views)."""
import json, sys, time
from collections import defaultdict
from pathlib import Path
import numpy as np
import torch

from training.fitting.config import RecipeConfig
from training.fitting.two_stage import train_two_stage_fold
from training.shared.dataset import load_manifest, prepare_images
from training.shared.inference import to_network_input
from training.synthetic import BALANCED_CLASS_MIX, VALVE_CLASSES, generate_dataset

def main():
    root = Path("/tmp/prec")
    demo = root / "demo"
    if not (demo / "manifest.csv").exists():
        generate_dataset(demo, 240, 0, class_mix=BALANCED_CLASS_MIX)
    classes = list(VALVE_CLASSES)
    items = load_manifest(demo, classes)
    # whole patients, one class after another (as bootstrap.seed_annotations), to 161
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
    cfg0 = RecipeConfig.from_profile("cpu", design="locate_classify")
    prep = cfg0.preprocess_params()
    prepared = prepare_images([items[i] for i in order], prep, root / "cache")
    assert not prepared.failures
    labels = np.array([classes.index(it.label) for it in prepared.items])
    n_train = len(train)
    print(f"train {n_train} test {len(test)}", flush=True)
    results = json.loads((root / "results.json").read_text()) if (root / "results.json").exists() else []
    device = torch.device("cpu")
    for seed in [int(s) for s in sys.argv[1].split(",")]:
        for trained in sys.argv[2].split(","):
            if any(r["seed"] == seed and r["trained"] == trained for r in results):
                continue
            cfg = RecipeConfig.from_profile("cpu", design="locate_classify", seed=seed,
                                            mixed_precision=(trained == "bf16"))
            t0 = time.perf_counter()
            res = train_two_stage_fold(prepared.arrays, labels, prepared.centres,
                                       np.arange(n_train), np.arange(n_train, len(labels)),
                                       len(classes), cfg, device=device)
            train_s = time.perf_counter() - t0
            model = res.model.eval()
            y = labels[n_train:]
            row = {"seed": seed, "trained": trained, "train_s": round(train_s, 1),
                   "oof_acc": float((res.val_logits.argmax(1) == y).mean())}
            for served in ("fp32", "bf16"):
                probs = []
                with torch.inference_mode():
                    for s in range(n_train, len(labels), 16):
                        x = to_network_input(torch.from_numpy(prepared.arrays[s:s+16]).float(), prep)
                        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=served == "bf16"):
                            out = model.answer(x)
                        probs.append(torch.softmax(out.logits.float(), 1))
                p = torch.cat(probs).numpy()
                row[f"acc_{served}"] = float((p.argmax(1) == y).mean())
                row[f"p_{served}"] = p.round(4).tolist()
            row["agree"] = float((np.array(row["p_fp32"]).argmax(1) == np.array(row["p_bf16"]).argmax(1)).mean())
            row["max_dp"] = float(np.abs(np.array(row["p_fp32"]) - np.array(row["p_bf16"])).max())
            results.append(row)
            (root / "results.json").write_text(json.dumps(results))
            print({k: v for k, v in row.items() if not k.startswith("p_")}, flush=True)

if __name__ == "__main__":
    main()
