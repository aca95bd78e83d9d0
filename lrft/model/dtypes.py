"""The torch dtype of every dtype name a config may hold (names: :data:`lrft.schema.DTYPES`).

One map, so a dtype added to the schema is added here and nowhere else; the test in
``tests/test_architecture.py`` keeps the two in step.
"""

from __future__ import annotations

import torch

from lrft.schema import DTYPES, QUANT_STORAGE

TORCH_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPES}
STORAGE_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in QUANT_STORAGE}
