"""Every kernel and engine tunable in one place, each with why it has its value."""

BLOCK_SIZE = 16                  # tokens per KV block, as vLLM: small waste, long enough rows
MAX_NUM_SEQS = 256               # sequences in one batch; above this a step's overhead dominates
MAX_NUM_BATCHED_TOKENS = 2048    # tokens in one forward: bounds a step's latency for decoders
KV_MEMORY_FRACTION = 0.10        # share of the device's free memory the KV pool takes by default
KV_MEMORY_CAP = 1 << 30          # ...but at most this many bytes unless asked (a CPU box is shared)
MEMORY_FRACTION = 0.85           # share of free device memory the model table's budget takes
MEMORY_CAP_CPU = 8 << 30         # ...but on a CPU (shared with everything else) at most this
KEEP_ALIVE = 300.0               # s a model loaded on demand stays loaded once idle (Ollama's 5m)
SWAP_FRACTION = 0.5              # host swap pool, in blocks, as a share of the device KV pool
POISON_ENV = "LLMOS_KV_POISON"   # "1": fill freed KV blocks with NaN to expose use-after-free
ARRIVAL_WINDOW = 0.002           # s an idle engine waits for more requests before stepping
SIGNAL_POLL = 0.5                # s at most an idle engine loop sleeps (it acts on SIGTERM then)
FAULT_ENV = "LLMOS_FAULT"         # "engine-crash": the engine's first step raises (tests only)
SNAPSHOT_PERIOD = 0.05           # s between snapshots (ps, meminfo) while the engine is busy
INLINE_TEXT = 4096               # characters tokenized on the I/O thread; longer: a worker
TOKENIZE_WORKERS = 2             # threads that tokenize long texts (off the I/O and engine threads)
CHARS_PER_TOKEN = 32             # text longer than context length x this is E2BIG untokenized
SAMPLE_PERIOD = 1.0              # s between psutil samples of every process's CPU and RSS
HEARTBEAT_TIMEOUT = 30.0         # s of silence after which an attached program is taken for dead
KERNEL_LOG_MAX = 10 << 20        # bytes of log/kernel.log before it rotates to kernel.log.1
KERNEL_LOG_KEEP = 3              # rotated kernel logs kept (kernel.log.1..3): <= 40 MiB in all
AUDIT_LOG_MAX = 10 << 20         # bytes of log/audit.log before it rotates to audit.log.1
AUDIT_LOG_KEEP = 3               # rotated audit logs kept (audit.log.1..3): <= 40 MiB in all
AUDIT_BURST = 20                 # refusals of one kind from one caller recorded per AUDIT_PERIOD;
AUDIT_PERIOD = 60.0              # s; the rest are counted in one "suppressed" record, so a flood
                                 # of bad hellos cannot rotate the evidence away
AGENT_MEMORY = 64 << 20          # bytes an agent is assumed to take (a Python SDK agent: ~20 MiB
                                 # RSS, more once it works): default live agents = memory / this
MIN_AGENTS, MAX_AGENTS = 16, 1024  # ...within these bounds; llmos up --max-agents overrides
SHARE_GROUPS_KEPT = 64           # share groups remembered per process, so each is audited once

# ---- scheduling (kernel/policy.py) and KV virtual memory (kernel/vm.py) ----
DEFAULT_POLICY = "fair"          # llmos up --sched: nice works as weights, a flood is contained,
                                 # and no policy beat fifo on the agent workload (README)
AGING_S = 2.0                    # s of waiting that lifts a request one level (priority: one
                                 # nice step; las: one service level), so none waits unboundedly
FAIR_PROMPT_WEIGHT = 1.0         # fair (VTC): a prompt token's cost in the virtual counter...
FAIR_OUTPUT_WEIGHT = 2.0         # ...and a generated one's (VTC's w_p, w_q: decode costs more)
FAIR_MARGIN = 256.0              # weighted tokens a waiting process must be behind a running
                                 # one before it displaces it: hysteresis against thrashing
LAS_QUANTUM = 256                # tokens of program service in las's first level; each next
                                 # level holds twice as many (as Autellix's PLAS queues)
KV_TTL = 3.0                     # s a context stays resident after its last use (an agent
                                 # between two turns, waiting on a tool), as Continuum's TTL
SWAP_MIN_TOKENS = 16             # a preempted request shorter than this (one block) is
                                 # recomputed, not swapped: a few tokens cost less to compute
                                 # than a block does to copy out and back
KV_DEFAULT_SHARE = 0.75          # default kv_blocks limit of a process: this share of the pool
DEFAULT_CALLS = 512              # default limits of a process (llmos up --limit overrides)
DEFAULT_CONTEXTS = 256
DEFAULT_CHILDREN = 64

# ---- metrics (kernel/metrics.py, the metrics syscall) ----
METRICS_PROCS = 32               # processes metrics names (the most tokens in and out); the
                                 # rest are summed in one "other" row: a bounded reply, and a
                                 # bounded number of series in a Prometheus scrape
# Latency histogram bounds (seconds), vLLM's, so that dashboards made for vLLM read ours:
# time to first token, time per output token after the first, and a request end to end.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0, 240.0, 480.0, 960.0, 1920.0)
