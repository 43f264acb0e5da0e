"""``python -m msif …`` (and ``torchrun --nproc-per-node N -m msif …``): the command line."""

from .cli import main

main()
