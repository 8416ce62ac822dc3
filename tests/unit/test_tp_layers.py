"""Tensor-parallel layers and collectives on 4 real gloo ranks, against the unsharded computation;
and whole tiny decoders, whose row-parallel outputs are reduced inside the next norm, against one rank.

Every rank builds the same full weights (same seed), loads them through the layers' weight
loaders (which cut out its part), and checks its outputs against the full layer computed
locally. Shapes are chosen to hit the edge cases: kv heads replicated (Hkv=2 < 4 ranks), a
vocabulary that does not divide by 4 (padding rows), biases on a row-parallel layer.
Validation of impossible setups runs without any process.
"""

from __future__ import annotations

import traceback

import pytest
import torch
import torch.nn.functional as F

from pagoda.engine.config import EngineConfig
from pagoda.engine.distributed import SINGLE_RANK, TimedTPGroup, init_tp_group
from pagoda.engine.executor import check_parallel_config
from pagoda.engine.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from pagoda.engine.layers.layernorm import RMSNorm
from pagoda.engine.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from pagoda.engine.models.registry import build_model, check_tensor_parallel, kv_cache_spec
from pagoda.kernels.rmsnorm import rms_norm_ref
from tests.unit.paged_helpers import PagedKV

WORLD = 4


def _load(layer, tensors: dict) -> None:
    for name, (tensor, shard_id) in tensors.items():
        param = getattr(layer, name)
        param.weight_loader(param, tensor, shard_id)


def _check_collectives(tp) -> None:
    x = torch.full((2, 3), float(tp.rank + 1))
    assert torch.equal(tp.all_reduce(x.clone()), torch.full((2, 3), float(sum(range(1, WORLD + 1)))))
    gathered = tp.all_gather(torch.tensor([[tp.rank]]), dim=-1)  # (1, WORLD)
    assert gathered.tolist() == [list(range(WORLD))]
    assert tp.all_gather(torch.tensor([[tp.rank]]), dim=0).shape == (WORLD, 1)
    g = tp.gather(torch.tensor([[tp.rank, tp.rank]]), dim=-1, dst=0)
    assert (g.tolist() == [[r for r in range(WORLD) for _ in range(2)]]) if tp.rank == 0 else g is None
    assert tp.broadcast(torch.tensor([tp.rank * 10 + 7]), src=0).item() == 7
    assert tp.broadcast_object({"rank": tp.rank} if tp.rank == 0 else None) == {"rank": 0}
    tp.barrier()


def _check_linears(tp) -> None:
    torch.manual_seed(0)
    x = torch.randn(5, 16)
    w, b = torch.randn(24, 16), torch.randn(24)
    col = ColumnParallelLinear(16, 24, bias=True, tp=tp)
    _load(col, {"weight": (w, None), "bias": (b, None)})
    assert torch.allclose(tp.all_gather(col(x), dim=-1), F.linear(x, w, b), atol=1e-5)

    w_row, b_row = torch.randn(12, 24), torch.randn(12)
    row = RowParallelLinear(24, 12, bias=True, tp=tp)
    _load(row, {"weight": (w_row, None), "bias": (b_row, None)})
    x24 = torch.randn(5, 24)
    x_split = x24.chunk(WORLD, dim=-1)[tp.rank]  # the column-parallel layout a row layer consumes
    assert torch.allclose(row(x_split), F.linear(x24, w_row, b_row), atol=1e-5)  # bias added once

    gate, up = torch.randn(32, 16), torch.randn(32, 16)
    merged = MergedColumnParallelLinear(16, [32, 32], tp=tp)
    _load(merged, {"weight": (torch.cat([gate, up]), None)})  # fused checkpoint tensor (GLM)
    g_out, u_out = merged(x).chunk(2, dim=-1)
    assert torch.allclose(tp.all_gather(g_out), x @ gate.T, atol=1e-5)
    assert torch.allclose(tp.all_gather(u_out), x @ up.T, atol=1e-5)


