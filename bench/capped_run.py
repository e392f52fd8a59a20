"""Run the pixart-lowvram CLI as if on a smaller card: torch may allocate at most CAP GiB on this GPU.

    python bench/capped_run.py CAP_GIB run QUEUE --model M --vram-budget ...
"""
import sys

import torch

from pixart_lowvram.cli import console_main, set_allocator_defaults

set_allocator_defaults()  # before the cap below starts CUDA, as `main` does before its first CUDA call
cap = float(sys.argv[1]) * 1024**3
torch.cuda.set_per_process_memory_fraction(cap / torch.cuda.get_device_properties(0).total_memory)

sys.argv = sys.argv[:1] + sys.argv[2:]
sys.exit(console_main())
