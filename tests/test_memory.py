"""Memory is the product: the measured inequalities, and ``lrft memory``'s plan against real CPU counts.

The planner builds every model on the meta device; each check here builds the same model for real
on the CPU and counts the same thing there: saved activations (``SavedTensors``), a forward +
backward's peak (``LiveBytes``), optimizer state after a real step, quantized weights as
bitsandbytes stores them. Issue #7 asks for agreement within 10%; on these models it is exact.
"""

import importlib.util
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from lrft.cli.memory import compose_memory, memory_main
from lrft.errors import UserError
from lrft.memory.measure import LiveBytes, SavedTensors, activation_profile
from lrft.memory.on_meta import meta_forward
from lrft.memory.plan import Planner, optimizer_state_bytes
from lrft.methods.base import ApplyContext
from lrft.methods.registry import get_method
from lrft.model.activations import blocks, checkpoint_blocks
from lrft.model.load import load_model
from lrft.model.loss import loss_sum
from lrft.optim import build_optimizer

ROOT = Path(__file__).resolve().parent.parent


def bench_module():
    spec = importlib.util.spec_from_file_location(
        "bench_mem", ROOT / "scripts" / "bench_activation_memory.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_activation_inequalities_small():
    """scripts/bench_activation_memory.py's three claims on a 4x narrower model (r scaled too)."""
    bench = bench_module()
    shape = dict(
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    rows = bench.run(1000, 2, 64, shape, r=2, methods=["lora_fa", "lora"], peft_dora=False)
    for claim, ratio, bound, ok in bench.checks(rows):
        assert ok, f"{claim}: {ratio:.3f} vs {bound}"
    for name, measured, planned in rows:
        assert planned is None or planned == measured, name


def real_model(cfg, method: str):
    from lrft.data.load import num_labels

    torch.manual_seed(0)
    model = load_model(cfg.model, num_labels(cfg.dataset), cfg.quantization)
    m = get_method(method)(OmegaConf.to_object(cfg.method))
    m.apply(model, {k: list(cfg.model[k]) for k in ("target_modules", "modules_to_save")}, ApplyContext())
    model.config.use_cache = False
    return model.train(), m


def step_loss(cfg, model, batch):
    """The loss as a training step computes it (a causal LM's in chunks of logits)."""
    if cfg.model.task == "causal":
        return loss_sum(model, batch, "causal", chunk=cfg.trainer.loss_chunk)
    return model(**batch).loss


def real_batch(planner: Planner, batch_size: int) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in planner._batch(batch_size).items():
        out[k] = torch.randint(5, 200, v.shape) if v.dim() == 2 else torch.zeros(v.shape, dtype=v.dtype)
    return out


# dropout off for RoBERTa and T5: the plan follows CUDA, where dropout keeps a 1-byte mask (CPU: a
# float one) and attention dropout runs inside the fused kernel (CPU: the unfused path)
CASES = [
    ("tiny_llama", "lora", "quickstart", []),
    ("tiny_llama", "lora_fa", "quickstart", []),
    ("tiny_llama", "dora", "quickstart", []),
    ("tiny_llama", "full", "quickstart", []),
    ("tiny_llama", "lora_fa", "quickstart", ["quantization=nf4"]),
    ("tiny_llama", "lora", "quickstart", ["quantization=int8"]),
    (
        "tiny_roberta",
        "lora",
        "glue/sst2",
        ["+model.from_config.attention_probs_dropout_prob=0.0", "+model.from_config.hidden_dropout_prob=0.0"],
    ),
    ("tiny_t5", "lora_fa", "glue/sst2", ["+model.from_config.dropout_rate=0.0"]),
]


@pytest.mark.parametrize(("model", "method", "dataset", "extra"), CASES, ids=lambda v: str(v))
def test_plan_matches_cpu(model, method, dataset, extra):
    b = 2
    cfg = compose_memory(
        [f"model={model}", f"method={method}", f"dataset={dataset}", "dataset.max_length=48", *extra]
    )
    planner = Planner(cfg)
    real, _ = real_model(cfg, method)
    batch = real_batch(planner, b)
    quantized = "quantization=none" not in extra and any(e.startswith("quantization") for e in extra)
    if not quantized:  # bitsandbytes' int8 keeps its input outside autograd's hooks: peaks only
        plan, measured = planner.activations(b), activation_profile(real, lambda: step_loss(cfg, real, batch))
        assert plan.total == pytest.approx(measured.total, rel=0.10)
        assert plan.checkpointed == pytest.approx(measured.checkpointed, rel=0.10)
        assert plan.layers == pytest.approx(measured.layers, rel=0.10)
    for gc in (False, True):
        checkpoint_blocks(real, len(blocks(real)) if gc else 0)
        with LiveBytes(real) as live:
            step_loss(cfg, real, batch).backward()
        real.zero_grad(set_to_none=True)
        assert planner.step_peak(b, gc) == pytest.approx(live.peak, rel=0.10), f"checkpointing={gc}"


def test_dropout_is_planned_as_cuda_keeps_it():
    x = torch.empty(4, 8, device="meta", requires_grad=True) * 1.0
    with meta_forward(), SavedTensors() as rec:
        y = torch.nn.functional.dropout(x, 0.1, training=True)
    assert rec.bytes == 4 * 8  # a bool mask, as CUDA's fused dropout keeps (CPU: float32 noise)
    with SavedTensors() as rec:
        y = torch.nn.functional.dropout(x, 0.1, training=True)
    del y
    assert rec.bytes == 4 * 8 * 4  # outside the block: torch's own (CPU-like) path again


def test_plan_is_exact_on_tiny_llama():
    cfg = compose_memory(
        ["model=tiny_llama", "method=lora_fa", "dataset=quickstart", "dataset.max_length=40"]
    )
    planner = Planner(cfg)
    real, _ = real_model(cfg, "lora_fa")
    batch = real_batch(planner, 3)
    measured = activation_profile(real, lambda: step_loss(cfg, real, batch)).total
    assert planner.activations(3).total == measured


@pytest.mark.parametrize(
    ("method", "optimizer", "extra"),
    [
        ("lora", "adamw", []),
        ("lora_fa", "sgd", []),
        ("full", "adamw8bit", []),
        ("galore", "adamw", ["method.rank=16"]),
        ("galore", "adamw8bit", ["method.rank=16"]),
    ],
)
def test_optimizer_state_matches_a_real_step(method, optimizer, extra):
    cfg = compose_memory(
        ["model=tiny_llama", f"method={method}", f"optimizer={optimizer}", "dataset.max_length=16", *extra]
    )
    planned = optimizer_state_bytes(Planner(cfg).optimizer)
    model, m = real_model(cfg, method)
    opt = build_optimizer(
        m.param_groups(model, cfg.optimizer.weight_decay), cfg.optimizer, in_backward=m.updates_in_backward
    )
    for module in model.modules():  # every adapter gets a gradient (B = 0 would leave A without)
        if hasattr(module, "lora_B"):
            nn.init.normal_(module.lora_B)
    ids = torch.randint(5, 200, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    storages = {}
    for state in opt.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor) and v.ndim > 0:  # torch's 0-d step counters stay on the CPU
                storages[v.untyped_storage().data_ptr()] = v.untyped_storage().nbytes()
    assert planned == sum(storages.values())


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_quantized_weights_match_bitsandbytes(quant):
    cfg = compose_memory(["model=tiny_llama", "method=lora_fa", f"quantization={quant}"])
    weights = Planner(cfg).weights()
    torch.manual_seed(0)
    real = load_model(cfg.model, None, cfg.quantization)
    storages = {}
    for p in real.parameters():
        qs = getattr(p, "quant_state", None)
        extra = [qs.absmax, qs.code, qs.offset, qs.state2.absmax, qs.state2.code] if qs else []
        for t in [p, *extra, getattr(p, "SCB", None)]:
            if isinstance(t, torch.Tensor):
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    base = sum(v for k, v in weights.items() if k.startswith("base"))
    assert base == sum(storages.values())


def test_budget_finds_the_largest_batch():
    cfg = compose_memory(["model=tiny_llama", "method=lora", "dataset.max_length=64"])
    planner = Planner(cfg)
    plan = planner.plan(1)
    totals = {b: plan.resident + max(planner.step_peak(b, False), plan.gradients) for b in (5, 6)}
    budget = (totals[5] + totals[6]) // 2
    assert planner.max_batch(plan, budget, checkpointing=False) == 5


def test_llama7b_plans_offline_from_the_bundled_config():
    cfg = compose_memory(
        ["model=llama7b", "quantization=nf4", "trainer.batch_size=1", "dataset.max_length=32"]
    )
    planner = Planner(cfg)
    assert "bundled" in planner.config_source  # tests run with HF_HUB_OFFLINE=1
    plan = planner.plan()
    assert plan.params_total == pytest.approx(6.74e9, rel=0.01)
    nf4 = plan.weights["base frozen nf4 (+ scales)"]
    linear = sum(m.weight.numel() for m in planner.quantized.values())
    assert 0.5 < nf4 / linear < 0.52  # half a byte per weight plus ~1.6% of block scales (double quant)
    assert plan.params_trainable == 32 * 8 * (3 * 4096 + 4096 + 2 * 11008 + 4096)  # r·d for each of 7


def test_cli_side_by_side(capsys):
    argv = [
        "model=tiny_llama",
        "method=lora_fa,galore",
        "method.r=4",
        "memory.budget_gb=1",
        "dataset.max_length=64",
    ]
    assert memory_main(argv) == 0
    out = capsys.readouterr().out
    assert "lora_fa" in out and "galore_adamw" in out and "total, checkpointed" in out
    assert "plan in 1 GiB: micro-batch x accum" in out
    assert "galore: method.r do not apply" in out  # said, not silently dropped
    # full fine-tuning of a 4-bit base is refused; the other column is still planned
    assert memory_main(["model=tiny_llama", "method=lora,full", "quantization=nf4"]) == 0
    assert "not planned: full" in capsys.readouterr().out


def test_cli_errors_name_the_key():
    with pytest.raises(UserError, match="budget_gb"):
        memory_main(["model=tiny_llama", "memory.budget=3"])
    with pytest.raises(UserError, match="quantization"):
        memory_main(["model=tiny_llama", "method=full", "quantization=nf4"])
