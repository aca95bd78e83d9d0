"""The training loop, split the way a reader asks about it:

- :mod:`~lrft.train.setup`: accelerator, data, model on its device, method, optimizer, schedule
- :mod:`~lrft.train.step`: one optimizer step's forward/backward with the token-weighted loss
- :mod:`~lrft.train.policy`: clip, check, step or skip, the same on every rank (fp16 aware)
- :mod:`~lrft.train.callbacks`: log, evaluate, save
- :mod:`~lrft.train.state`: position, sampler, what resume restores
- :mod:`~lrft.train.loop`: :func:`train`, top to bottom
"""

from lrft.train.loop import Run, train
from lrft.train.setup import build_scheduler
from lrft.train.state import EpochSampler

__all__ = ["EpochSampler", "Run", "build_scheduler", "train"]
