"""GLM-4.1V (``Glm4vForConditionalGeneration``) vs HF transformers on the same random weights, float32 on CPU:
the vision tower, a prefill with images (M-RoPE positions (3, T)) and the decode step after it, a
text-only prefill with (T,) positions, the M-RoPE rotary against a direct computation, and the loader's
checks."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from pagoda.engine.layers.rotary import MRotaryEmbedding, get_rope
from pagoda.engine.loader import iter_safetensors, load_model
from pagoda.engine.models.base import SupportsImages
from pagoda.engine.models.registry import build_model, kv_cache_spec, supports_images, uses_mrope
from tests.tiny_models import tiny_glm4v_config
from tests.unit.paged_helpers import PagedKV

ATOL = 1e-4
VOCAB = 512
GRIDS = [(1, 4, 6), (1, 6, 4)]  # (t, h, w) patches: 6 image tokens each after the 2x2 merge
PATCH_DIM = 3 * 2 * 14 * 14  # C * temporal_patch * patch * patch


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(HF model, our model, checkpoint folder) on the same random weights."""
    from transformers import Glm4vForConditionalGeneration

    torch.manual_seed(0)
    hf = Glm4vForConditionalGeneration(tiny_glm4v_config(VOCAB)).eval()
    for name, p in hf.named_parameters():  # random norm weights and biases too, not ones/zeros
        if p.dim() == 1:
            p.data.normal_(1.0 if "norm" in name else 0.0, 0.2)
    path = tmp_path_factory.mktemp("glm4v")
    hf.save_pretrained(path)
    return hf, load_model(path, hf.config, torch.float32, "cpu"), path


def _pixels(seed: int = 1) -> torch.Tensor:
    rows = sum(t * h * w for t, h, w in GRIDS)
    return torch.randn(rows, PATCH_DIM, generator=torch.Generator().manual_seed(seed))


def _image_prompt(config) -> list[int]:
    """text, <begin_image>, image tokens, <end_image>, text, another image, text."""
    ids = [11, 12, 13, 14, 15]
    for t, h, w in GRIDS:
        ids += [config.image_start_token_id] + [config.image_token_id] * (t * h * w // 4) + [config.image_end_token_id]
        ids += [21, 22, 23]
    return ids


def _run(ours, positions: torch.Tensor, cache: PagedKV, seq: str, num_tokens: int, embeds=None, ids=None):
    """One step of ``num_tokens`` more tokens of ``seq`` through the paged cache -> logits (T, V)."""
    _, attn = cache.step([(seq, num_tokens)])
    with torch.inference_mode():
        hidden = ours(ids, positions, cache.kv_caches, attn, inputs_embeds=embeds)
        return ours.compute_logits(hidden)


def _cache(ours) -> PagedKV:
    spec = ours.spec
    return PagedKV(spec.num_layers, spec.num_kv_heads, spec.head_dim, num_blocks=16, block_size=4)


def test_registry_builds_an_image_model_with_mrope():
    config = tiny_glm4v_config(VOCAB)
    model = build_model(config, torch.float32, "cpu")
    assert isinstance(model, SupportsImages) and model.uses_mrope and model.image_token_id == config.image_token_id
    assert uses_mrope(config) and supports_images(config)
    assert model.spec.mrope_section == (2, 3, 3) and model.spec.head_dim == 128 // 4
    assert kv_cache_spec(config) == kv_cache_spec(config, 1) and kv_cache_spec(config, 2).num_kv_heads == 1


def test_encode_images_matches_hf(pair):
    hf, ours, _ = pair
    pixels = _pixels()
    with torch.inference_mode():
        expected = hf.model.get_image_features(pixels, torch.tensor(GRIDS)).pooler_output
        got = ours.encode_images(pixels.double(), GRIDS)  # any float dtype: cast to the model's
    assert [g.shape for g in got] == [e.shape for e in expected] == [(6, 128), (6, 128)]
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, e, atol=ATOL, rtol=0)


