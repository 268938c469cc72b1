"""Train with bf16 autocast forced (emulated here: no bf16 units), as a bf16 CPU would, then
score in bf16 (serving on that CPU) and in fp32. Same data, split and seed as diag.py."""
import sys, time
from pathlib import Path
import numpy as np
import torch
import training.shared.inference as inference
inference.autocast_dtype = lambda device: torch.bfloat16 if device.type == "cpu" else None
sys.path.insert(0, "/tmp/prec")
import diag
from diag import *  # noqa

seed = int(sys.argv[1])
root = Path("/tmp/prec")
src = root / f"model_s{seed}.pt"
fp32_model = root / f"model_s{seed}_fp32.pt"
if src.exists() and not fp32_model.exists():
    src.rename(fp32_model)
t0 = time.perf_counter()
diag.run(seed)  # trains (bf16 now), saves model_s{seed}.pt, prints the table
print("total s", round(time.perf_counter() - t0), flush=True)
