"""``python -m msif …`` (and ``torchrun --nproc-per-node N -m msif …``): the command line."""

from .cli import main

if __name__ == "__main__":  # not when a spawned worker process re-imports the main module
    main()
