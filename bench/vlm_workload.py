"""The phone-agent workload of ``bench.vlm``: synthetic screenshots, agent-step requests (text around one
screenshot, as token ids with GLM-4.1V's image tokens), and Open-AutoGLM-style sessions whose history
grows by text while each step brings a new screenshot."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

USER, ASSISTANT = 5, 6  # role markers of the session prompts (text ids are drawn from 10 up)


def screenshot(width: int, height: int, seed: int):
    """A synthetic phone screenshot: a tinted gradient, UI blocks (bars, cards, buttons), pixel noise;
    distinct per seed (so no two share a content hash)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y = np.linspace(0.6, 1.0, height, dtype=np.float32)[:, None, None]
    x = np.linspace(0.0, 40.0, width, dtype=np.float32)[None, :, None]
    img = (rng.uniform(80, 200, 3).astype(np.float32) * y + x).astype(np.uint8)  # (H, W, 3)
    for _ in range(int(rng.integers(20, 40))):
        y0, x0 = int(rng.integers(0, height)), int(rng.integers(0, width))
        img[y0 : y0 + int(rng.integers(8, height // 6 + 9)), x0 : x0 + int(rng.integers(8, width // 2 + 9))] = rng.integers(0, 256, 3)
    noise = rng.integers(0, 12, (64, 64, 3), dtype=np.uint8)
    img += np.tile(noise, (height // 64 + 1, width // 64 + 1, 1))[:height, :width]
    return Image.fromarray(img)


@dataclass(frozen=True)
class Special:
    """GLM-4.1V's image tokens and the range random text is drawn from (below every special id)."""

    start: int
    image: int
    end: int
    text_hi: int

    @classmethod
    def of(cls, cfg) -> Special:
        ids = [cfg.image_start_token_id, cfg.image_token_id, cfg.image_end_token_id, cfg.video_token_id]
        return cls(cfg.image_start_token_id, cfg.image_token_id, cfg.image_end_token_id, min(ids))


@dataclass(frozen=True)
class AgentRequest:
    before: list[int]  # text before the screenshot (system prompt, history)
    after: list[int]  # text after it (the step's instruction)
    image: object  # PIL.Image

    def ids(self, sp: Special, image_tokens: int = 1) -> list[int]:
        """Prompt ids with one placeholder (pagoda expands it) or ``image_tokens`` of them (transformers)."""
        return [*self.before, sp.start, *[sp.image] * image_tokens, sp.end, *self.after]


def agent_requests(n: int, text_len: int, size: tuple[int, int], sp: Special, seed: int) -> list[AgentRequest]:
    rng = np.random.default_rng(seed)
    tail = min(32, text_len // 4)
    out = []
    for i in range(n):
        text = rng.integers(10, sp.text_hi, text_len).tolist()
        out.append(AgentRequest(text[: text_len - tail], text[text_len - tail :], screenshot(*size, seed * 100_003 + i)))
    return out


@dataclass
class Session:
    system: list[int]  # the same for every session (as in Open-AutoGLM)
    turns: list[list[int]]  # the user text of each step (task and screen info)
    images: list  # one new screenshot per step
    history: list[int] = field(default_factory=list)  # finished steps as text: USER turn ASSISTANT reply ...

    def prompt(self, step: int, sp: Special) -> list[int]:
        return [*self.system, *self.history, USER, sp.start, sp.image, sp.end, *self.turns[step], ASSISTANT]

    def finish(self, step: int, reply: list[int]) -> None:
        self.history += [USER, *self.turns[step], ASSISTANT, *reply]  # the screenshot is dropped


def make_sessions(args, sp: Special) -> list[Session]:
    rng = np.random.default_rng(7)
    system = rng.integers(10, sp.text_hi, args.session_system_len).tolist()
    return [
        Session(system, [rng.integers(10, sp.text_hi, args.session_turn_len).tolist() for _ in range(args.session_steps)],
                [screenshot(*args.screenshot, 7_000_000 + 1000 * s + k) for k in range(args.session_steps)])
        for s in range(args.sessions)
    ]


def make_work(args, cfg) -> dict:
    sp = Special.of(cfg)
    size = args.screenshot
    work = {
        "special": sp,
        "warmup": agent_requests(1, args.text_len, size, sp, seed=1)[0],
        "latency": agent_requests(args.latency_reps, args.text_len, size, sp, seed=2),
        "throughput": agent_requests(args.num_requests, args.text_len, size, sp, seed=3),
        "sessions": make_sessions(args, sp),
    }
    return work


def image_tokens(path: Path, work: dict, args) -> dict:
    """The screenshot size after GLM-4.1V's resize and its image tokens, from transformers' processor."""
    from pagoda.engine.multimodal.glm4v import load_pil_image_processor

    processor = load_pil_image_processor(path)
    t, h, w = processor(images=[work["warmup"].image], return_tensors="pt")["image_grid_thw"][0].tolist()
    patch, merge = processor.patch_size, processor.merge_size
    out = {"screenshot": list(args.screenshot), "resized": [w * patch, h * patch], "patches": t * h * w,
           "tokens": t * h * w // merge**2}
    note = ""
    if args.shape == "glm-4.1v-9b" and tuple(args.screenshot) == (1080, 2400):
        note = " (expected 1092x2408 = 3,354: " + ("ok)" if (out["resized"], out["tokens"]) == ([1092, 2408], 3354) else "MISMATCH)")
    print(f"screenshot {args.screenshot[0]}x{args.screenshot[1]} -> {out['resized'][0]}x{out['resized'][1]} = "
          f"{out['tokens']} image tokens{note}", flush=True)
    return out


def max_model_len(args, tokens: int) -> int:
    agent = args.text_len + 2 + tokens + args.output_len
    turn = args.session_turn_len + 2 + args.session_output_len
    session = args.session_system_len + args.session_steps * turn + 3 + tokens
    return max(agent, session) + 16
