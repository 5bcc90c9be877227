#!/usr/bin/env bash
# One prepared check of sqa-search on a GPU (about 8 minutes on one H100/H200-class GPU):
#   install on the machine's own torch build, `sqa-search doctor`, the CUDA tests, the SQA paper's
#   Table 3 setup (bench: prefill at 32k and 131k, train at 32k, decode at 32k and 131k), a 4-trial
#   study of paper_dense.yaml with a small training budget, recommend + export + the exported module
#   run on the GPU, and a cost-model calibration for this GPU (its held-out error, and the H200
#   datasheet profile's error on the same points before calibration).
#
# Usage, from the repository root:
#   benchmarks/gpu_check.sh                 # on a GPU machine
#   benchmarks/gpu_check.sh --dry-run       # every step on the CPU with small sizes (minutes): a rehearsal
#   benchmarks/gpu_check.sh --out DIR       # where to write (default benchmarks/<date>-<gpu>/)
#   benchmarks/gpu_check.sh --no-install    # use the installed sqa-search as is
#
# Everything lands in the output folder: one <step>.txt per step (command and output), bench
# CSVs/plots, doctor.json, the study, recommend.json, the export, the calibrated profile, and
# steps.tsv (step, exit status, seconds). A failed step is recorded and the next one runs; the
# script exits 1 if any step failed.
set -uo pipefail

DRY=0
INSTALL=1
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --no-install) INSTALL=0 ;;
    --out) OUT="$2"; shift ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $1 (allowed: --dry-run, --out DIR, --no-install)" >&2; exit 2 ;;
  esac
  shift
done

cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python}

if [ "$DRY" = 1 ]; then
  DEVICE=cpu; DTYPE=float32; GPU=cpu-dryrun
  PREFILL_N=512,1k; TRAIN_N=512; DECODE_N=512,1k
  BENCH_EXTRA=(--threads 1 --budget-s 0.3 --passes 1)
  DOCTOR_EXTRA=(--quick)
  CAL_PROFILE=cpu-generic; CAL_EXTRA=(--repeats 1 --passes 1 --threads 1)
  STUDY_DEVICE=cpu; STUDY_N=512; TRAIN_TOKENS=8192; TRAIN_SEQ=128; TRAIN_BATCH=4; N_LAYERS=2
  RUN_N=512
else
  DEVICE=cuda; DTYPE=bfloat16
  GPU=$($PY -c "import torch; print(torch.cuda.get_device_name(0))" 2>/dev/null | tr 'A-Z' 'a-z' | tr -cs 'a-z0-9' '-' | sed 's/-$//')
  [ -n "$GPU" ] || { echo "gpu_check.sh: no CUDA device visible to torch (use --dry-run on a CPU)" >&2; exit 2; }
  PREFILL_N=32k,128k; TRAIN_N=32k; DECODE_N=32k,128k
  BENCH_EXTRA=(--budget-s 1)
  DOCTOR_EXTRA=()
  CAL_PROFILE=h200; CAL_EXTRA=(--repeats 3 --passes 2)
  STUDY_DEVICE=cuda; STUDY_N=32768; TRAIN_TOKENS=1048576; TRAIN_SEQ=1024; TRAIN_BATCH=16; N_LAYERS=8
  RUN_N=32768
fi
OUT=${OUT:-benchmarks/$(date -u +%F)-$GPU}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
export SQA_SEARCH_CACHE="$OUT/cache"  # fresh timings and profiles, nothing from earlier runs
export PYTHONDONTWRITEBYTECODE=1  # no __pycache__ in the exported folder
printf 'step\texit\tseconds\n' > "$OUT/steps.tsv"
FAILED=0

step() {  # step NAME COMMAND...: run it, tee its output to NAME.txt, record exit status and time
  local name=$1; shift
  local t0=$SECONDS
  echo "=== $name: $*"
  { echo "\$ $*"; "$@"; } 2>&1 | tee "$OUT/$name.txt"
  local rc=${PIPESTATUS[0]}
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >> "$OUT/steps.tsv"
  [ "$rc" = 0 ] || { FAILED=1; echo "=== $name FAILED (exit $rc)"; }
}

# 1. install on the torch already here (pip keeps an installed torch that satisfies torch>=2.5)
$PY -c "import torch" 2>/dev/null || { echo "gpu_check.sh: install the torch build for this machine first" >&2; exit 2; }
step environment $PY -c "import torch, platform; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'devices', torch.cuda.device_count(), [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())], \
'python', platform.python_version())"
[ "$INSTALL" = 1 ] && step install $PY -m pip install -q -e ".[test]"

