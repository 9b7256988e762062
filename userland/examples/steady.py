"""An agent that keeps asking: one sum every --every seconds, each answer printed, until
it has asked --count times (default: until it is killed). Something to watch in `top`,
stop and continue in the shell.

    llmos> run -m llmos.userland.examples.steady --every 0.5 &
"""
import argparse
import random
import time

from llmos.userland import connect


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--every", type=float, default=1.0, help="seconds between two questions")
    p.add_argument("--count", type=int, default=None, help="questions in all (default: no end)")
    args = p.parse_args()
    asked = 0
    with connect() as k:
        while args.count is None or asked < args.count:
            a, b = random.randrange(100), random.randrange(100)
            done = k.generate(f"{a}+{b}=", max_tokens=8, stop=["\n"])
            asked += 1
            print(f"{a}+{b}={done.text.strip()}", flush=True)
            time.sleep(args.every)


if __name__ == "__main__":
    main()
