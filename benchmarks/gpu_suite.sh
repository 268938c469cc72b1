#!/usr/bin/env bash
# The GPU measurements, in order of what they are worth, each resumable:
#   bash benchmarks/gpu_suite.sh RESULTS_DIR [WORK_DIR]
# 0. the CUDA-only tests (tests/training/test_native_reader.py -k cuda, seconds);
# 1. bench_training --device cuda (recipe vs model-only throughput, ~1 min);
# 2. bench_paper_profile: the paper profile, 959 synthetic X-rays, 5 folds (~10 min on an H200);
# 3. bench_paper_profile --profile cpu on the same data (what `auto` trains on a GPU worker
#    without the ResNet-34 ImageNet file).
# Finished stages are kept in WORK_DIR (default /tmp/valve-id-gpu): when a time limit stops a
# call, run the same command again and it goes on where it stopped. Tables are appended to
# RESULTS_DIR/tables.md, each run's metrics.json/config.json/report.html kept beside them.
# PYTHON chooses the interpreter (default: .venv/bin/python if present, else python3).
set -uo pipefail
cd "$(dirname "$0")/.."
results="${1:?usage: benchmarks/gpu_suite.sh RESULTS_DIR [WORK_DIR]}"
work="${2:-/tmp/valve-id-gpu}"
py="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
export PYTHONUNBUFFERED=1
"$py" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" ||
  { echo "gpu_suite: no CUDA device here; these are GPU measurements" >&2; exit 2; }
mkdir -p "$results" "$work"
# 0. the tests that need CUDA (seconds): a device mix-up fails here, not ten minutes into a run
"$py" -m pytest -q -p no:cacheprovider -m "not slow" tests/training/test_native_reader.py \
  -k cuda 2>&1 | tee "$results/cuda-tests.txt" | tail -3
if [ ! -f "$work/throughput.done" ]; then
  "$py" -m benchmarks.bench_training --device cuda --markdown "$results/tables.md" &&
    touch "$work/throughput.done"
fi
for profile in paper cpu; do
  [ -f "$work/$profile.done" ] && continue
  "$py" -m benchmarks.bench_paper_profile --profile "$profile" --data "$work/data" \
    --workdir "$work/$profile" --keep "$results/$profile" --markdown "$results/tables.md" ||
    exit
  touch "$work/$profile.done"
done
echo "gpu_suite: all done; results in $results"
