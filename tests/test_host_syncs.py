"""No host synchronisation per micro-batch in the step path (issue 25).

On CUDA, ``.item()``, ``.tolist()``, ``.cpu()``, ``bool(t)`` / ``float(t)`` / ``int(t)`` and
``torch.tensor(<python number>, device=cuda)`` (a host-to-device copy) each make the host wait
for the device. The step path may sync once per optimizer step (StepPolicy's decision,
:mod:`lrft.train.policy`), never inside :func:`lrft.train.step.forward_backward`.

On CPU nothing waits, so the test counts the calls instead: it wraps those methods during a
real step window (tiny LLaMA + LoRA, accumulation 2) and attributes every call to the first
frame outside torch. transformers' mask builder (``masking_utils``) reads the mask on the host
once per forward: ``fast_all`` on a 2D ``attention_mask``, and the packed-sequence check on
``position_ids`` when there is none. That is not lrft's code, so it is counted apart (at most
one per forward); with packing's explicit 4D block mask (``trainer.packing_mask``) it is gone.
"""

from __future__ import annotations

import collections
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from test_memory_objective import real_batch, real_model

from lrft.cli.memory import compose_memory
from lrft.data.packing import PackedCollator
from lrft.objectives import get_objective
from lrft.train.policy import StepPolicy
from lrft.train.state import TrainState
from lrft.train.step import forward_backward

SYNC_METHODS = ("item", "tolist", "cpu", "__bool__", "__float__", "__int__")
HF_MASK = "transformers/masking_utils.py"  # reads the mask on the host, once per forward


