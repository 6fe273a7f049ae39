"""chatapp's inference engine: checkpoints, the Llama model, decoding, the worker.

Nothing here imports the UI (``chatapp``)."""

import os

# CPU tensors of 2 MiB and more in transparent huge pages (PyTorch's CPU allocator reads this once,
# at its first allocation, so it is set before anything imports torch): a CPU decode step streams
# every weight, and with 4 KiB pages the FP8 layers of the embedded model ran ~10 % slower (three
# interleaved pairs of runs on a 2-core AMD EPYC). A value the user set is kept.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
