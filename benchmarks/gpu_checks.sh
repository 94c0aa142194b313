#!/usr/bin/env bash
# The single-GPU checks of this project, in one go.
#   bash benchmarks/gpu_checks.sh [OUT_DIR]        # default OUT_DIR: results/gpu
# 1. the local block-attention kernels on CUDA in bf16: every backend self-checked against float64 "math", then
#    forward and forward+backward TFLOP/s beside torch's own SDPA (whole causal sequence, then Attention2D's block
#    of p(1, 2) on a 4x4 grid and of p(1, 1) on a 2x3 grid, the re-strided staircase);
# 2. experiment=smoke_gpu: the tiny model for a few bf16 steps;
# 3. GPT-3 760M at seq 8K on this one GPU (grid 1x1, local attention): tokens/s and MFU against the H100 SXM
#    peak of conf/hardware/h100_1gpn.yaml (pass hardware=a100_4gpn on an A100).
# Every step writes its record under OUT_DIR; the summary at the end prints what each measured.
set -euo pipefail
out="${1:-results/gpu}"
hw="${HARDWARE:-h100_1gpn}"
mkdir -p "$out"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: these checks need one GPU')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.txt"

kernels="--device cuda --dtype bfloat16 --heads 32 --head-dim 128 --causal --out $out/bench_kernels.jsonl"
python benchmarks/bench_kernels.py --seq 16384 $kernels | tee "$out/bench_kernels.txt"
python benchmarks/bench_kernels.py --seq 65536 --block 4,4,1,2 $kernels | tee -a "$out/bench_kernels.txt"
python benchmarks/bench_kernels.py --seq 49152 --block 2,3,1,1 $kernels | tee -a "$out/bench_kernels.txt"

python -m attn2d.train experiment=smoke_gpu hardware="$hw" hydra.run.dir="$out/smoke_gpu"
python -m attn2d.train model=gpt3_760m attention=local grid=1x1 benchmark=gpu benchmark.seq_len=8192 \
    hardware="$hw" hydra.run.dir="$out/gpt3_760m_seq8k"

python - "$out" <<'EOF'
import statistics, sys
from pathlib import Path
from attn2d.records import read_record
for path in sorted(Path(sys.argv[1]).glob("*/metrics.jsonl")):
    rec = read_record(path)
    steps = rec.steps
    med = lambda k: statistics.median(s[k] for s in steps) if steps and steps[0].get(k) is not None else None
    print(f"{path.parent.name}: status {rec.status}, {len(steps)} timed steps, median step {med('step_time_s')} s, "
          f"tokens/s {med('tokens_per_s')}, TFLOP/s per GPU {med('tflops_per_gpu')}, MFU {med('mfu')}, "
          f"max mem {med('max_mem_gib')} GiB")
EOF
