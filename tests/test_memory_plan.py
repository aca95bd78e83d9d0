"""The planner's choice at a budget (lrft.memory.choose): it fits when measured, it keeps the global
batch, LoRA-FA recomputes less than LoRA, and trainer.memory_plan=auto applies it to a real run."""

import json

import pytest
import torch
from omegaconf import OmegaConf

from lrft.cli.memory import compose_memory, memory_main
from lrft.config.compose import compose
from lrft.errors import UserError
from lrft.memory.choose import choose, relative_time
from lrft.memory.measure import LiveBytes
from lrft.memory.plan import Planner
from lrft.methods.base import ApplyContext
from lrft.methods.registry import get_method
from lrft.model.activations import checkpoint_blocks
from lrft.model.load import load_model
from lrft.model.loss import loss_sum
from lrft.train import train

MIB = 1 << 20
SHAPE = [
    "model=tiny_llama",
    "model.from_config.num_hidden_layers=6",
    "model.from_config.vocab_size=2000",
    "dataset.max_length=96",
    "method.dropout=0.0",
]


def planner_for(method: str, *extra: str) -> Planner:
    return Planner(compose_memory([*SHAPE, f"method={method}", *extra]))


def measured_total(cfg, batch_size: int, n: int) -> int:
    """Weights + optimizer state + a real CPU step's peak with n blocks checkpointed."""
    torch.manual_seed(0)
    model = load_model(cfg.model, None, cfg.quantization)
    method = get_method(cfg.method.name)(OmegaConf.to_object(cfg.method))
    method.apply(
        model, {k: list(cfg.model[k]) for k in ("target_modules", "modules_to_save")}, ApplyContext()
    )
    model.config.use_cache = False
    model.train()
    checkpoint_blocks(model, n)
    ids = torch.randint(5, 2000, (batch_size, int(cfg.dataset.max_length)))
    with LiveBytes(model) as live:
        loss_sum(model, {"input_ids": ids, "labels": ids}, "causal", chunk=cfg.trainer.loss_chunk).backward()
    return live.peak


def test_relative_time_counts_the_recomputed_forwards():
    assert relative_time(0, 32, frozen_base=True) == 1.0
    assert relative_time(32, 32, frozen_base=True) == 1.5  # forward + input-grad backward, + 1 forward
    assert relative_time(32, 32, frozen_base=False) == pytest.approx(4 / 3)  # weights train: 2 backward
    assert relative_time(8, 32, True) < relative_time(16, 32, True)


def test_choice_fits_when_measured_and_lora_fa_recomputes_less():
    lora, fa = planner_for("lora"), planner_for("lora_fa")
    plans = {m: p.plan(4) for m, p in (("lora", lora), ("lora_fa", fa))}
    # a budget where LoRA at micro-batch 1 needs some of its blocks checkpointed
    p = plans["lora"]
    budget = p.resident + (lora.step_peak(1, 0) + lora.step_peak(1, lora.n_blocks)) // 2
    picks = {
        m: choose(pl, plans[m].resident, plans[m].gradients, budget, 4)
        for m, pl in (("lora", lora), ("lora_fa", fa))
    }
    for name, c in picks.items():
        assert c is not None and c.batch_size * c.grad_accum == 4, name  # the global batch kept
        assert c.total <= budget
        cfg = compose_memory([*SHAPE, f"method={name}"])
        real = plans[name].resident + measured_total(cfg, c.batch_size, c.checkpointed)
        assert real <= budget * 1.02, f"{name}: measured {real / MIB:.2f} MiB > {budget / MIB:.2f} MiB"
    assert 0 < picks["lora"].checkpointed <= lora.n_blocks
    assert (picks["lora_fa"].checkpointed, -picks["lora_fa"].batch_size) < (
        picks["lora"].checkpointed,
        -picks["lora"].batch_size,
    )
    assert picks["lora_fa"].step_time < picks["lora"].step_time
    # a budget nothing fits in
    assert choose(lora, p.resident, p.gradients, p.resident, 4) is None


def test_cli_prints_the_plan_per_method(capsys):
    assert memory_main([*SHAPE, "method=lora,lora_fa", "memory.budget_gb=0.03", "trainer.batch_size=4"]) == 0
    out = capsys.readouterr().out
    assert "plan in 0.03 GiB: checkpointed blocks" in out and "est. step time" in out
    assert "step peak, full logits (loss_chunk=0)" in out and "kept per block, checkpointed" in out


def test_memory_plan_auto_applies_and_records_the_plan(tmp_path):
    lora = planner_for("lora")
    plan = lora.plan(1)
    budget = plan.resident + (lora.step_peak(2, 0) + lora.step_peak(2, lora.n_blocks)) // 2
    run_dir = tmp_path / "run"
    cfg = compose(
        [
            *SHAPE,
            "method=lora",
            "trainer.batch_size=4",
            "trainer.grad_accum=1",
            "trainer.max_steps=1",
            "trainer.progress=false",
            "trainer.memory_plan=auto",
            f"memory.budget_gb={budget / (1 << 30)}",
            f"output_dir={run_dir}",
        ]
    )
    result = train(cfg, run_dir)
    info = json.loads((run_dir / "run_info.json").read_text())["memory_plan"]
    saved = OmegaConf.load(run_dir / "config.yaml").trainer
    assert info["batch_size"] * info["grad_accum"] == 4 and info["total"] <= budget
    assert (saved.batch_size, saved.grad_accum, saved.gradient_checkpointing) == (
        info["batch_size"],
        info["grad_accum"],
        info["checkpointed"],
    )
    flags = [b.gradient_checkpointing for b in result.model.model.layers]
    assert sum(flags) == info["checkpointed"] and result.summary["steps"] == 1


def test_auto_without_a_budget_on_cpu_is_refused(tmp_path):
    cfg = compose([*SHAPE, "trainer.gradient_checkpointing=auto", f"output_dir={tmp_path / 'r'}"])
    with pytest.raises(UserError, match=r"needs memory\.budget_gb"):
        train(cfg, tmp_path / "r")
    cfg = compose(
        [*SHAPE, "trainer.memory_plan=auto", "memory.budget_gb=0.001", f"output_dir={tmp_path / 'q'}"]
    )
    with pytest.raises(UserError, match="nothing fits"):
        train(cfg, tmp_path / "q")
