"""The synthetic tasks the embedded model "tiny" is trained on, and their checker.

Three tasks, each a stream of (prompt, expected) pairs drawn with a seeded `random.Random`:

    add      "12+47="            -> "59"       two-digit addition, 10..99 + 10..99
    reverse  "reverse c a t ="   -> "t a c"    a word of 3..6 letters, one letter a token
    chat     [{"role": "user", "content": "add 12 47"}]      -> "59"
             [{"role": "user", "content": "reverse c a t"}]  -> "t a c"

A prompt is a `str` for the plain tasks and a `list` of messages ({"role", "content"})
for `chat`; test with `isinstance(prompt, str)`. How a prompt becomes tokens:

    str       tokenizer.encode(prompt)  (the post-processor prepends <s>)
    messages  render_chat(messages, add_generation_prompt=True), encoded *without*
              special tokens, because the template writes <s> itself (as Llama 3 does)

The model answers with `completion(task, expected)` and then </s>, e.g. " t a c" for
reverse (the space is the separator after "="); `score` ignores surrounding blanks.

Held-out split: every problem has a key ("add:12+47", "reverse:cat") and the key's
SHA-256 decides its split, so a held-out problem appears in no training example in any
form (plain or chat, nor as an earlier turn of a chat). The demo problems are held out
by name, so `llmos demo` never shows a problem the model was trained on.
"""
from __future__ import annotations

import hashlib
import random
import string

import jinja2

TASKS = ("add", "reverse", "chat")
SPLITS = ("train", "test")
HELDOUT_PERCENT = 10          # share of problem keys held out for evaluation
WORD_LENGTHS = (3, 6)         # inclusive range of letters in a reversed word
SYSTEM_PROMPT = "You are tiny. You add numbers and reverse words."

# Zephyr-style turns. A turn ends with </s> (the eos token), so generation stops there.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
BOS, EOS, PAD = "<s>", "</s>", "<pad>"
ROLES = ("system", "user", "assistant")
SPECIAL_TOKENS = [BOS, EOS, PAD] + [f"<|{role}|>" for role in ROLES]

# Shown by `llmos demo`; held out of training by name (see _is_heldout).
_DEMO_ADD = ((12, 47), (38, 57), (64, 89))
_DEMO_WORDS = ("cat", "llmos", "kernel")

_template = jinja2.Environment().from_string(CHAT_TEMPLATE)


def render_chat(messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The chat template applied to `messages`, as transformers' apply_chat_template does."""
    return _template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                            bos_token=BOS, eos_token=EOS)


def completion(task: str, expected: str) -> str:
    """The exact text the model is trained to produce after the prompt (before </s>)."""
    return " " + expected if task == "reverse" else expected


def score(task: str, completion_text: str, expected: str) -> bool:
    """True when a model's completion answers the problem.

    `completion_text` is the decoded text generated after the prompt; anything from a
    literal "</s>" on is ignored, as are leading and trailing blanks.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; tasks are {TASKS}")
    return completion_text.split(EOS, 1)[0].strip() == expected


def examples(task: str, n: int, split: str = "train", seed: int = 0) -> list[tuple]:
    """`n` (prompt, expected) pairs of `task` from `split`, a pure function of its arguments.

    The prompt is a `str` (add, reverse) or a list of messages (chat). The train split
    draws with replacement (it is a stream for training); the test split draws distinct
    problems and raises ValueError when `n` exceeds what it holds (818 additions).
    """
    if task not in TASKS or split not in SPLITS:
        raise ValueError(f"task must be one of {TASKS} and split one of {SPLITS}")
    rng, seen, out, misses = random.Random(f"{task}/{split}/{seed}"), set(), [], 0
    while len(out) < n:
        kind = rng.choice(("add", "reverse")) if task == "chat" else task
        key, problem = _draw(kind, rng, split)
        if split == "test":
            if key in seen:
                misses += 1
                if misses > 20_000:   # no new problem in that many draws: the split is spent
                    raise ValueError(f"the test split of {task!r} holds fewer than {n} problems")
                continue
            seen.add(key)
            misses = 0
        if task == "chat":
            out.append(_chat(kind, problem, rng, split))
        else:
            out.append(_plain(kind, problem))
    return out


def demo_prompts() -> list[tuple[str, object, str]]:
    """A few (task, prompt, expected) per task for `llmos demo`; all held out of training."""
    out = []
    for (a, b), word in zip(_DEMO_ADD, _DEMO_WORDS):
        out.append(("add", *_plain("add", (a, b))))
        out.append(("reverse", *_plain("reverse", word)))
    out.append(("chat", [_msg("user", "add 12 47")], "59"))
    out.append(("chat", [_msg("user", "reverse l l m o s")], "s o m l l"))
    out.append(("chat", [_msg("system", SYSTEM_PROMPT), _msg("user", "add 38 57"),
                         _msg("assistant", "95"), _msg("user", "reverse c a t")], "t a c"))
    return out


def problem_key(task: str, prompt) -> str:
    """The split key of the problem a prompt asks (for chat: its last user message)."""
    text = prompt if isinstance(prompt, str) else prompt[-1]["content"]
    if task == "add" or text.startswith("add "):
        a, b = text.rstrip("=").replace("add ", "").replace("+", " ").split()
        return f"add:{int(a)}+{int(b)}"
    return "reverse:" + text.removeprefix("reverse ").rstrip("= ").replace(" ", "")


def is_heldout(key: str) -> bool:
    """Whether the problem with this key belongs to the test split."""
    if key in _DEMO_KEYS:
        return True
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "big") % 100 < HELDOUT_PERCENT


_DEMO_KEYS = frozenset([f"add:{a}+{b}" for a, b in _DEMO_ADD] +
                       [f"reverse:{w}" for w in _DEMO_WORDS])


def _draw(kind: str, rng: random.Random, split: str) -> tuple[str, object]:
    """A random problem of `kind` that lies in `split`: (key, problem)."""
    while True:
        if kind == "add":
            problem = (rng.randint(10, 99), rng.randint(10, 99))
            key = "add:%d+%d" % problem
        else:
            problem = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(*WORD_LENGTHS)))
            key = "reverse:" + problem
        if is_heldout(key) == (split == "test"):
            return key, problem


def _plain(kind: str, problem) -> tuple[str, str]:
    if kind == "add":
        a, b = problem
        return f"{a}+{b}=", str(a + b)
    return f"reverse {' '.join(problem)} =", " ".join(reversed(problem))


def _ask(kind: str, problem) -> tuple[str, str]:
    """The user message and the assistant's answer for one problem."""
    if kind == "add":
        a, b = problem
        return f"add {a} {b}", str(a + b)
    return f"reverse {' '.join(problem)}", " ".join(reversed(problem))


def _chat(kind: str, problem, rng: random.Random, split: str) -> tuple[list[dict], str]:
    """A conversation ending in a question about `problem`: maybe a system message, maybe
    an earlier answered turn (drawn from the same split)."""
    messages = []
    if rng.random() < 0.3:
        messages.append(_msg("system", SYSTEM_PROMPT))
    if rng.random() < 0.3:
        earlier = rng.choice(("add", "reverse"))
        question, answer = _ask(earlier, _draw(earlier, rng, split)[1])
        messages += [_msg("user", question), _msg("assistant", answer)]
    question, answer = _ask(kind, problem)
    messages.append(_msg("user", question))
    return messages, answer


def _msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}
