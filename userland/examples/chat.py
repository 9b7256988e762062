"""A conversation kept in a context: two turns, each computing only its new tokens.

The context holds the system prompt and every earlier turn in the kernel's KV cache, so
each turn's usage shows most of its prompt as cached.
"""
from llmos.userland import connect

SYSTEM = "You are tiny. You add numbers and reverse words."
TURNS = ["add 12 47", "reverse c a t"]   # tiny was trained on up to two turns


def main() -> None:
    with connect() as k, k.context(system=SYSTEM) as ctx:
        for text in TURNS:
            done = ctx.generate(messages=[{"role": "user", "content": text}], max_tokens=16)
            u = done.usage
            print(f"user: {text}\ntiny: {done.text.strip()}\n  [{u.computed_tokens} new prompt "
                  f"tokens computed, {u.cached_tokens} cached, {u.completion_tokens} generated]",
                  flush=True)
        print(f"context {ctx.id}: {ctx.info().tokens} tokens")


if __name__ == "__main__":
    main()
