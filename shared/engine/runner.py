"""Running one step on one rank: its shard of the model over its own KV cache.

Every rank of a worker instance runs the same `Step` (the leader's engine plans it; the
other ranks receive it, shared/ranks/): the sequences of this rank's DP group, with their
block tables (sent once per request, kept here until the request ends). The result is the
float32 logits of the sampled rows on the leader of each DP group, None elsewhere.

Pipeline parallel: a step's tokens are split into as many micro-batches as there are
stages (a long prompt chunk is cut into pieces, so chunked prefill keeps every stage busy);
stage p runs micro-batch i while stage p+1 runs i-1. Activations go to the next stage of
the same tensor slice; the last stage's slice-0 rank sends each micro-batch's logits to the
DP group's leader. A piece of a prompt sees the earlier pieces' K/V, which this stage wrote
when it ran them.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from shared.engine.batch import ForwardBatch, SequenceChunk
from shared.engine.collectives import Collectives
from shared.engine.kv_cache import PagedKVCache, slot_mapping
from shared.engine.step_work import Step


class StepRunner:
    def __init__(self, model: nn.Module, kv_cache: PagedKVCache, comm: Collectives):
        self.model = model  # the rank's CausalLM (or its faster twin, prepack.py)
        self.kv_cache = kv_cache
        self.comm = comm
        self.shard = comm.shard
        self.tables: dict[str, list[int]] = {}

    def run(self, step: Step) -> torch.Tensor | None:
        """Runs this rank's part of `step`; logits `[R, vocab]` on the DP group's leader, else None."""
        for request_id in step.forget:
            self.tables.pop(request_id, None)
        self.tables.update(step.tables)
        group = step.groups[self.shard.dp_group] if self.shard.dp_group < len(step.groups) else []
        dp_counts = tuple(sum(c.num_new for c in g) for g in step.groups) if self.shard.dp > 1 else None
        if not group:
            logits = self._idle(dp_counts)
        else:
            chunks = [SequenceChunk(self.tables[c.request_id], c.num_cached, c.num_new, c.wants_logits) for c in group]
            input_ids = [token for c in group for token in c.input_ids]
            if self.shard.pp == 1:
                batch = ForwardBatch.build(chunks, self.kv_cache.block_size, dp_counts)
                logits = self.model(torch.tensor(input_ids, dtype=torch.int64), batch, self.kv_cache)
            else:
                logits = self._pipelined(chunks, input_ids, dp_counts)
        if self.shard.dp == 1:
            return logits
        return self._gather_groups(step, logits)

    def export(self, block_table: list[int], num_tokens: int) -> torch.Tensor:
        """This rank's K and V of a request's first `num_tokens` tokens: `[its layers, 2, T, its heads, D]`."""
        slots = slot_mapping(torch.tensor(block_table, dtype=torch.int64), torch.arange(num_tokens), self.kv_cache.block_size)
        return self.kv_cache.export(slots)

    def _idle(self, dp_counts: tuple[int, ...] | None) -> None:
        """A DP group with nothing to run still joins the MoE layers' collectives (an empty batch)."""
        if dp_counts is None or not any(dp_counts):
            return None
        model = self.model
        started = time.perf_counter()
        empty = torch.zeros((0, model.config.hidden_size), dtype=model.dtype)
        for block in model.moe_blocks():
            block(empty, dp_counts)
        self.comm.timed("empty_batch", started)
        return None

    def _gather_groups(self, step: Step, logits: torch.Tensor | None) -> torch.Tensor | None:
        """Rank 0 samples for every DP group: each group's leader sends it its rows (group order)."""
        wanted = [sum(c.wants_logits for c in group) for group in step.groups]
        leaders = [self._rank(d, 0, 0) for d in range(self.shard.dp)]
        if self.rank == 0:
            parts = [logits] if wanted[0] else []
            vocab = self.model.config.vocab_size
            parts += [self.comm.recv((wanted[d], vocab), torch.float32, leaders[d]) for d in range(1, self.shard.dp) if wanted[d]]
            return torch.cat(parts) if parts else None
        if self.rank in leaders and wanted[leaders.index(self.rank)]:
            self.comm.send(logits, 0).wait()
        return None

    def _pipelined(self, chunks: list[SequenceChunk], input_ids: list[int], dp_counts: tuple[int, ...] | None) -> torch.Tensor | None:
        shard, comm, model = self.shard, self.comm, self.model
        me = shard.coord
        prev_stage = self._rank(me.dp, me.pp - 1, me.tp)
        next_stage = self._rank(me.dp, me.pp + 1, me.tp)
        last_leader = self._rank(me.dp, shard.pp - 1, 0)
        group_leader = self._rank(me.dp, 0, 0)
        hidden, dtype = model.config.hidden_size, model.dtype
        sends, logits = [], []
        # With data-parallel groups each step is one micro-batch: MoE layers exchange a group's
        # whole step with the other groups, which must all run the same number of passes.
        micro = split_micro_batches(chunks, input_ids, shard.pp if dp_counts is None else 1)
        for part_chunks, part_ids in micro:
            batch = ForwardBatch.build(part_chunks, self.kv_cache.block_size, dp_counts)
            if shard.is_first_stage:
                x = model.embed(torch.tensor(part_ids, dtype=torch.int64))
            else:
                x = comm.recv((batch.num_tokens, hidden), dtype, prev_stage)
            x = model.run_layers(x, batch, self.kv_cache)
            if not shard.is_last_stage:
                sends.append(comm.send(x, next_stage))
                continue
            rows = model.logits(x[batch.last_token_index]) if batch.last_token_index.numel() else None
            if rows is not None and self.rank != group_leader:
                sends.append(comm.send(rows, group_leader))
            elif rows is not None:
                logits.append(rows)
        if self.rank == group_leader and not shard.is_last_stage:
            vocab = model.config.vocab_size
            for part_chunks, _ in micro:
                wanted = sum(c.wants_logits for c in part_chunks)
                if wanted:
                    logits.append(comm.recv((wanted, vocab), torch.float32, last_leader))
        for work in sends:
            work.wait()
        return torch.cat(logits) if logits else None

    @property
    def rank(self) -> int:
        return self.shard.rank

    def _rank(self, dp: int, pp: int, tp: int) -> int:
        return (dp * self.shard.pp + pp) * self.shard.tp + tp


def split_micro_batches(
    chunks: list[SequenceChunk], input_ids: list[int], parts: int
) -> list[tuple[list[SequenceChunk], list[int]]]:
    """The step's tokens in about `parts` equal runs, in order; a prompt chunk may be cut into pieces
    (only its last piece samples), a decode stays whole."""
    total = sum(c.num_new for c in chunks)
    target = max(1, -(-total // parts))
    out: list[tuple[list[SequenceChunk], list[int]]] = []
    current: list[SequenceChunk] = []
    current_ids: list[int] = []
    room, position = target, 0
    for chunk in chunks:
        cached, remaining = chunk.num_cached, chunk.num_new
        while remaining:
            take = min(remaining, room)
            last = take == remaining
            current.append(SequenceChunk(chunk.block_table, cached, take, chunk.wants_logits and last))
            current_ids += input_ids[position : position + take]
            position, cached, remaining, room = position + take, cached + take, remaining - take, room - take
            if room == 0:
                out.append((current, current_ids))
                current, current_ids, room = [], [], target
    if current:
        out.append((current, current_ids))
    return out
