"""CTranslate2 as a peer of bench/peers.py; runs in bench/.peers/ct2 (see protocol.py).

The checkpoint is converted once into the work directory with CTranslate2's own
Transformers converter (which needs transformers and torch in this venv). Its Generator
takes token strings, so ids go through the converted vocabulary.json (one string an id).
"""
from __future__ import annotations

import json
from pathlib import Path

import ctranslate2
from ctranslate2.converters import TransformersConverter

from protocol import LoadRequest, serve


class Ct2:
    def __init__(self, req: LoadRequest):
        if req.dtype != "float32":
            # CTranslate2's CPU kernels compute float32 and int8 only; it would run a
            # bfloat16 request in float32 and so not be a bfloat16 row.
            raise ValueError("CTranslate2 has no bfloat16 compute on CPU")
        out = Path(req.work) / "ct2"
        if not (out / "model.bin").exists():
            TransformersConverter(req.model, low_cpu_mem_usage=False).convert(
                str(out), quantization="float32", force=True)
        self.vocab = json.loads((out / "vocabulary.json").read_text())
        if len(set(self.vocab)) != len(self.vocab):
            raise ValueError("the converted vocabulary repeats a string: ids would not round-trip")
        self.generator = ctranslate2.Generator(str(out), device="cpu", compute_type="float32",
                                               intra_threads=req.threads, inter_threads=1)
        self.info = f"ctranslate2 {ctranslate2.__version__}, float32, {req.threads} threads"

    def generate(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        batch = [[self.vocab[i] for i in p] for p in prompts]
        results = self.generator.generate_batch(
            batch, max_length=new_tokens, sampling_topk=1, include_prompt_in_result=False,
            end_token=[], max_batch_size=0)
        return [r.sequences_ids[0] for r in results]


if __name__ == "__main__":
    serve(Ct2)