def _check_partial_norm(tp) -> None:
    """A row-parallel layer left unreduced, then RMSNorm(partial=True): the norm of the full layer's
    output (plus the residual), the bias counted once, the same through a TimedTPGroup."""
    torch.manual_seed(3)
    w_row, b_row, weight = torch.randn(16, 24), torch.randn(16), torch.randn(16)
    x24, residual = torch.randn(5, 24), torch.randn(5, 16)
    row = RowParallelLinear(24, 16, bias=True, tp=tp, reduce_results=False)
    _load(row, {"weight": (w_row, None), "bias": (b_row, None)})
    x_split = x24.chunk(WORLD, dim=-1)[tp.rank]
    full = F.linear(x24, w_row, b_row)
    assert torch.allclose(tp.all_reduce(row(x_split)), full, atol=1e-5)  # a partial sum, bias on rank 0 only
    norm = RMSNorm(16, eps=1e-5, tp=tp)
    norm.weight.data.copy_(weight)
    assert torch.allclose(norm(row(x_split), partial=True), rms_norm_ref(full, weight, 1e-5), atol=1e-5)
    timed = TimedTPGroup(tp, torch.device("cpu"))
    for group in (tp, timed):
        norm.tp = group
        out, new_residual = norm(row(x_split), residual, partial=True)
        assert torch.allclose(new_residual, full + residual, atol=1e-5)
        assert torch.allclose(out, rms_norm_ref(full + residual, weight, 1e-5), atol=1e-5)
    assert timed.stats()["all_reduce"]["calls"] == 1
    assert torch.equal(norm(residual), rms_norm_ref(residual, weight, 1e-5))  # not partial: no collective


def _tiny_decoder_configs():
    """Llama with an o_proj bias (added on one rank only), GLM-4 (sandwich norms reduce inside the
    layer) and GLM (reduced by the next layer's input norm)."""
    from transformers import Glm4Config, GlmConfig, LlamaConfig

    common = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
              "num_attention_heads": 4, "num_key_value_heads": 2, "pad_token_id": 0}  # fmt: skip
    glm = {"head_dim": 16, "partial_rotary_factor": 0.5, "attention_bias": True}
    return [
        LlamaConfig(**common, attention_bias=True, architectures=["LlamaForCausalLM"]),
        Glm4Config(**common, **glm, architectures=["Glm4ForCausalLM"]),
        GlmConfig(**common, **glm, architectures=["GlmForCausalLM"]),
    ]


def _check_decoders_in_pieces(tp) -> None:
    """Whole models whose row-parallel outputs are reduced inside the next norm, run in two pieces
    (``forward_layers``, as decode graphs run them): the hidden states of the same model on one rank."""
    from transformers import AutoModelForCausalLM

    for config in _tiny_decoder_configs():
        torch.manual_seed(5)  # the same weights on every rank
        hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        for p in hf.parameters():
            if p.dim() == 1:  # random norm weights and biases, not ones and zeros
                p.data.normal_(1.0, 0.2)
        models = [build_model(config, torch.float32, "cpu", group) for group in (SINGLE_RANK, tp)]
        hidden = []
        for model, size in zip(models, (1, WORLD), strict=True):
            model.load_weights(hf.state_dict().items())
            spec = kv_cache_spec(config, size)
            cache = PagedKV(spec.num_layers, spec.num_kv_heads, spec.head_dim, num_blocks=8, block_size=4)
            ids = torch.arange(7) * 11 % 128
            positions, attn = cache.step([("a", 7)])
            with torch.inference_mode():
                carry = model.forward_layers(ids, positions, cache.kv_caches, attn, 0, 2, None)
                hidden.append(model.forward_layers(None, positions, cache.kv_caches, attn, 2, 3, carry))
        assert torch.allclose(hidden[1], hidden[0], atol=1e-5), config.model_type


def _check_qkv_replicated_kv(tp) -> None:
    """Hq=8, Hkv=2 on 4 ranks: 2 query heads each, kv head r // 2 replicated on two ranks."""
    torch.manual_seed(1)
    hq, hkv, d = 8, 2, 4
    x = torch.randn(3, 16)
    wq, wk, wv = torch.randn(hq * d, 16), torch.randn(hkv * d, 16), torch.randn(hkv * d, 16)
    bq, bk, bv = torch.randn(hq * d), torch.randn(hkv * d), torch.randn(hkv * d)
    qkv = QKVParallelLinear(16, d, hq, hkv, bias=True, tp=tp)
    assert (qkv.num_heads, qkv.num_kv_heads) == (2, 1)
    for shard, (w, b) in {"q": (wq, bq), "k": (wk, bk), "v": (wv, bv)}.items():
        _load(qkv, {"weight": (w, shard), "bias": (b, shard)})
    q, k, v = qkv(x).split([2 * d, d, d], dim=-1)
    q_full = F.linear(x, wq, bq).view(3, hq, d)
    k_full, v_full = F.linear(x, wk, bk).view(3, hkv, d), F.linear(x, wv, bv).view(3, hkv, d)
    my_q_heads = range(2 * tp.rank, 2 * tp.rank + 2)
    kv_head = my_q_heads[0] // (hq // hkv)  # the GQA rule
    assert torch.allclose(q.view(3, 2, d), q_full[:, list(my_q_heads)], atol=1e-5)
    assert torch.allclose(k, k_full[:, kv_head], atol=1e-5)
    assert torch.allclose(v, v_full[:, kv_head], atol=1e-5)


