"""Turns a scheduled batch into one forward pass: flat inputs, attention metadata, logits.

Engine thread only. The scheduler has already assigned KV slots for every token in the
batch (so a sequence's `num_computed` already counts them); this module lays them out
as DESIGN.md's driver ops expect and returns logits only for the requests whose pending
tokens all ran, because only they sample a next token.
"""
from __future__ import annotations

import torch

from .models.llama import AttentionBatch, CausalLM
from .request import Request


class ModelRunner:
    def __init__(self, model: CausalLM, driver, kv_caches: list, block_size: int):
        self.model, self.driver, self.kv_caches = model, driver, kv_caches
        self.block_size = block_size

    @torch.inference_mode()
    def run(self, items: list[tuple[Request, int]]) -> tuple[list[Request], torch.Tensor | None]:
        """Run `items` (request, tokens this step); return the requests that sample, and their
        logits [R, vocab] (None when none of them does)."""
        device, bs = self.driver.device, self.block_size
        ids, positions, slots, seq_lens, starts, tables = [], [], [], [], [0], []
        sampling, rows = [], []
        for req, n in items:
            seq = req.seq
            end = seq.num_computed
            start = end - n
            blocks = seq.table.blocks
            ids += seq.tokens[start:end]
            positions += range(start, end)
            slots += [blocks[p // bs] * bs + p % bs for p in range(start, end)]
            seq_lens.append(end)
            starts.append(starts[-1] + n)
            tables.append(blocks)
            if end == len(seq.tokens):
                sampling.append(req)
                rows.append(starts[-1] - 1)
        width = max(len(t) for t in tables)
        batch = AttentionBatch(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables],
                                      dtype=torch.int32, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device))
        hidden = self.model(torch.tensor(ids, device=device),
                            torch.tensor(positions, device=device),
                            self.kv_caches, batch)
        if not sampling:
            return sampling, None
        return sampling, self.model.logits(hidden[torch.tensor(rows, device=device)]).cpu()
