"""``freecure_ops.bench``, the FASA benchmarks: ``python -m freecure_ops.bench``. Modules: shapes (cases), masks
(synthetic parsing maps), providers (the implementations compared), measure (timing, FLOPs, memory), runner
(check then time), kernel_check (interpreter correctness on CPU), report (table, CSV, plot), e2e (one denoising
step).

Without CUDA the Triton kernel can only run in Triton's interpreter, which must be switched on before
triton is first imported: importing this package does that (unless triton is already imported).

This is the package module (an ``__init__.py`` would shadow a PyPI ``bench`` from the checkout root: see
``freecure_ops/subpackages.py``).
"""
import os
import sys

import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")
