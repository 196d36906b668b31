#!/usr/bin/env bash
# Every GPU-only figure the issues ask for, in one short run on a one-GPU machine (speed first), each step
# bounded so the whole fits a few minutes; results land in bench/results/ (and in $OUT when it is set).
#
#   bash bench/gpu_checks.sh [wheel-dir]
#
# wheel-dir: a folder of wheels to install first (DeepSpeed, fairscale, ...) on a machine that has PyTorch but
# not them; build them where the internet is: `pip wheel --no-deps deepspeed==0.19.8 fairscale==0.4.13 -w wheels`.
set -u
cd "$(dirname "$0")/.."
if [ -n "${1:-}" ]; then
    pip install --no-deps --no-index "$1"/*.whl >/dev/null || echo "installing the wheels in $1 failed"
fi
export PYTHONUNBUFFERED=1
step() {  # step SECONDS COMMAND...: run, say how it ended, go on either way
    local limit=$1; shift
    echo "=== $* (limit ${limit}s)"
    timeout "$limit" "$@"; echo "=== exit $?"
}
# issue 15: throughput and MFU, eager and compiled, bf16
step 150 python bench/throughput.py --config configs/gpt2-small.yaml train.precision=bf16 train.compile=false
step 240 python bench/throughput.py --config configs/gpt2-small.yaml train.precision=bf16 train.compile=true
step 240 python bench/throughput.py --config configs/gpt3-1.3b.yaml train.precision=bf16 --warmup 2 --steps 4
# issue 18: fairscale FSDP against DeepSpeed ZeRO-3 (parity, tokens/s), one rank per GPU
step 240 python bench/sharded_engines.py --stages 3 --config configs/gpt2-small.yaml train.precision=bf16 \
    train.global_batch_size=16 train.micro_batch_size=8 --steps 20
# issue 16: the planner's memory and step time against the GPU's
step 240 python bench/plan_gpu.py
if [ -n "${OUT:-}" ]; then  # the device tool brings back a few files: one archive of the results
    tar czf "$OUT/results.tgz" bench/results
fi
