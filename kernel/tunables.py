"""Every engine tunable in one place, each with why it has its value."""

BLOCK_SIZE = 16                  # tokens per KV block, as vLLM: small waste, long enough rows
MAX_NUM_SEQS = 256               # sequences in one batch; above this a step's overhead dominates
MAX_NUM_BATCHED_TOKENS = 2048    # tokens in one forward: bounds a step's latency for decoders
KV_MEMORY_FRACTION = 0.10        # share of the device's free memory the KV pool takes by default
KV_MEMORY_CAP = 1 << 30          # ...but at most this many bytes unless asked (a CPU box is shared)
SWAP_FRACTION = 0.5              # host swap pool, in blocks, as a share of the device KV pool
POISON_ENV = "LLMOS_KV_POISON"   # "1": fill freed KV blocks with NaN to expose use-after-free
ARRIVAL_WINDOW = 0.002           # s an idle engine waits for more requests before stepping
FAULT_ENV = "LLMOS_FAULT"         # "engine-crash": the engine's first step raises (tests only)
