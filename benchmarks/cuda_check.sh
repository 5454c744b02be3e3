#!/usr/bin/env bash
# The CUDA path end to end, and the GPU numbers of bench_attacks, on a machine with a GPU.
#
#   benchmarks/cuda_check.sh [WORK_DIR]     (python3 with miarobust and its dependencies importable; PYTHON= to pick another)
#
# 1. bench_attacks on the GPU: miarobust's pgd vs torchattacks.PGD, and EOT-PGD K=8 vs torchattacks.EOTPGD,
#    plus the EOT chunk sweep that attacks/eot.default_chunk("cuda") rests on.
# 2. The same deterministic-gate evaluation (clean and PGD) on the CPU and on the GPU: per-image predictions,
#    gate decisions (GMACs) and robust accuracy must agree.
# 3. Every kind of attack through the CLI on cuda: PGD / EOT-PGD / BPDA-PGD / FGSM / PGD-CW / transfer, CW and PGD-L2 on
#    the stochastic MIA model, AutoAttack on the static and deterministic models, apgd-ce with EOT, slowdown.
# 4. Training on cuda, static and MIA (the latency-aware cost, whose table is measured on the GPU), one epoch of
#    synthetic data each: a smoke run, not a number.
# 5. bench_train.py at 224 px in bf16 (miarobust train vs a plain loop, MIA-Former's overhead, the JPEG loader).
# Each step has its own time limit and its exit status is printed; the script's status is the number of failed steps.
set -uo pipefail
work=${1:-runs/cuda-check}
py=${PYTHON:-python3}
dev=${DEVICE:-cuda}  # DEVICE=cpu: a dry run of the script itself on a machine without a GPU
mkdir -p "$work"
failed=0
step() {  # step SECONDS COMMAND...: run with a time limit, print the exit status and seconds
  local limit=$1; shift
  echo; echo "== $*"
  local t0=$SECONDS
  timeout "$limit" "$@"
  local rc=$?
  echo "-- exit $rc after $((SECONDS - t0)) s"
  [ "$rc" -eq 0 ] || failed=$((failed + 1))
  return "$rc"
}
summary() {  # summary RUN_PARENT: accuracy, GMACs share and checks of the newest run there
  $py - "$1" <<'EOF'
import json, sys
from pathlib import Path
s = json.loads(max(Path(sys.argv[1]).glob("*/summary.json"), key=lambda p: p.stat().st_mtime).read_text())
g = s["gmacs"]
print(f"   {s['folder']}: clean {s['clean']['acc']:.3f} at {g['clean_share_of_static']:.3f} of static MACs; "
      f"worst case {s['robust']['acc']:.3f}; {s['wall_seconds']:.1f} s")
for a, r in s["attacks"].items():
    print(f"   {a}: {r['acc']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] {r['label']}, "
          f"{g['adv_share_of_static'][a]:.3f} of static MACs")
print("   checks: " + ", ".join(f"{k} {v['status']}" for k, v in s.get("checks", {}).items()))
EOF
}

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
$py -c "import torch, timm, torchattacks; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'timm', timm.__version__, 'torchattacks', torchattacks.__version__, 'gpus', torch.cuda.device_count())"

# 1. The acceptance numbers: one run, both sides alternating, 1000 images in batches of 500 (4000 EOT rows).
step 240 $py benchmarks/bench_attacks.py --device $dev -n "${BENCH_N:-1000}" --batch-size 500 --steps 10 --reps 3 \
  --chunks 250,500,1000,2000,4000,8192

# 2. CPU and GPU agree on the same evaluation (deterministic gates: no sampling, so the same images must get the
#    same decisions up to float rounding near a threshold).
for d in cpu $dev; do
  step 120 $py -m miarobust run --model mia_vit_fmnist --gate-mode deterministic --attack pgd --eps 2/255 -n 1000 \
    --batch-size 500 --device $d --checks off --out "$work/agree-$d"
done
step 30 $py - "$work" "$dev" <<'EOF'
import sys
from pathlib import Path
import pandas as pd
w = Path(sys.argv[1])
cpu, gpu = (pd.read_csv(next((w / f"agree-{d}").glob("*/samples.csv"))).sort_values("index") for d in ("cpu", sys.argv[2]))
same_pred = (cpu.clean_pred.values == gpu.clean_pred.values).mean()
gm = (cpu.clean_gmacs.values - gpu.clean_gmacs.values)
print(f"clean predictions equal on {same_pred:.4f} of {len(cpu)} images; clean GMACs equal on {(abs(gm) < 1e-9).mean():.4f} "
      f"(max |diff| {abs(gm).max():.3g}); clean acc cpu {cpu.clean_correct.mean():.4f} {sys.argv[2]} {gpu.clean_correct.mean():.4f}; "
      f"PGD robust cpu {cpu.robust.mean():.4f} {sys.argv[2]} {gpu.robust.mean():.4f}")
sys.exit(0 if same_pred >= 0.995 and (abs(gm) < 1e-9).mean() >= 0.99 and abs(cpu.robust.mean() - gpu.robust.mean()) <= 0.02 else 1)
EOF

# 3. The attacks through the CLI on cuda.
run() { step "$1" $py -m miarobust run --device $dev --out "$work/cli" "${@:2}" && summary "$work/cli"; }
run 120 --model mia_vit_fmnist --gate-mode stochastic --attack pgd,eot-pgd,bpda-pgd --eot 4 --eps 8/255 -n 200 --eval-samples 4
run 120 --model mia_vit_fmnist --gate-mode stochastic --attack fgsm,pgd-cw,transfer --eps 8/255 -n 100 --eval-samples 4
run 120 --model mia_vit_fmnist --gate-mode stochastic --attack cw,pgd --norm L2 --eps 0.5 -n 100 --eval-samples 4
run 120 --model mia_vit_fmnist --gate-mode stochastic --attack apgd-ce --eot 4 --eps 8/255 -n 100 --eval-samples 4
run 150 --model vit_fmnist --attack autoattack --eps 8/255 -n 64
run 150 --model mia_vit_fmnist --gate-mode deterministic --attack autoattack --eps 8/255 -n 64
run 120 --model mia_vit_fmnist --gate-mode deterministic --attack slowdown --eps 8/255 -n 200

# 4. Training on cuda, one epoch of synthetic data each.
step 120 $py -m miarobust train --model vit_fmnist --data synthetic --epochs 1 --device $dev --out "$work/train-static"
step 150 $py -m miarobust train --model mia_vit_fmnist --data synthetic --epochs 1 --device $dev --cost latency \
  --budget 0.7 --out "$work/train-mia"

# 5. Training throughput at 224 px in bf16: miarobust train against a plain loop (deit_s), MIA-Former's overhead, and
#    the JPEG loader: the figures README's ImageNet recipe turns into time per epoch.
step 600 $py benchmarks/bench_train.py --device $dev --img-size 224 --batch-size 64 --amp bf16 --reps 3 --jpegs 512

echo; echo "cuda_check: $failed failed step(s)"
exit "$failed"
