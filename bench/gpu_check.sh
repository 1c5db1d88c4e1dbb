#!/usr/bin/env bash
# Every GPU check of this project in one run, as the README's "On a GPU" figures were taken (about 7 minutes on
# an H200): the CUDA tests, then `python -m msa.bench` for the paper preset (eager bf16 with every section,
# compiled bf16 per batch size with a profile, fp32 as the reference ran) and the clip-vit-b32 preset. Last, as
# such a machine has more cores than the development one, sharding's throughput against 1, 2, 4, ... worker
# processes on a JSONL corpus (read in parts by the workers), and the driver's share of reading 100,000
# records (bench/bench_shards.py --scaling, about two minutes), in tmpfs when it has room.
#
#   bench/gpu_check.sh [OUT]     logs and JSON reports into OUT (default: gpu-check/); PYTHON picks the interpreter
#
# Each step has its own time limit, so a step that fails or hangs leaves the others' figures.
set -u
out=${1:-gpu-check}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
bench="$py -m msa.bench --bf16 --channels-last"

step() {
    local limit=$1 name=$2
    shift 2
    echo "=== $name (limit ${limit}s) $(date +%T): $*"
    timeout "$limit" "$@"
    echo "=== $name rc=$? $(date +%T)"
}

{
    nvidia-smi
    "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
    step 150 eager $bench --batch-sizes 32,256 --loader-workers 0,1,4 --naive-budget-s 20 --json "$out/eager.json"
    for b in 32 256; do
        step 180 "compiled-b$b" $bench --batch-sizes "$b" --compile --profile --sections train --json "$out/compiled-b$b.json"
    done
    step 130 gpu-tests "$py" -m pytest -p no:cacheprovider tests/test_gpu.py -q
    step 45 fp32 "$py" -m msa.bench --batch-sizes 32 --no-bf16 --sections train,mscmat --naive-budget-s 10 \
        --json "$out/fp32.json"
    step 50 clip "$py" -m msa.bench --bf16 --preset clip-vit-b32 --batch-sizes 32,256 --sections train \
        --json "$out/clip.json"
    shm=$(df --output=avail -k /dev/shm 2>/dev/null | tail -1)
    work=$([ "${shm:-0}" -gt 2000000 ] && echo /dev/shm || echo "${TMPDIR:-/tmp}")
    step 180 shard-scaling "$py" bench/bench_shards.py --like rsicd --n 20000 --jsonl --work "$work" --repeat 2 \
        --workers 4 --scaling --annotations 100000 --json
} 2>&1 | tee "$out/log.txt"
