"""GLM-4.1V with images on one GPU against transformers on the same random weights (bf16).

A tiny random GLM-4.1V (``bench.random_models.make_random_glm4v("tiny")``, GLM-4.1V's real image
processor settings): prompts with a screenshot each plus a text-only one, served as one batch
(Triton kernels, M-RoPE table path, vision tower through SDPA, CUDA graphs for decode); each prompt
also through transformers' ``generate``, in bf16 and in float32. bf16 noise decides near-ties
differently, so the check is the one ``test_engine_gpu`` uses: our log-probabilities are as close
to float32 truth as transformers' own bf16 ones, and the first token agrees.
"""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

MODEL_DIR = Path(os.environ.get("PAGODA_MODEL_DIR", "/tmp/pagoda-models"))
NEW_TOKENS = 16
TOP = 20


def _hf_steps(path: Path, reqs, sp, dtype) -> list[tuple[list[int], list[torch.Tensor]]]:
    """Per request: greedy ids and the log-softmax of each step's scores (V,), one request at a time."""
    from transformers import Glm4vForConditionalGeneration

    from bench.vlm_hf import hf_inputs
    from pagoda.engine.multimodal.glm4v import load_pil_image_processor

    model = Glm4vForConditionalGeneration.from_pretrained(path, dtype=dtype, device_map="cuda").eval()
    processor = load_pil_image_processor(path)
    merge = model.config.vision_config.spatial_merge_size
    out = []
    with torch.no_grad():
        for req in reqs:
            if req.image is None:
                ids = torch.tensor([req.before], device="cuda")
                inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            else:
                inputs, _ = hf_inputs([req], processor, sp, merge)
                inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
            gen = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                 pad_token_id=0, output_scores=True, return_dict_in_generate=True)
            tokens = gen.sequences[0, inputs["input_ids"].shape[1]:].tolist()
            out.append((tokens, [torch.log_softmax(s[0].float(), -1).cpu() for s in gen.scores]))
    del model
    torch.cuda.empty_cache()
    return out


def test_glm4v_with_images_is_as_close_to_fp32_as_transformers_bf16():
    from bench.random_models import make_random_glm4v
    from bench.vlm_workload import AgentRequest, Special, agent_requests
    from pagoda import LLM, SamplingParams
    from pagoda.engine.loader import load_hf_config

    path = make_random_glm4v("tiny", MODEL_DIR / "glm4v-tiny")
    sp = Special.of(load_hf_config(path))
    reqs = agent_requests(3, 48, (224, 448), sp, seed=11) + agent_requests(1, 48, (560, 280), sp, seed=12)
    reqs.append(AgentRequest(reqs[0].before + reqs[0].after, [], None))  # text only, in the same batch

    llm = LLM(str(path), dtype="bfloat16", device="cuda", max_model_len=2048, max_num_seqs=8)
    prompts = [{"prompt_token_ids": r.ids(sp), "multi_modal_data": {"image": r.image}} if r.image is not None
               else r.before for r in reqs]
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, logprobs=TOP)
    ours = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
    assert llm.engine.kv.usage() == 0
    llm.engine.shutdown()
    del llm
    gc.collect()
    torch.cuda.empty_cache()

    hf_bf16 = _hf_steps(path, reqs, sp, torch.bfloat16)
    hf_fp32 = _hf_steps(path, reqs, sp, torch.float32)
    report = []
    for completion, (bf16_ids, bf16_lp), (fp32_ids, fp32_lp) in zip(ours, hf_bf16, hf_fp32):
        first = completion.logprobs[0]  # step 0: the prompt's last position, images included
        ids = list(first)
        truth = fp32_lp[0][ids]
        ours_err = (torch.tensor([first[i].logprob for i in ids]) - truth).abs().max().item()
        hf_err = (bf16_lp[0][ids] - truth).abs().max().item()
        report.append({"ours_vs_fp32": ours_err, "hf_bf16_vs_fp32": hf_err,
                       "tokens_equal_fp32": sum(a == b for a, b in zip(completion.token_ids, fp32_ids)),
                       "hf_bf16_tokens_equal_fp32": sum(a == b for a, b in zip(bf16_ids, fp32_ids))})
        assert completion.token_ids[0] == fp32_ids[0]
        assert ours_err <= max(3 * hf_err, 0.05), report[-1]
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / "gpu_vlm_parity.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))
