"""``python -m hf_prune`` is the ``hf-prune`` command; data-parallel calibration launches it this way:
``torchrun --nproc-per-node 2 -m hf_prune prune RECIPE`` (or
``accelerate launch --multi_gpu --num_processes 2 -m hf_prune prune RECIPE``)."""

import sys

from .cli import main

sys.exit(main())
