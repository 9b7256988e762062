"""Example agents: small programs that use only the SDK (`llmos.userland`).

    python -m llmos.userland.examples.hello        # one completion
    python -m llmos.userland.examples.parallel     # spawn workers, collect their answers
    python -m llmos.userland.examples.chat         # a conversation kept in a context

Each runs as an attached process from a shell, or under the kernel with `llmos run`.
Their prompts are the embedded model's tasks: "12+47=", "reverse c a t =", chat "add 12 47".
"""
