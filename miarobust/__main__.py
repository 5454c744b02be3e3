"""`python -m miarobust` (and `torchrun -m miarobust run ...`)."""

from miarobust.cli import main

main()
