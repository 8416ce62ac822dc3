#!/usr/bin/env bash
# Everything the GPU issues measure, in one device call:
#   bash bench/gpu_suite.sh tests   -> GPU tests (engine parity incl. CUDA graphs, kernels) + kernel benchmarks
#   bash bench/gpu_suite.sh bench   -> offline throughput (Llama-3.1-8B shape, Qwen3-0.6B nano-vllm workload) + latency
#   bash bench/gpu_suite.sh tp      -> (2+ GPUs) tpcheck then tpbench:
#   bash bench/gpu_suite.sh tpcheck -> all-reduce (+ fused RMSNorm) by size, TP parity/kill tests, async-scheduling parity
#   bash bench/gpu_suite.sh tpbench -> TP 1/2 decode latency: sync/async scheduling x NCCL/symmetric-memory all-reduce
#   bash bench/gpu_suite.sh tp4     -> (4 GPUs) TP 2/4 parity tests, TP 1/2/4 table of the default engine
#   bash bench/gpu_suite.sh vlm     -> GLM-4.1V-9B shape: agent-step TTFT/decode, 64-request throughput, 16x5-step agent
#                                      sessions, vs transformers (one call, ~6-8 min; carry .devicepkgs for pillow)
# Results (JSON + markdown) land in $OUT; copy them to bench/results/ and run `python -m bench.replot` for PNGs.
set -u
OUT=${OUT:-/tmp/pagoda-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD OUT
export PAGODA_MODEL_DIR=/tmp/pagoda-models
step() { echo "=== $*"; local t=$SECONDS; "$@" 2>&1 | tail -n 40; echo "=== rc=${PIPESTATUS[0]} ${*:0:3} $((SECONDS - t))s"; }

# pillow (images: GLM-4.1V) from the carried wheel when the image lacks it (.devicepkgs/pillow-*.whl, downloaded beforehand)
python -c "import PIL" 2>/dev/null || { python -m pip install -q --no-index --no-deps --target /tmp/pagoda-pil \
  --find-links .devicepkgs pillow && export PYTHONPATH=/tmp/pagoda-pil:$PYTHONPATH; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" | tee -a "$OUT/gpu.txt"

case "${1:-all}" in
  tests|all)
    step python -m pytest -q -x -m gpu tests/gpu/test_engine_gpu.py tests/gpu/test_vlm_gpu.py -p no:cacheprovider
    step python -m pytest -q -m gpu tests/kernels -p no:cacheprovider
    step python -m bench.kernels --out "$OUT"
    ;;
esac
case "${1:-all}" in
  bench|all)
    step python -m bench.offline --shape llama-3.1-8b --workload fixed --num-requests 128 --input-len 512 --output-len 256 \
      --hf-batch-size 64 --out "$OUT"
    step python -m bench.offline --shape qwen3-0.6b --workload nano --num-requests 256 --hf-batch-size 0 \
      --hf-batch-requests 16 --out "$OUT"
    step python -m bench.latency --shape llama-3.1-8b --out "$OUT"
    ;;
esac
# NVLink multicast stays off on the lent machines (NVLS, symmetric-memory multicast)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
case "${1:-all}" in
  tp|tpcheck)
    step python -m bench.allreduce --world-size 2 --out "$OUT"
    step python -m pytest -q -m gpu tests/gpu/test_tp_gpu.py -p no:cacheprovider -k "not 4"
    step python -m pytest -q -m gpu tests/gpu/test_engine_gpu.py -p no:cacheprovider -k async_scheduling
    ;;
esac
case "${1:-all}" in
  tp|tpbench)
    step python -m bench.tp --tp 1 2 --skip-collectives --compare-custom-all-reduce --scheduling sync async \
      --repeats 3 --out "$OUT"
    ;;
esac
case "${1:-all}" in
  tp4)
    step python -m pytest -q -m gpu tests/gpu/test_tp_gpu.py -p no:cacheprovider -k "test_tp_matches_tp1 or 4-True"
    step python -m bench.tp --tp 1 2 4 --repeats 1 --out "$OUT"
    ;;
esac
case "${1:-all}" in
  vlm)
    step python -m bench.vlm --out "$OUT" ${VLM_ARGS:-}
    ;;
esac
ls -la "$OUT"
