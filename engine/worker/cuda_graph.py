"""CUDA graphs for pure decode steps.

A decode step of B sequences launches hundreds of small kernels; replaying a captured graph
launches them as one. Graphs are captured once per batch-size bucket over static input buffers;
a step of B sequences pads up to the next bucket:

- padded rows get slot -1 (the cache write skips them) and sequence length 0 (the decode kernel
  writes zeros), so they neither touch the KV cache nor cost attention work;
- ``max_seq_len`` is fixed to ``max_model_len`` at capture, which fixes the split-K factor of the
  decode kernel without a device sync.

All buckets share one memory pool, captured largest first.

Each bucket is captured as a few pieces (consecutive ranges of layers), replayed back to back.
Launching a graph costs host time that grows with its node count, and the GPU waits for the
launch: with pieces, only the first piece's launch is exposed, the others are launched while
the GPU runs the earlier ones; so the first piece is a single layer (``piece_ranges``). The
pieces' intermediate (hidden, residual) tensors stay alive, so no later capture reuses their memory.

Inputs reach the static buffers from pinned host mirrors with one asynchronous copy per buffer
(three per step), instead of a pageable copy per tensor plus a device-to-device copy into the
buffer. The mirrors are rewritten only once the previous step's copies have completed (an event;
normally long done: the step before the previous one has finished by then).

A last piece per bucket, the greedy head (``model.greedy_tokens``: LM head, argmax, and under
tensor parallelism the all-gather of each rank's best (value, id)), is replayed only for steps
whose rows are all plain greedy; other steps take the hidden states to the eager sampler. The
head also writes its ids into ``last_ids``, and the first piece starts with a gather
(``input_ids = id_pool[gather]``, where ``id_pool`` is ``last_ids`` followed by the host's ids), so a
step launched before the previous step's ids reached the host reads them on the device.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from pagoda.engine.attention_metadata import AttentionMetadata

if TYPE_CHECKING:
    from pagoda.engine.worker.runner_data import HostBatch


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 up to max_num_seqs (and max_num_seqs itself)."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs] + list(range(16, max_num_seqs, 16))
    return sorted(set(sizes + [max_num_seqs]))


def piece_ranges(num_layers: int, num_pieces: int) -> list[tuple[int, int]]:
    """Layer ranges of the pieces: the first is one layer (its launch is the one the GPU waits
    for, and launch time grows with node count), the rest split the other layers evenly."""
    if num_pieces <= 1 or num_layers <= 1:
        return [(0, num_layers)]
    rest = min(num_pieces - 1, num_layers - 1)
    bounds = [0] + [1 + round(i * (num_layers - 1) / rest) for i in range(rest + 1)]
    return list(itertools.pairwise(bounds))


class DecodeGraphs:
    def __init__(
        self,
        model: nn.Module,
        kv_caches: list[torch.Tensor],
        block_size: int,
        max_model_len: int,
        max_num_seqs: int,
        device: torch.device,
        num_pieces: int = 4,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.batch_sizes = graph_batch_sizes(max_num_seqs)
        max_b = self.batch_sizes[-1]
        self.max_blocks = -(-max_model_len // block_size)
        i32 = dict(dtype=torch.int32, device=device)
        # rows: the last greedy ids, then what the host fills with one copy: input ids, positions,
        # slot mapping, and each row's index into id_pool (rows 0-1): maxB + row for its host id
        self.tokens = torch.zeros((5, max_b), dtype=torch.long, device=device)  # (5, maxB)
        self.last_ids, self.host_ids, self.positions, self.slot_mapping, self.gather = self.tokens.unbind(0)
        self.slot_mapping.fill_(-1)
        self.gather.copy_(torch.arange(max_b, 2 * max_b, device=device))
        self.id_pool = self.tokens[:2].reshape(-1)  # (2 maxB,) a view: last_ids then host_ids
        self.seq_lens = torch.zeros(max_b, **i32)  # (maxB,)
        self.query_start_loc = torch.arange(max_b + 1, **i32)  # (maxB + 1,) one token each
        self.block_tables = torch.zeros((max_b, self.max_blocks), **i32)  # (maxB, max_blocks)
        # Pinned host mirrors (torch tensors to copy from, numpy views to write into). Copies take whole
        # rows so that every copy is contiguous; stale entries past a row's blocks are never read.
        pinned = dict(device="cpu", pin_memory=True)
        self.host = {
            "tokens": torch.zeros((4, max_b), dtype=torch.long, **pinned),
            "seq_lens": torch.zeros(max_b, dtype=torch.int32, **pinned),
            "block_tables": torch.zeros((max_b, self.max_blocks), dtype=torch.int32, **pinned),
        }
        self.host_np = {name: t.numpy() for name, t in self.host.items()}
        self._host_rows = np.arange(max_b, 2 * max_b)  # gather indices of the host's ids
        self.copies_done = torch.cuda.Event()  # the last step's host-to-device copies finished
        num_layers = model.num_layers
        self.layer_ranges = piece_ranges(num_layers, num_pieces)
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.head_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.greedy_outputs: dict[int, torch.Tensor] = {}  # per bucket, (bucket,) int64 argmax ids
        self._carries: dict[int, list] = {}  # per bucket, the pieces' intermediate outputs (kept alive)

    def _metadata(self, batch: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:batch],
            query_start_loc=self.query_start_loc[: batch + 1],
            seq_lens=self.seq_lens[:batch],
            context_lens=None,  # decode reads seq_lens only
            block_tables=self.block_tables[:batch],
            query_lens_cpu=[1] * batch,
            seq_lens_cpu=[self.max_model_len] * batch,
            max_query_len=1,
            max_seq_len=self.max_model_len,
            block_size=self.block_size,
        )

    def _forward_piece(self, batch: int, start: int, end: int, carry):
        input_ids = self.id_pool.index_select(0, self.gather[:batch]) if start == 0 else None
        return self.model.forward_layers(
            input_ids, self.positions[:batch], self.kv_caches, self._metadata(batch), start, end, carry
        )

    @torch.inference_mode()
    def capture(self) -> None:
        pool = None
        for batch in reversed(self.batch_sizes):
            self.model(self.host_ids[:batch], self.positions[:batch], self.kv_caches, self._metadata(batch))
            torch.cuda.synchronize()  # warm-up above: Triton compiles and autotunes outside the capture
            carry, graphs, carries = None, [], []
            for start, end in self.layer_ranges:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    carry = self._forward_piece(batch, start, end, carry)
                pool = graph.pool()
                graphs.append(graph)
                carries.append(carry)
            self.graphs[batch], self._carries[batch], self.outputs[batch] = graphs, carries, carry
            self.model.greedy_tokens(carry)  # outside the capture first, like the layers above
            head = torch.cuda.CUDAGraph()
            with torch.cuda.graph(head, pool=pool):
                self.greedy_outputs[batch] = self.model.greedy_tokens(carry)
                self.last_ids[:batch].copy_(self.greedy_outputs[batch])
            self.head_graphs[batch] = head
        torch.cuda.synchronize()

    def fits(self, host: "HostBatch") -> bool:
        return host.is_decode_only and len(host.req_ids) <= self.batch_sizes[-1] and bool(self.graphs)

    def run(self, host: "HostBatch", greedy_head: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Replay the smallest bucket that holds this decode batch; returns hidden (B, H) and, with
        ``greedy_head``, each row's argmax id (B,) (else None)."""
        num = len(host.req_ids)
        bucket = next(b for b in self.batch_sizes if b >= num)
        self.copies_done.synchronize()  # a step that sampled nothing never waited for its copies
        tokens, seq_lens = self.host_np["tokens"], self.host_np["seq_lens"]
        tokens[0, :num] = host.input_ids
        tokens[1, :num] = host.positions
        tokens[2, :num] = host.slot_mapping
        tokens[2, num:bucket] = -1  # padded rows write no KV ...
        tokens[3, :bucket] = self._host_rows[:bucket]
        if host.pending_src is not None:  # tokens the previous step sampled, still only on the device
            rows = np.nonzero(host.pending_src >= 0)[0]
            tokens[3, rows] = host.pending_src[rows]
        seq_lens[:num] = host.seq_lens
        seq_lens[num:bucket] = 0  # ... and attend to nothing
        self.host_np["block_tables"][:num, : host.block_tables.shape[1]] = host.block_tables
        self.tokens[1:].copy_(self.host["tokens"], non_blocking=True)
        self.seq_lens.copy_(self.host["seq_lens"], non_blocking=True)
        self.block_tables[:num].copy_(self.host["block_tables"][:num], non_blocking=True)
        self.copies_done.record()
        for graph in self.graphs[bucket]:
            graph.replay()
        if not greedy_head:
            return self.outputs[bucket][:num], None
        self.head_graphs[bucket].replay()
        return self.outputs[bucket][:num], self.greedy_outputs[bucket][:num]
