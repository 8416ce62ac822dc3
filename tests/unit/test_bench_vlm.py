"""bench.vlm on CPU with a tiny random GLM-4.1V: every phase runs end to end (transformers included),
and the transformers baseline's inputs are what pagoda serves — the same expanded prompt ids, and a
left-padded batch that generates what each prompt does alone."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from bench import vlm, vlm_hf
from bench.random_models import make_random_glm4v
from bench.vlm_workload import AgentRequest, Special, screenshot


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_random_glm4v("tiny", tmp_path_factory.mktemp("glm4v") / "glm4v-tiny")


def test_every_phase_runs_and_reports(folder, tmp_path, monkeypatch):
    args = ["--shape", "tiny", "--screenshot", "112x224", "--text-len", "24", "--output-len", "4", "--latency-reps", "1",
            "--num-requests", "2", "--hf-batch-size", "2", "--sessions", "2", "--session-steps", "2",
            "--session-system-len", "20", "--session-turn-len", "6", "--session-output-len", "3",
            "--model-dir", str(folder.parent), "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", ["bench.vlm", *args])
    vlm.main()
    result = json.loads((tmp_path / "vlm_tiny.json").read_text())
    assert "error" not in json.dumps(result)
    assert result["image"] == {"screenshot": [112, 224], "resized": [112, 224], "patches": 128, "tokens": 32}
    assert result["pagoda"]["latency"]["prompt_tokens"] == result["hf"]["latency"]["prompt_tokens"] == 24 + 2 + 32
    assert result["pagoda"]["throughput"]["output_tokens"] == result["hf"]["throughput"]["output_tokens"] == 2 * 4
    steps = result["pagoda"]["sessions"]["per_step"]
    assert [s["requests"] for s in steps] == [2, 2]
    assert steps[1]["hit rate"] > 0  # step 1 reuses step 0's text
    assert (tmp_path / "vlm_tiny.md").exists()


def test_transformers_inputs_match_pagoda_and_padding(folder):
    from transformers import Glm4vForConditionalGeneration

    from pagoda.engine.config import MultiModalConfig
    from pagoda.engine.loader import load_hf_config
    from pagoda.engine.multimodal.glm4v import load_pil_image_processor
    from pagoda.engine.multimodal.processor import make_mm_processor

    model = Glm4vForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    processor = load_pil_image_processor(folder)
    sp, merge = Special.of(model.config), model.config.vision_config.spatial_merge_size
    reqs = [AgentRequest(list(range(10, 40)), [41, 42], screenshot(112, 224, 0)),
            AgentRequest(list(range(50, 60)), [61], screenshot(196, 84, 1))]
    ours = make_mm_processor(folder, load_hf_config(folder), MultiModalConfig())
    batch, _ = vlm_hf.hf_inputs(reqs, processor, sp, merge)
    assert batch["attention_mask"][1].tolist().count(0) > 0  # the second prompt is left-padded
    with torch.inference_mode():
        together = model.generate(**batch, max_new_tokens=5, do_sample=False, pad_token_id=0)[:, -5:]
        for i, r in enumerate(reqs):
            alone, _ = vlm_hf.hf_inputs([r], processor, sp, merge)
            expanded, _ = ours.process(r.ids(sp), [r.image])
            assert alone["input_ids"][0].tolist() == expanded
            assert alone["mm_token_type_ids"][0].tolist() == [int(t == sp.image) for t in expanded]
            first = model.generate(**alone, max_new_tokens=5, do_sample=False, pad_token_id=0)[0, -5:]
            assert together[i].tolist() == first.tolist()