# 2. doctor: every path, kernel and the timing itself on this device
step doctor sqa-search doctor --device "$DEVICE" "${DOCTOR_EXTRA[@]}" --json "$OUT/doctor.json"

# 3. the CUDA tests (skipped, and so reported, without CUDA)
step cuda-tests $PY -m pytest -q -m gpu -p no:cacheprovider tests

# 4. the paper's Table 3 setup: d=256, H=16; MHA, GQA, SQA, sSQA, xSQA, SW-SQA (W=128), Flex-SQA (SQA heads, W=128, 16 global)
VARIANTS=mha,gqa,sqa,ssqa,xsqa,swsqa,8/4/128/16
BENCH=(sqa-search bench --device "$DEVICE" --dtype "$DTYPE" --d-model 256 --heads 16 --variants "$VARIANTS" --window 128 --no-progress)
step bench-prefill "${BENCH[@]}" --mode prefill --seq-lens "$PREFILL_N" "${BENCH_EXTRA[@]}" --out "$OUT/bench-prefill"
step bench-train "${BENCH[@]}" --mode train --seq-lens "$TRAIN_N" "${BENCH_EXTRA[@]}" --out "$OUT/bench-train"
step bench-decode "${BENCH[@]}" --mode decode --seq-lens "$DECODE_N" "${BENCH_EXTRA[@]}" --out "$OUT/bench-decode"

# 5. a 4-trial study of paper_dense.yaml with a small training budget (a derived copy of the space)
SPACE="$OUT/paper_dense_check.yaml"
step study-space $PY - "$SPACE" "$DEVICE" "$DTYPE" "$STUDY_N" "$STUDY_DEVICE" "$TRAIN_TOKENS" "$TRAIN_SEQ" "$TRAIN_BATCH" "$N_LAYERS" <<'PYEOF'
import sys, yaml
out, device, dtype, n, train_device, tokens, seq, batch, layers = sys.argv[1:]
space = yaml.safe_load(open("search_spaces/paper_dense.yaml"))
space["name"] = "gpu_check"
space["model"]["n_layers"] = int(layers)
space["target"].update(device=device, dtype=dtype, seq_len=[int(n)])
space["training"].update(device=train_device, dtype=dtype, budget_tokens=int(tokens), seq_len=int(seq),
                         batch_size=int(batch))
space["study"]["trials"] = 4
yaml.safe_dump(space, open(out, "w"), sort_keys=False)
print(yaml.safe_dump(space, sort_keys=False))
PYEOF
step study sqa-search run "$SPACE" --name gpu_check --trials 4 --studies-dir "$OUT/studies" --no-progress
step recommend sqa-search recommend --hardware local --study "$OUT/studies/gpu_check" --json
step export sqa-search export --study "$OUT/studies/gpu_check" --pick knee --out "$OUT/export" --weights
step exported-module $PY -I -c "
import sys, time, torch
sys.path.insert(0, '$OUT/export')
from sqa_layer import load, SPEC
dtype = getattr(torch, '$DTYPE')
layer = load('$OUT/export/weights.pt', device='$DEVICE', dtype=dtype)
x = torch.randn(1, $RUN_N, SPEC.d_model, device='$DEVICE', dtype=dtype)
with torch.no_grad():
    y = layer(x)
print(SPEC.label, 'ran', layer.last_backend, 'on', y.device, tuple(y.shape), y.dtype, 'finite', bool(torch.isfinite(y).all()))
assert 'sqa_search' not in sys.modules and torch.isfinite(y).all()
"

# 6. calibrate the cost model for this machine; the report has the datasheet profile's error on the
#    same points before calibration (fit_mape_before) and the held-out error after
step calibrate sqa-search calibrate --profile "$CAL_PROFILE" --device "$DEVICE" --dtype "$DTYPE" \
  "${CAL_EXTRA[@]}" --save
mkdir -p "$OUT/profile" && cp "$SQA_SEARCH_CACHE"/profiles/*.yaml "$OUT/profile/" 2>/dev/null

echo "=== steps (exit status, seconds):"; column -t "$OUT/steps.tsv" 2>/dev/null || cat "$OUT/steps.tsv"
rm -rf "$OUT/cache" "$OUT/studies/gpu_check/ray"  # machine-local caches, not a record
exit "$FAILED"
