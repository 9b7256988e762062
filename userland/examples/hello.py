"""The smallest agent: connect, ask the embedded model one sum, print the answer."""
import sys

from llmos.userland import connect


def main(prompt: str = "12+47=") -> None:
    with connect() as k:
        done = k.generate(prompt, max_tokens=8, stop=["\n"])
        print(f"pid {k.pid}: {prompt}{done.text.strip()}  [{done.finish_reason}, "
              f"{done.usage.completion_tokens} tokens]", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:2])
