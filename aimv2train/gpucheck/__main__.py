"""`python -m aimv2train.gpucheck`: the GPU check without click (the GPU machine may lack it)."""
import contextlib
import sys

from .runner import main

with contextlib.suppress(BrokenPipeError):
    sys.exit(main())
