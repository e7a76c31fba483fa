"""Suite-wide set-up that must happen before any test module is imported."""
import os

import torch

# Triton reads TRITON_INTERPRET when a kernel is *defined*, i.e. when `kernels` is first imported — possibly by a model
# test collected before the kernel tests. Without a GPU every Triton path in the suite runs on the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Two cores in CI: more threads than cores only adds contention.
torch.set_num_threads(min(2, torch.get_num_threads()))
