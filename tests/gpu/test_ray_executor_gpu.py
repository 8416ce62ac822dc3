"""TP=2 with Ray actors as ranks (NCCL) against the local multi-process executor, on 2 GPUs.

Run on the device machine (nvidia-h100-x2) with Ray carried as ``/work/shared/device/README.md``
says (``make-ray-bundle.sh``), then ``python -m pytest -m gpu tests/gpu/test_ray_executor_gpu.py``.
Writes the compared runs to $OUT/ray_tp_gpu.json when $OUT is set.

The model is the sharpened random Llama-3.1-8B shape of ``tests/gpu/test_tp_gpu.py`` (greedy
decoding decisive, far above bf16 noise; ``bench.random_models`` says how). Both executors shard
it the same way and all-reduce two partial sums per layer (a + b is commutative), so the first 32
greedy tokens must be identical on all 8 prompts:

- ``RayExecutor`` driven by an offline engine: two ``RankActor``s, each seeing one GPU, in a
  STRICT_PACK placement group of two {"GPU": 1} bundles the executor reserves;
- a Serve replica with tensor_parallel_size=2: the replica in bundle 0 (no GPU) of the group Serve
  reserves for it, its rank actors in bundles 1 and 2, tokens streamed through the Serve handle.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import random
import time
from pathlib import Path

import pytest
import torch

from bench.random_models import SHAPES, make_random_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs at least 2 CUDA GPUs"),
]
ray = pytest.importorskip("ray")

MODEL_DIR = Path(os.environ.get("PAGODA_MODEL_DIR", "/tmp/pagoda-models"))
SHAPE = "llama-3.1-8b"
NEW_TOKENS = 32
PROMPT_LENS = (7, 16, 33, 64, 100, 200, 333, 512)
ENGINE = {"dtype": "bfloat16", "device": "cuda", "max_model_len": 1024, "max_num_seqs": 8,
          "gpu_memory_utilization": 0.8}
# NVLink multicast stays off on the shared hosts (KINDS.md); Ray's workers inherit these from the driver.
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


@pytest.fixture(scope="module")
def model_path():
    return make_random_model(SHAPE, MODEL_DIR / f"{SHAPE}-sharp", sharp=True)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(10, SHAPES[SHAPE]["vocab_size"]) for _ in range(n)] for n in PROMPT_LENS]


@pytest.fixture(scope="module")
def local_ray():
    for key, value in NCCL_ENV.items():
        os.environ.setdefault(key, value)
    ray.init(address="local", num_cpus=8, num_gpus=2, object_store_memory=2 * 2**30, include_dashboard=False)
    try:
        yield
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def record():
    data: dict = {}
    yield data
    out = os.environ.get("OUT")
    if out:
        Path(out, "ray_tp_gpu.json").write_text(json.dumps(data, indent=2))
    print(json.dumps({run: {k: v for k, v in r.items() if k != "tokens"} for run, r in data.items()}, indent=2))


@pytest.fixture(scope="module")
def multiproc_tokens(model_path, prompts, record) -> list[list[int]]:
    tokens, seconds = _offline(model_path, prompts, "mp")
    record["mp"] = {"seconds": seconds, "tokens": tokens}
    return tokens


def _offline(path: Path, prompts, backend: str) -> tuple[list[list[int]], float]:
    """Greedy token ids of an offline TP=2 engine; the engine and its ranks are released afterwards."""
    from pagoda import LLM, SamplingParams

    start = time.monotonic()
    llm = LLM(model=str(path), tensor_parallel_size=2, distributed_executor_backend=backend, **ENGINE)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [o.outputs[0].token_ids for o in outputs], time.monotonic() - start
    finally:
        llm.engine.shutdown()
        del llm
        gc.collect()
        _wait_gpus_released()


def _wait_gpus_released(timeout_s: float = 60.0) -> None:
    """Until killed rank processes have given their memory back (the next run profiles what is free)."""
    deadline = time.monotonic() + timeout_s
    for device in range(2):
        while time.monotonic() < deadline:
            free, total = torch.cuda.mem_get_info(device)
            if total - free < 0.1 * total:
                break
            time.sleep(0.5)


def _same(ref: list[list[int]], got: list[list[int]]) -> dict:
    return {"identical_prompts": sum(a == b for a, b in zip(ref, got)), "of": len(ref),
            "all_have_32": all(len(t) == NEW_TOKENS for t in got)}


def test_ray_executor_tp2_matches_multiproc_tp2(local_ray, model_path, prompts, multiproc_tokens, record):
    tokens, seconds = _offline(model_path, prompts, "ray")
    result = record["ray executor"] = {"seconds": seconds, **_same(multiproc_tokens, tokens), "tokens": tokens}
    assert result["all_have_32"], result
    assert tokens == multiproc_tokens, result


def test_serve_replica_tp2_matches_multiproc_tp2(local_ray, model_path, prompts, multiproc_tokens, record):
    from ray import serve

    from pagoda import SamplingParams
    from pagoda.cluster.app import deploy
    from pagoda.cluster.client import PagodaClient
    from pagoda.cluster.config import AppConfig

    engine = {"model": str(model_path), "tensor_parallel_size": 2, **ENGINE}
    app = AppConfig.from_dict({"engine": engine, "deployment": {"name": "raytp", "num_replicas": 1}})
    assert app.engine.parallel.distributed_executor_backend == "ray"
    start = time.monotonic()
    serve.start(proxy_location="Disabled")
    try:
        client = PagodaClient(deploy(app))
        params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)

        async def main():
            requests = [client.complete(p, params, request_id=f"g{i}") for i, p in enumerate(prompts)]
            return await asyncio.gather(*requests)

        tokens = [c.token_ids for c in asyncio.run(main())]
    finally:
        serve.delete(app.deployment.name)
    result = record["serve replica"] = {"seconds": time.monotonic() - start, **_same(multiproc_tokens, tokens),
                                        "tokens": tokens}
    assert result["all_have_32"], result
    assert tokens == multiproc_tokens, result