def _check_vocab(tp) -> None:
    """V=37 on 4 ranks: 10 rows each, the last rank 7 real rows and 3 padding rows."""
    torch.manual_seed(2)
    vocab, hidden = 37, 8
    table = torch.randn(vocab, hidden)
    emb = VocabParallelEmbedding(vocab, hidden, tp=tp)
    _load(emb, {"weight": (table, None)})
    ids = torch.tensor([0, 9, 10, 29, 30, 36, 5])
    assert torch.allclose(emb(ids), table[ids])
    head = ParallelLMHead(vocab, hidden, tp=tp)
    _load(head, {"weight": (table, None)})
    h = torch.randn(4, hidden)
    logits = head(h)
    if tp.rank == 0:
        assert logits.shape == (4, vocab)
        assert torch.allclose(logits, h @ table.T, atol=1e-5)
    else:
        assert logits is None
    tied = ParallelLMHead(vocab, hidden, tie_to=emb, tp=tp)
    assert tied.weight is emb.weight
    empty = head(h[:0])  # no row to sample this step: no collective, the same on every rank
    assert (empty.shape == (0, vocab)) if tp.rank == 0 else empty is None
    _check_greedy_head(tp, head, table, h)


def _check_greedy_head(tp, head, table, h) -> None:
    """The vocab-parallel argmax equals argmax of the full logits on every rank, ties included."""
    assert torch.equal(head.greedy(h), (h @ table.T).argmax(dim=-1))
    # Rows 0-1: a tie between ids 3 (rank 0) and 25 (rank 2) -> 3; a tie inside rank 1's range
    # (ids 12 and 15) -> 12. Row 2: the maximum on the last rank (id 36), beside its padding rows.
    hidden = 4
    tied = torch.zeros(37, hidden)
    tied[3, 0] = tied[25, 0] = 1.0
    tied[12, 1] = tied[15, 1] = 1.0
    tied[36, 2] = 1.0
    # Row 3: every real logit negative, the best (-0.5) at id 33; the last rank's padding rows
    # would give 0 and must not win.
    tied[:, 3] = -1.0
    tied[33, 3] = -0.5
    head = ParallelLMHead(37, hidden, tp=tp)
    _load(head, {"weight": (tied, None)})
    queries = torch.eye(hidden)
    assert head.greedy(queries).tolist() == [3, 12, 36, 33] == (queries @ tied.T).argmax(dim=-1).tolist()


def _rank_body(rank: int, port: int, errors) -> None:
    try:
        tp = init_tp_group(rank, WORLD, "127.0.0.1", port, torch.device("cpu"), timeout_s=60)
        torch.set_num_threads(1)
        checks = (_check_collectives, _check_linears, _check_partial_norm, _check_qkv_replicated_kv, _check_vocab,
                  _check_decoders_in_pieces)  # fmt: skip
        for check in checks:
            check(tp)
        tp.barrier()
        tp.destroy()
        errors.put((rank, None))
    except BaseException:  # noqa: BLE001 - reported to the test process
        errors.put((rank, traceback.format_exc()))


def test_parallel_layers_match_unsharded_on_4_gloo_ranks():
    import datetime

    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=60))
    ctx = torch.multiprocessing.get_context("spawn")
    errors = ctx.Queue()
    procs = [ctx.Process(target=_rank_body, args=(r, store.port, errors), daemon=True) for r in range(WORLD)]
    for p in procs:
        p.start()
    try:
        results = dict(errors.get(timeout=180) for _ in range(WORLD))
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
    failures = {r: e for r, e in results.items() if e}
    assert not failures, "\n".join(f"rank {r}:\n{e}" for r, e in failures.items())


def test_single_rank_group_is_identity():
    x = torch.randn(3, 4)
    assert SINGLE_RANK.all_reduce(x) is x and SINGLE_RANK.gather(x) is x and SINGLE_RANK.all_gather(x) is x
    assert SINGLE_RANK.broadcast_object("a") == "a"
    SINGLE_RANK.barrier()


# ---------------------------------------------------------------- validation, no process starts


class _Cfg:
    architectures = ("LlamaForCausalLM",)
    vocab_size, rms_norm_eps, max_position_embeddings = 100, 1e-6, 64

    def __init__(self, heads=8, kv=2, inter=64):
        self.num_attention_heads, self.num_key_value_heads, self.intermediate_size = heads, kv, inter
        self.num_hidden_layers, self.hidden_size = 2, 32


