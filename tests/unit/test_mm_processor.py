"""The GLM-4.1V image processor against transformers' own: prompt ids, patches, grids and M-RoPE
positions; placeholder expansion, token counts, content hashes, the processor registry."""

from __future__ import annotations

import base64
import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from pagoda.engine.config import MultiModalConfig
from pagoda.engine.loader import load_hf_config
from pagoda.engine.multimodal.chat import split_images
from pagoda.engine.multimodal.glm4v import Glm4vMultiModalProcessor, load_pil_image_processor, mrope_positions
from pagoda.engine.multimodal.image_io import load_image
from pagoda.engine.multimodal.processor import expand_placeholders, make_mm_processor
from pagoda.engine.tokenizer import encode_chat, load_tokenizer
from tests.tiny_models import (
    GLM4V_SPECIAL_TOKENS,
    GLM_CHAT_TOKENS,
    TINY_GLM4V_MAX_PIXELS,
    hf_glm4v_processor,
    tiny_glm4v_config,
)

IMAGE = 99  # an image token id for the tests that need no model


def _image(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _png_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def hf_rope():
    """transformers' Glm4vModel.get_rope_index for one prompt: (positions (3, P), delta)."""
    from transformers.models.glm4v.modeling_glm4v import Glm4vModel

    model = Glm4vModel(tiny_glm4v_config(64))  # the rope index reads only the merge size off the model

    def rope(ids: list[int], image_token_id: int, grids: list[tuple[int, int, int]]) -> tuple[np.ndarray, int]:
        input_ids = torch.tensor([ids])
        token_types = (input_ids == image_token_id).int()  # 1: image, as Glm4vProcessor marks them
        thw = torch.tensor(grids) if grids else None
        positions, deltas = model.get_rope_index(input_ids, token_types, image_grid_thw=thw)
        return positions[:, 0].numpy(), int(deltas[0, 0])

    return rope


@pytest.fixture(scope="module")
def processor(tiny_glm4v):
    return make_mm_processor(tiny_glm4v, load_hf_config(tiny_glm4v), MultiModalConfig())


def _prompt(*segments) -> tuple[list[int], list[tuple[int, tuple[int, int, int]]]]:
    """Token ids and (offset, grid) of each image from ("text", n) and ("image", (t, h, w)) segments."""
    ids, images = [], []
    for kind, value in segments:
        if kind == "text":
            ids += [7] * value
        else:
            images.append((len(ids), value))
            ids += [IMAGE] * (value[0] * value[1] * value[2] // 4)
    return ids, images


@pytest.mark.parametrize("segments", [
    [("text", 9)],  # no image
    [("text", 3), ("image", (1, 4, 6)), ("text", 5)],  # one image, text around it
    [("image", (1, 8, 2)), ("text", 2)],  # an image first
    [("text", 4), ("image", (1, 6, 2)), ("text", 3), ("image", (1, 4, 10)), ("text", 2)],  # two images
    # images one token apart (GLM's template always puts <|end_of_image|><|begin_of_image|> between two;
    # transformers cannot tell directly adjacent images apart), the last token an image's
    [("text", 1), ("image", (1, 2, 2)), ("text", 1), ("image", (1, 10, 4))],
])
def test_mrope_positions_match_transformers(segments, hf_rope):
    ids, images = _prompt(*segments)
    positions, delta = mrope_positions(len(ids), images, merge=2)
    expected, expected_delta = hf_rope(ids, IMAGE, [grid for _, grid in images])
    assert positions.dtype == np.int64 and positions.shape == (3, len(ids))
    np.testing.assert_array_equal(positions, expected)
    assert delta == expected_delta == positions.max() + 1 - len(ids)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2's copy keyword, inside Glm4vProcessor
def test_prompt_ids_patches_and_positions_match_transformers(tiny_glm4v, processor, hf_rope):
    """The serving path (OpenAI messages -> split_images -> chat template -> load_image -> process)
    gives what transformers' Glm4vProcessor and get_rope_index give for the same chat and images."""
    tokenizer = load_tokenizer(tiny_glm4v)
    messages = [
        {"role": "system", "content": "You are a phone agent."},
        {"role": "user", "content": [
            {"type": "text", "text": "Where is the search box?"},
            {"type": "image_url", "image_url": {"url": _png_data_url(_image(300, 200, seed=1))}},
            {"type": "text", "text": "And here:"},
            {"type": "image_pil", "image_pil": _image(90, 500, seed=2)},
        ]},
        {"role": "assistant", "content": "Top left."},
        {"role": "user", "content": [{"type": "text", "text": "Tap it."}]},
    ]
    template_messages, sources = split_images(messages)
    images = [load_image(source, MultiModalConfig(), field) for field, source in sources]
    ids, mm = processor.process(encode_chat(tokenizer, template_messages), images)

    hf = hf_glm4v_processor(load_pil_image_processor(tiny_glm4v), tokenizer)
    text = tokenizer.apply_chat_template(template_messages, tokenize=False, add_generation_prompt=True)
    ref = hf(images=images, text=[text], return_tensors="pt")
    assert ids == ref["input_ids"][0].tolist()
    assert [im.grid_thw for im in mm.images] == [tuple(g) for g in ref["image_grid_thw"].tolist()]
    torch.testing.assert_close(torch.cat([im.pixel_values for im in mm.images]), ref["pixel_values"], rtol=0, atol=0)
    positions, delta = hf_rope(ids, processor.image_token_id, [im.grid_thw for im in mm.images])
    np.testing.assert_array_equal(mm.mrope_positions, positions)
    assert mm.mrope_delta == delta


def test_process_contract(processor):
    image_id = processor.image_token_id
    images = [_image(300, 200), _image(64, 64, seed=3)]
    ids, mm = processor.process([1, image_id, 2, 3, image_id, 4], images)
    a, b = mm.images
    assert (a.offset, b.offset) == (1, a.end + 2) and len(ids) == b.end + 1
    for im in mm.images:
        assert ids[im.offset : im.end] == [image_id] * im.num_tokens
        t, h, w = im.grid_thw
        assert im.num_tokens == t * h * w // 4
        assert im.pixel_values.dtype == torch.float32 and im.pixel_values.shape == (t * h * w, 3 * 2 * 14 * 14)
    assert ids.count(image_id) == a.num_tokens + b.num_tokens
    assert mm.mrope_positions.shape == (3, len(ids))
    assert mm.extra_keys(0, 1) == () and mm.extra_keys(0, 2) == (a.content_hash,)
    assert mm.extra_keys(a.end - 1, b.offset + 1) == (a.content_hash, b.content_hash)
    assert mm.extra_keys(b.end, len(ids)) == ()


def test_placeholder_count_must_match_the_images(processor):
    image_id = processor.image_token_id
    with pytest.raises(ValueError, match=r"has 1 image placeholder\(s\) .* but 0 image\(s\)"):
        processor.process([1, image_id, 2], [])
    with pytest.raises(ValueError, match=r"has 0 image placeholder\(s\) .* but 1 image\(s\)"):
        processor.process([1, 2], [_image(50, 50)])
    with pytest.raises(ValueError, match=r"has 2 image placeholder\(s\) .* but 1 image\(s\)"):
        processor.process([image_id, image_id], [_image(50, 50)])
    assert processor.process([1, 2], [])[0] == [1, 2]  # no images: ids as they are, no positions to shift


@pytest.mark.parametrize("width, height", [
    (1, 1), (10, 10), (28, 28), (300, 200), (200, 300), (1000, 1000), (4000, 100), (90, 500), (3000, 20),
])
def test_num_image_tokens_is_what_process_makes(processor, width, height):
    tokens = processor.num_image_tokens(width, height)
    _, mm = processor.process([processor.image_token_id], [_image(width, height)])
    assert tokens == mm.images[0].num_tokens >= 1
    if max(width, height) <= 10 * min(width, height):  # a thin image keeps a 28 px side and may pass the cap
        assert tokens <= TINY_GLM4V_MAX_PIXELS // (2 * 28 * 28)


def test_an_extreme_aspect_ratio_is_a_value_error(processor):
    with pytest.raises(ValueError, match=r"^multi_modal_data\.image\[1\] \(5000x20\): absolute aspect ratio"):
        processor.process([processor.image_token_id] * 2, [_image(50, 50), _image(5000, 20)])
    with pytest.raises(ValueError, match=r"absolute aspect ratio"):
        processor.num_image_tokens(5000, 20)


def test_image_resize_max_pixels_overrides_the_folders_cap(tiny_glm4v, processor):
    small = Glm4vMultiModalProcessor(
        tiny_glm4v, load_hf_config(tiny_glm4v), MultiModalConfig(image_resize_max_pixels=2 * 28 * 28 * 4)
    )
    assert small.num_image_tokens(1000, 1000) == 4 < processor.num_image_tokens(1000, 1000) == 64
    image = _image(1000, 1000)
    _, mm_small = small.process([small.image_token_id], [image])
    _, mm = processor.process([processor.image_token_id], [image])
    assert mm_small.images[0].num_tokens == 4
    assert mm_small.images[0].content_hash != mm.images[0].content_hash  # other settings, other encoder input


def test_content_hash_follows_the_pixels(processor):
    def key(image):
        return processor.process([processor.image_token_id], [image])[1].images[0].content_hash

    image = _image(120, 80)
    same = load_image(_png_data_url(image), MultiModalConfig(), "f")  # the same pixels, through PNG
    changed = image.copy()
    changed.putpixel((5, 5), tuple(255 - v for v in image.getpixel((5, 5))))
    assert key(image) == key(same) == key(image.copy())
    assert key(changed) != key(image)
    assert key(image) != key(_image(80, 120))
    assert 0 <= key(image) < 2**64


def test_expand_placeholders():
    ids, offsets = expand_placeholders([1, IMAGE, 2, IMAGE], IMAGE, [3, 2])
    assert ids == [1, IMAGE, IMAGE, IMAGE, 2, IMAGE, IMAGE] and offsets == [1, 5]


def test_registry(tiny_glm4v):
    config = MultiModalConfig()
    assert make_mm_processor(tiny_glm4v, SimpleNamespace(architectures=["LlamaForCausalLM"]), config) is None
    assert make_mm_processor(tiny_glm4v, SimpleNamespace(architectures=None), config) is None
    assert isinstance(make_mm_processor(tiny_glm4v, load_hf_config(tiny_glm4v), config), Glm4vMultiModalProcessor)


def test_tiny_glm4v_folder_loads_with_transformers(tiny_glm4v):
    from transformers import AutoConfig, AutoTokenizer, Glm4vForConditionalGeneration

    config = AutoConfig.from_pretrained(tiny_glm4v)
    tokenizer = AutoTokenizer.from_pretrained(tiny_glm4v)
    model = Glm4vForConditionalGeneration.from_pretrained(tiny_glm4v)
    assert config.architectures == ["Glm4vForConditionalGeneration"]
    assert model.config.text_config.vocab_size == len(tokenizer)
    for token in (*GLM4V_SPECIAL_TOKENS, *GLM_CHAT_TOKENS):  # each a single special id
        assert tokenizer.convert_ids_to_tokens(tokenizer(token, add_special_tokens=False).input_ids) == [token]
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<|image|>")
    assert config.image_start_token_id == tokenizer.convert_tokens_to_ids("<|begin_of_image|>")
    assert load_pil_image_processor(tiny_glm4v).size["longest_edge"] == TINY_GLM4V_MAX_PIXELS
    try:
        from transformers import AutoImageProcessor

        auto = AutoImageProcessor.from_pretrained(tiny_glm4v, backend="pil")
    except ImportError:  # transformers 5.17 has no AutoImageProcessor without torchvision, whatever the backend
        return
    assert type(auto) is type(load_pil_image_processor(tiny_glm4v))