def test_dummy_image_is_encoded_like_an_image_of_that_size(pair):
    _, ours, _ = pair
    for tokens in (1, 12, 50):
        pixels, grid = ours.dummy_image(tokens)
        (out,) = ours.encode_images(pixels, [grid])
        assert grid[1] * grid[2] == len(pixels) and out.shape == (grid[1] * grid[2] // 4, ours.spec.hidden_size)
        assert tokens // 2 <= len(out) <= tokens


def test_image_prefill_and_decode_match_hf(pair):
    """Placeholder rows replaced by the encoder's rows, (3, T) positions from HF's get_rope_index; then a
    decode step at (T,) position T + mrope_delta, as the runner does it."""
    hf, ours, _ = pair
    ids = _image_prompt(hf.config)
    pixels, grid = _pixels(), torch.tensor(GRIDS)
    next_id = 42
    full = torch.tensor([ids + [next_id]])
    types = (full == hf.config.image_token_id).int()
    with torch.inference_mode():
        expected = hf(full, pixel_values=pixels, image_grid_thw=grid, mm_token_type_ids=types).logits[0]
        positions, delta = hf.model.get_rope_index(full[:, :-1], types[:, :-1], grid)
    prompt = torch.tensor(ids)
    with torch.inference_mode():
        embeds = ours.embed_input_ids(prompt)
        embeds[prompt == ours.image_token_id] = torch.cat(ours.encode_images(pixels, GRIDS))
    cache = _cache(ours)
    got = _run(ours, positions[:, 0], cache, "a", len(ids), embeds=embeds)
    torch.testing.assert_close(got, expected[:-1], atol=ATOL, rtol=0)

    decode_position = torch.tensor([len(ids) + int(delta)])  # one row: all three sections equal
    got = _run(ours, decode_position, cache, "a", 1, ids=torch.tensor([next_id]))
    torch.testing.assert_close(got[0], expected[-1], atol=ATOL, rtol=0)


def test_text_only_prefill_matches_hf(pair):
    hf, ours, _ = pair
    ids = [5, 17, 300, 42, 7, 99, 100, 3, 8]
    with torch.inference_mode():
        expected = hf(torch.tensor([ids])).logits[0]
    got = _run(ours, torch.arange(len(ids)), _cache(ours), "t", len(ids), ids=torch.tensor(ids))
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_forward_layers_in_pieces_takes_inputs_embeds(pair):
    _, ours, _ = pair
    ids = torch.tensor([5, 17, 300, 42, 7])
    positions = torch.stack([torch.arange(5), torch.arange(5) * 2, torch.arange(5) + 1])  # (3, T), rows differ
    with torch.inference_mode():
        embeds = ours.embed_input_ids(ids) * 0.5
        whole = _run(ours, positions, _cache(ours), "w", 5, embeds=embeds)
        cache = _cache(ours)
        _, attn = cache.step([("p", 5)])
        carry = ours.forward_layers(None, positions, cache.kv_caches, attn, 0, 1, None, inputs_embeds=embeds)
        hidden = ours.forward_layers(None, positions, cache.kv_caches, attn, 1, ours.num_layers, carry)
        torch.testing.assert_close(ours.compute_logits(hidden), whole, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- M-RoPE


def _mrope_reference(x, positions, section, rotary_dim, base):
    """Interleaved pairs (2j, 2j+1) of the first rotary_dim features, pair j turned by
    positions[s] * base^(-2j/rotary_dim) where j lies in the s-th chunk of ``section``; float64."""
    out = x.double().clone()
    owner = [s for s, n in enumerate(section) for _ in range(n)]
    for j in range(rotary_dim // 2):
        angle = (positions[owner[j]].double() * base ** (-2 * j / rotary_dim))[:, None]  # (T, 1)
        x1, x2 = x[..., 2 * j].double(), x[..., 2 * j + 1].double()
        out[..., 2 * j] = x1 * angle.cos() - x2 * angle.sin()
        out[..., 2 * j + 1] = x2 * angle.cos() + x1 * angle.sin()
    return out


def _mrope(head_dim=32, section=(2, 3, 3)) -> MRotaryEmbedding:
    params = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5, "mrope_section": section}
    rope = get_rope(params, head_dim, max_position=512, is_neox_style=False)
    assert isinstance(rope, MRotaryEmbedding)
    return rope


def test_mrope_matches_direct_rotation_and_hf():
    from transformers.models.glm4v.modeling_glm4v import Glm4vTextRotaryEmbedding, apply_rotary_pos_emb

    gen = torch.Generator().manual_seed(0)
    rope = _mrope()
    q, k = torch.randn(7, 4, 32, generator=gen), torch.randn(7, 2, 32, generator=gen)
    positions = torch.randint(0, 500, (3, 7), generator=gen)
    got_q, got_k = rope(positions, q.clone(), k.clone())
    torch.testing.assert_close(
        got_q.double(), _mrope_reference(q, positions, (2, 3, 3), 16, 10000.0), atol=1e-4, rtol=0
    )
    torch.testing.assert_close(
        got_k.double(), _mrope_reference(k, positions, (2, 3, 3), 16, 10000.0), atol=1e-4, rtol=0
    )

    hf_rope = Glm4vTextRotaryEmbedding(tiny_glm4v_config(VOCAB).text_config)
    cos, sin = hf_rope(q, positions[:, None])  # (1, T, rotary_dim)
    hf_q, hf_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    torch.testing.assert_close(got_q, hf_q[0].transpose(0, 1), atol=1e-5, rtol=0)
    torch.testing.assert_close(got_k, hf_k[0].transpose(0, 1), atol=1e-5, rtol=0)


def test_mrope_with_equal_rows_is_plain_rope():
    gen = torch.Generator().manual_seed(1)
    rope = _mrope()
    q, k = torch.randn(6, 4, 32, generator=gen), torch.randn(6, 2, 32, generator=gen)
    positions = torch.randint(0, 500, (6,), generator=gen)
    one_q, one_k = rope(positions, q.clone(), k.clone())
    three_q, three_k = rope(positions.expand(3, -1), q.clone(), k.clone())
    torch.testing.assert_close(three_q, one_q, atol=1e-6, rtol=0)
    torch.testing.assert_close(three_k, one_k, atol=1e-6, rtol=0)


def test_mrope_table_feeds_the_triton_kernel():
    """The CUDA path: the per-token cos ‖ sin table through ``apply_rotary`` at rows 0..T-1 (on the GPU,
    or on CPU in Triton's interpreter) equals the torch path."""
    pytest.importorskip("triton", reason="triton is not installed")
    from pagoda.kernels.rotary import apply_rotary

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(2)
    rope = _mrope()
    q, k = torch.randn(5, 4, 32, generator=gen), torch.randn(5, 2, 32, generator=gen)
    positions = torch.randint(0, 500, (3, 5), generator=gen)
    expected_q, expected_k = rope(positions, q.clone(), k.clone())  # CPU: the torch path
    table = rope.to(device).cos_sin_table(positions.to(device))
    got_q, got_k = apply_rotary(q.to(device), k.to(device), torch.arange(5, device=device), table, False)
    torch.testing.assert_close(got_q.cpu(), expected_q, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_k.cpu(), expected_k, atol=1e-5, rtol=0)


def test_mrope_section_must_cover_the_rotary_frequencies():
    with pytest.raises(ValueError, match="must sum to rotary_dim / 2 = 8"):
        _mrope(section=(2, 2, 2))


# ---------------------------------------------------------------- loading


def _tensors(path) -> dict[str, torch.Tensor]:
    return dict(iter_safetensors(path))


def test_the_older_checkpoint_layout_loads_the_same(pair, tmp_path):
    hf, ours, path = pair
    old = {}
    for name, tensor in _tensors(path).items():  # model.language_model.X -> model.X, model.visual.X -> visual.X
        name = name.replace("model.language_model.", "model.").replace("model.visual.", "visual.")
        old[name] = tensor.contiguous()
    save_file(old, str(tmp_path / "model.safetensors"))
    reloaded = load_model(tmp_path, hf.config, torch.float32, "cpu")
    for (name, a), (_, b) in zip(ours.state_dict().items(), reloaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_missing_or_unknown_tensor_raises(pair):
    hf, _, path = pair
    tensors = _tensors(path)
    model = build_model(hf.config, torch.float32, "cpu")
    missing = {k: v for k, v in tensors.items() if k != "model.visual.blocks.1.attn.qkv.weight"}
    with pytest.raises(ValueError, match=r"missing weights for .*visual\.blocks\.1\.attn\.qkv\.weight"):
        model.load_weights(missing.items())
    unknown = {**tensors, "model.visual.blocks.9.attn.qkv.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"'model\.visual\.blocks\.9\.attn\.qkv\.weight' has no parameter"):
        model.load_weights(unknown.items())
    bad_conv = {**tensors, "model.visual.patch_embed.proj.weight": torch.zeros(64, 3, 2, 14, 15)}
    with pytest.raises(ValueError, match=r"expected \(64, 3, 2, 14, 14\)"):
        model.load_weights(bad_conv.items())
