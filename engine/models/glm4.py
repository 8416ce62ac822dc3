"""GLM decoders: ``Glm4ForCausalLM`` (GLM-4-0414 family) and ``GlmForCausalLM`` (GLM-4-9B-chat-hf).

Both are Llama-shaped and reuse its attention and MLP with three differences:
- RoPE is interleaved (pairs ``2i, 2i+1``) and partial: it turns only the first
  ``head_dim * partial_rotary_factor`` features of each head (HF: ``cos[..., :d/2].repeat_interleave(2)``
  with ``rotate_half`` over even/odd features);
- q/k/v carry a bias when ``attention_bias`` (o_proj never does);
- the checkpoint already stores the MLP as one fused ``gate_up_proj``.
GLM-4 adds two more RMSNorms per layer (a "sandwich"): ``post_self_attn_layernorm`` on the attention
output and ``post_mlp_layernorm`` on the MLP output, each before its residual add. The older GLM has
only the usual two; that is the ``sandwich_norms`` flag.

Under tensor parallelism the sandwich norms are where the attention and MLP partial sums get
reduced (see llama.py), so a GLM-4 layer's output is already reduced (``output_is_partial`` False)
and the next input_layernorm only adds and normalises; the older GLM layer is like Llama's.
"""

from __future__ import annotations

import torch
from torch import nn

from pagoda.engine.attention_metadata import AttentionMetadata
from pagoda.engine.distributed import SINGLE_RANK, TPGroup
from pagoda.engine.layers.layernorm import RMSNorm
from pagoda.engine.models.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP, _check_act


class Glm4DecoderLayer(nn.Module):
    sandwich_norms = True
    output_is_partial = False  # post_mlp_layernorm reduced the MLP's partial sum

    def __init__(self, hf_config, tp: TPGroup = SINGLE_RANK):
        super().__init__()
        _check_act(hf_config)
        hidden_size, eps = hf_config.hidden_size, hf_config.rms_norm_eps
        self.self_attn = LlamaAttention(
            hf_config, qkv_bias=getattr(hf_config, "attention_bias", False), o_bias=False, is_neox_style=False, tp=tp
        )
        self.mlp = LlamaMLP(hidden_size, hf_config.intermediate_size, tp=tp)
        self.input_layernorm = RMSNorm(hidden_size, eps=eps, tp=tp)
        self.post_attention_layernorm = RMSNorm(hidden_size, eps=eps, tp=tp)
        if self.sandwich_norms:
            self.post_self_attn_layernorm = RMSNorm(hidden_size, eps=eps, tp=tp)
            self.post_mlp_layernorm = RMSNorm(hidden_size, eps=eps, tp=tp)

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        kv_cache: torch.Tensor,
        attn: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:  # the first layer: hidden is the (reduced) embedding
            hidden, residual = self.input_layernorm(hidden), hidden
        else:
            hidden, residual = self.input_layernorm(hidden, residual, partial=self.output_is_partial)
        hidden = self.self_attn(positions, hidden, kv_cache, attn)  # partial
        if self.sandwich_norms:
            hidden = self.post_self_attn_layernorm(hidden, partial=True)  # reduced from here on
        hidden, residual = self.post_attention_layernorm(hidden, residual, partial=not self.sandwich_norms)
        hidden = self.mlp(hidden)  # partial
        if self.sandwich_norms:
            hidden = self.post_mlp_layernorm(hidden, partial=True)
        return hidden, residual


class GlmDecoderLayer(Glm4DecoderLayer):
    sandwich_norms = False
    output_is_partial = True  # the MLP's partial sum, as in Llama


class Glm4ForCausalLM(LlamaForCausalLM):
    layer_cls = Glm4DecoderLayer


class GlmForCausalLM(LlamaForCausalLM):
    layer_cls = GlmDecoderLayer
