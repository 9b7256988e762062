"""A worker agent: solve the one task given in argv[1], print "RESULT <answer>", exit 0.

Spawned by parallel.py; its stdout goes to the kernel's log for its pid.
"""
import sys

from llmos.userland import connect


def main() -> int:
    prompt = sys.argv[1]
    with connect() as k:
        done = k.generate(prompt, max_tokens=16, stop=["\n"])
    print(f"RESULT {done.text.strip()}", flush=True)
    return 0 if done.finish_reason == "stop" else 1


if __name__ == "__main__":
    sys.exit(main())
