"""`python -m llmos.kernel`: the kernel daemon (see kernel/boot.py)."""
import sys

from .boot import main

sys.exit(main())