def _caller() -> str:
    """The first frame outside torch and this file: who asked for the sync."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        name = frame.filename.replace("\\", "/")
        if "/torch/" in name or name.endswith("test_host_syncs.py"):
            continue
        return f"{name.split('site-packages/')[-1]}:{frame.lineno}"
    return "?"


@contextmanager
def count_syncs() -> Iterator[collections.Counter]:
    """Counts each host-syncing call by (kind, caller) while the block runs."""
    hits: collections.Counter = collections.Counter()
    saved: dict[str, Any] = {n: getattr(torch.Tensor, n) for n in SYNC_METHODS}
    make = torch.tensor

    def wrap(name: str, orig: Any) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            hits[(name, _caller())] += 1
            return orig(*args, **kwargs)

        return counted

    def tensor(data: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        # a Python number (or list of them) built on a device: a host-to-device copy on CUDA
        if kwargs.get("device") is not None and isinstance(data, (bool, int, float, list, tuple)):
            hits[("torch.tensor", _caller())] += 1
        return make(data, *args, **kwargs)

    try:
        for n in SYNC_METHODS:
            setattr(torch.Tensor, n, wrap(n, saved[n]))
        torch.tensor = tensor
        yield hits
    finally:
        for n, orig in saved.items():
            setattr(torch.Tensor, n, orig)
        torch.tensor = make


def split(hits: collections.Counter) -> tuple[dict, dict]:
    """(lrft's and any other caller's syncs, transformers' mask checks)."""
    hf = {k: v for k, v in hits.items() if k[1].startswith(HF_MASK)}
    return {k: v for k, v in hits.items() if k not in hf}, hf


@pytest.fixture
def accelerator() -> Iterator[Accelerator]:
    AcceleratorState._reset_state()
    yield Accelerator(cpu=True)
    AcceleratorState._reset_state()


SHAPE = ["model=tiny_llama", "dataset=preference", "dataset.max_length=32", "method.dropout=0.0"]


def packed_window(n: int = 2, mask: str | None = None) -> list[dict[str, torch.Tensor]]:
    """n packed micro-batches (PackedCollator), 2 rows of 2 examples each."""
    torch.manual_seed(0)
    collate = PackedCollator(pad_id=0, pad_to=32, mask=mask)
    window = []
    for _ in range(n):
        rows = []
        for _ in range(2):
            a, b = torch.randint(5, 200, (12,)).tolist(), torch.randint(5, 200, (9,)).tolist()
            ids = a + b
            rows.append({"input_ids": ids, "labels": ids, "position_ids": [*range(12), *range(9)]})
        window.append(collate(rows))
    return window


def step_once(acc: Accelerator, model: Any, window: list, objective: Any = None) -> collections.Counter:
    """forward_backward alone, counted."""
    with count_syncs() as hits:
        forward_backward(acc, model, window, "causal", autocast=acc.autocast, objective=objective)
    return hits


def test_packed_sft_forward_backward_adds_no_sync(accelerator):
    """Packed sft, accumulation 2: none from lrft; transformers' packed-sequence check once a
    forward (no attention_mask: it reads position_ids)."""
    model = real_model(compose_memory([*SHAPE, "objective=sft"]))
    window = packed_window(2)
    assert "attention_mask" not in window[0]
    own, hf = split(step_once(accelerator, model, window))
    assert own == {}, own
    assert sum(hf.values()) <= len(window), hf


def test_packed_sft_with_a_block_mask_does_not_sync_at_all(accelerator):
    """With packing's explicit 4D block mask transformers reads nothing either: zero syncs."""
    model = real_model(compose_memory([*SHAPE, "objective=sft"]))
    hits = step_once(accelerator, model, packed_window(2, mask="bool"))
    assert dict(hits) == {}, hits


def test_padded_sft_syncs_only_in_transformers_mask(accelerator):
    """A padded batch: lrft adds none; transformers' mask check runs once per forward."""
    model = real_model(compose_memory([*SHAPE, "objective=sft"]))
    window = [real_batch("sft", 2) for _ in range(2)]
    own, hf = split(step_once(accelerator, model, window))
    assert own == {}, own
    assert sum(hf.values()) <= len(window), hf  # at most one per forward, not lrft's


@pytest.mark.parametrize("objective", ["dpo", "kto"])
def test_preference_forward_backward_adds_no_sync(accelerator, objective):
    """DPO (policy + reference forwards) and KTO (KL rows first): none from lrft's step."""
    cfg = compose_memory([*SHAPE, f"objective={objective}"])
    model = real_model(cfg)
    window = [real_batch(objective, 2) for _ in range(2)]
    own, hf = split(step_once(accelerator, model, window, get_objective(cfg)))
    assert own == {}, own
    # transformers', once a forward: policy + reference (+ KTO's two KL-row forwards) per batch
    assert sum(hf.values()) <= 4 * len(window), hf


def test_a_whole_optimizer_step_syncs_once(accelerator):
    """forward_backward + StepPolicy.update (clip, decide, step): exactly the one decision sync."""
    model = real_model(compose_memory([*SHAPE, "objective=sft"]))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _s: 1.0)
    tcfg = SimpleNamespace(max_grad_norm=1.0, on_nan="skip")
    policy = StepPolicy(accelerator, tcfg)
    state = TrainState(total=10, steps_per_epoch=10)
    state.pos.step = 1  # past step 1's one-off gradient check (check_gradients)
    for window in (packed_window(2), packed_window(2)):
        with count_syncs() as hits:
            res = forward_backward(accelerator, model, window, "causal", autocast=policy.autocast)
            policy.update(model, optimizer, scheduler, res, state)
        own, hf = split(hits)
        assert sum(own.values()) == 1, own
        ((kind, where),) = own
        assert kind == "tolist" and "lrft/train/policy.py:" in where, own
        assert sum(hf.values()) <= len(window), hf  # transformers', once a forward
        state.pos.step += 1


def test_classification_count_is_built_on_the_device():
    """loss_count for classification: torch.full, not torch.tensor(int, device=...)."""
    from lrft.model.loss import loss_count

    labels = torch.tensor([1, 0, 1])
    with count_syncs() as hits:
        n = loss_count({"labels": labels}, "classification")
    assert dict(hits) == {} and n.dtype == torch.long and n.shape == () and int(n) == 3