@pytest.mark.parametrize(
    "cfg, tp, words",
    [
        (_Cfg(heads=9, kv=3), 2, ["num_attention_heads (9)", "tensor_parallel_size (2)"]),
        (_Cfg(heads=12, kv=3), 2, ["num_key_value_heads (3)", "tensor_parallel_size (2)"]),
        (_Cfg(heads=12, kv=6), 4, ["num_key_value_heads (6)", "(4)"]),
        (_Cfg(inter=66), 4, ["intermediate_size (66)", "(4)"]),
    ],
)
def test_impossible_head_splits_are_rejected(cfg, tp, words):
    with pytest.raises(ValueError) as err:
        check_tensor_parallel(cfg, tp)
    for word in words:
        assert word in str(err.value)


def test_kv_cache_spec_is_per_rank():
    assert kv_cache_spec(_Cfg(heads=8, kv=8), 4).num_kv_heads == 2
    assert kv_cache_spec(_Cfg(heads=8, kv=2), 4).num_kv_heads == 1  # replicated: one head per rank
    assert kv_cache_spec(_Cfg(heads=8, kv=1), 2).num_kv_heads == 1


def test_devices_are_checked_before_anything_starts():
    cfg = _Cfg()
    if torch.cuda.device_count() < 8:
        config = EngineConfig.from_kwargs(model="x", device="cuda", tensor_parallel_size=8)
        with pytest.raises(ValueError, match=r"tensor_parallel_size \(8\) is larger than the number of CUDA devices"):
            check_parallel_config(config, cfg)
    config = EngineConfig.from_kwargs(model="x", device="cpu", tensor_parallel_size=16)
    with pytest.raises(ValueError, match=r"tensor_parallel_size \(16\) on CPU must be <= 8"):
        check_parallel_config(config, _Cfg(heads=16, kv=16))
    check_parallel_config(EngineConfig.from_kwargs(model="x", device="cpu", tensor_parallel_size=4), cfg)


def test_custom_all_reduce_is_refused_where_it_cannot_run():
    from pagoda.engine.custom_all_reduce import custom_all_reduce_unavailable

    assert "not cuda" in custom_all_reduce_unavailable(2, torch.device("cpu"))
    if torch.cuda.is_available():
        assert "world size 3" in custom_all_reduce_unavailable(3, torch.device("cuda", 0))


def test_custom_all_reduce_takes_only_tensors_its_kernel_can_move():
    """``SymmMemAllReduce.fits`` is a pure predicate (the kernel itself needs GPUs: bench/allreduce.py)."""
    from pagoda.engine.custom_all_reduce import SymmMemAllReduce

    fast = SymmMemAllReduce.__new__(SymmMemAllReduce)  # no group: only the predicate is exercised
    fast.dtype, fast.max_numel = torch.bfloat16, 4096
    ok = torch.zeros(2, 1024, dtype=torch.bfloat16)
    assert not fast.fits(ok)  # a CPU tensor
    if not torch.cuda.is_available():
        return
    ok = ok.cuda()
    assert fast.fits(ok)
    assert not fast.fits(ok.float())  # another dtype than the buffer's
    assert not fast.fits(torch.zeros(8, 1024, dtype=torch.bfloat16, device="cuda"))  # larger than the buffer
    assert not fast.fits(ok[:, :1000].contiguous()[:, :-1])  # not contiguous
    assert not fast.fits(ok.view(-1)[8:16])  # a storage offset
    assert not fast.fits(ok.view(-1)[:3])  # not a multiple of 16 bytes


def test_fused_norm_takes_only_what_its_workspace_holds():
    """``SymmMemAllReduce.fits_norm`` is a pure predicate of shape and dtype (the kernel needs GPUs)."""
    from types import SimpleNamespace

    from pagoda.engine.custom_all_reduce import SymmMemAllReduce

    fast = SymmMemAllReduce.__new__(SymmMemAllReduce)  # no group: only the predicate is exercised
    fast.dtype, fast.norm_workspace = torch.bfloat16, SimpleNamespace(max_rows=lambda hidden, dtype: 2**16 // hidden)
    ok = torch.zeros(2, 1024, dtype=torch.bfloat16)
    assert not fast.fits_norm(ok)  # a CPU tensor
    if not torch.cuda.is_available():
        return
    ok = ok.cuda()
    assert fast.fits_norm(ok)
    assert not fast.fits_norm(ok.float())  # another dtype than the model's
    assert not fast.fits_norm(ok.new_zeros(65, 1024))  # more rows than the workspace holds at this hidden size
    assert not fast.fits_norm(ok[:0])  # no rows: nothing to launch
    assert not fast.fits_norm(ok.view(2, 2, 512))  # not (T, H)
    assert fast.fits_norm(ok.new_zeros(64, 64)) and not fast.fits_norm(ok.new_zeros(64, 64).t())  # not contiguous
