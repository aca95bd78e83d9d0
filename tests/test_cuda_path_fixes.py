"""CUDA-path defects of issue 25 that show on CPU: ``method.project_grad`` under bf16 autocast,
LoRA-GA on a 4-bit base with calibration-less ranks, DDP's buffer broadcast."""

from __future__ import annotations

import torch
from test_layers import K, N, R, make


def _projected_b_grad(autocast: bool, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    layer = make(True, 0.0, torch.float32)
    layer.project_grad = True
    with torch.no_grad():  # an ill-conditioned A A^T: the inverse's entries span decades
        layer.lora_A.copy_(torch.randn(R, K) * torch.tensor([[1.0], [0.3], [0.1], [0.03]]))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = layer(x)
    (out.float() * g).sum().backward()
    return layer.lora_B.grad, layer


def test_project_grad_applies_the_inverse_in_float32_under_bf16_autocast():
    """B's projected gradient under bf16 autocast against the float32 computation: the inverse
    is applied in float32 now (was: rounded to bf16, then a bf16 product)."""
    torch.manual_seed(1)
    x, g = torch.randn(N, K), torch.randn(N, 48)
    ref, _ = _projected_b_grad(False, x, g)
    got, layer = _projected_b_grad(True, x, g)
    # what the old backward did: the plain bf16 gradient times the bf16-rounded inverse, in bf16
    proj = layer._grad_proj()  # the cached float32 (A Aᵀ + δI)⁻¹ / s²
    layer.project_grad = False
    layer.lora_B.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    (out.float() * g).sum().backward()
    plain = layer.lora_B.grad.to(torch.bfloat16)
    old = (plain @ proj.to(torch.bfloat16)).float()
    exact = plain.float() @ proj  # the same bf16 gradient, projected exactly in float32

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a - b).norm() / b.norm()).item()

    # end to end the bf16 gradient itself dominates; the projection step alone is what changed
    new_err, old_err = rel(got, ref), rel(old, ref)
    new_step, old_step = rel(got, exact), rel(old, exact)
    print(f"project_grad vs fp32: new {new_err:.2e}, old {old_err:.2e}; "
          f"error the projection adds: new {new_step:.2e}, old {old_step:.2e}")  # fmt: skip
    assert new_err < old_err
    assert new_step < 1e-6 < 1e-3 < old_step  # fp32 product vs bf16-rounded inverse and product


def test_ddp_does_not_rebroadcast_buffers(tmp_path):
    """The run's Accelerator wraps DDP with broadcast_buffers=False: PiSSA's / LoRA-GA's offset
    buffers (lora_A0, lora_B0) never change after init, and no model lrft trains has BatchNorm."""
    from accelerate import DistributedDataParallelKwargs
    from accelerate.state import AcceleratorState

    from lrft.config.compose import compose
    from lrft.train.engine import ddp_kwargs, make_engine

    assert ddp_kwargs(DistributedDataParallelKwargs).to_kwargs() == {"broadcast_buffers": False}
    try:
        engine = make_engine(compose(["model=tiny_llama", "method=pissa"]), tmp_path)
        assert engine.accelerator.ddp_handler.to_kwargs() == {"broadcast_buffers": False}
    finally:
        AcceleratorState._reset_state()


class _RankWithoutBatches:
    """Rank 1 of 2 as LoRA-GA sees it: init_batches=1 leaves it no calibration batch. ``reduce``
    records every tensor it would all-reduce (their sizes must match rank 0's) and returns it;
    the batch count comes back as rank 0's 1."""

    num_processes, process_index, is_main_process = 2, 1, False
    device = torch.device("cpu")

    def __init__(self) -> None:
        self.reduced: list[tuple[int, ...]] = []

    def reduce(self, t: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        if t.dim() == 0:
            return torch.ones(())
        self.reduced.append(tuple(t.shape))
        return t


def test_lora_ga_rank_without_batches_reduces_the_logical_shape_on_nf4():
    """On a 4-bit base a calibration-less rank's accumulator has the (out, in) shape (was: the
    packed weight's (n/2, 1), so its all-reduce would not match rank 0's and hang)."""
    from omegaconf import OmegaConf

    from lrft.config.compose import compose
    from lrft.methods import get_method
    from lrft.methods.base import ApplyContext
    from lrft.methods.lora_ga import logical_shape
    from lrft.model.load import load_model

    cfg = compose(["model=tiny_llama", "quantization=nf4", "method=lora_ga", "method.init_batches=1"])
    torch.manual_seed(0)
    model = load_model(cfg.model, None, cfg.quantization)
    fake = _RankWithoutBatches()
    ids = torch.randint(5, 200, (1, 8))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    ctx = ApplyContext(calibration=lambda: iter([batch]), accelerator=fake)
    spec = get_method("lora_ga")(OmegaConf.to_object(cfg.method))
    spec.apply(model, {k: list(cfg.model[k]) for k in ("target_modules", "modules_to_save")}, ctx)
    from lrft.methods.layers import LowRankLinear

    layers = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    assert layers and type(layers[0].base_layer).__name__ == "Linear4bit"
    packed = tuple(layers[0].base_layer.weight.shape)
    expected = [logical_shape(m.base_layer) for m in layers]
    assert fake.reduced == expected and packed not in expected, (fake.reduced[:2], packed)


def test_lora_ga_two_processes_fewer_init_batches_than_ranks_on_nf4(tmp_path):
    """2 gloo processes, init_batches=1, nf4: rank 1 probes nothing and still finishes."""
    from launch import torchrun
    from test_loop_invariants import COMMON, uneven_data

    args = [*COMMON, *uneven_data(tmp_path), "method=lora_ga", "method.init_batches=1"]
    args += ["quantization=nf4", "trainer.max_steps=1", "trainer.batch_size=1"]
    proc = torchrun([*args, f"output_dir={tmp_path / 'two'}"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "two" / "final" / "trainable.safetensors").exists()


def test_pissa_svd_auto_is_exact_for_small_weights_and_randomized_for_large(capsys):
    """svd_niter=auto (the default): the exact SVD where it is cheap (tests, PEFT equality), the
    randomized one where the exact SVD would be the init's whole cost; the init says which, and
    how long it took."""
    from lrft.config.compose import compose
    from lrft.methods.pissa import AUTO_NITER, resolve_niter

    assert compose(["method=pissa"]).method.svd_niter == "auto"
    assert resolve_niter("auto", (64, 1024)) is None
    assert resolve_niter("auto", (4096, 11008)) == AUTO_NITER
    assert resolve_niter(None, (4096, 4096)) is None and resolve_niter(2, (8, 8)) == 2
    from omegaconf import OmegaConf

    from lrft.methods import get_method
    from lrft.model.load import load_model

    cfg = compose(["model=tiny_llama", "method=pissa"])
    model = load_model(cfg.model, None)
    get_method("pissa")(OmegaConf.to_object(cfg.method)).apply(
        model, {"target_modules": ["q_proj", "v_proj"], "modules_to_save": []}
    )
    assert "PiSSA init: exact SVD of 4 layers in" in capsys.readouterr().err


def test_a_sharded_run_initializes_on_rank0s_gpu_only_when_it_fits(monkeypatch):
    """Rank 0 of an FSDP2 run holds the whole model on the host; PiSSA's SVDs and LoRA-GA's
    probes go to its GPU when the model takes at most 2/3 of the free memory, other methods and
    a model that does not fit stay on the host (where the init ran before)."""
    from torch import nn

    from lrft.methods import get_method
    from lrft.methods.schemas import LoraConfig, LoraGAConfig, PissaConfig
    from lrft.train.materialize import init_device

    model = nn.Linear(1000, 1000, bias=False)  # 4 MB of float32
    cuda, free = torch.device("cuda", 0), {"bytes": 0}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 80 << 30))
    pissa, lora_ga = get_method("pissa")(PissaConfig()), get_method("lora_ga")(LoraGAConfig())
    lora = get_method("lora")(LoraConfig())
    free["bytes"] = 6_000_000  # 1.5 x 4 MB
    assert init_device(pissa, model, cuda) == cuda and init_device(lora_ga, model, cuda) == cuda
    assert init_device(lora, model, cuda) is None  # nothing to compute: no reason to move
    assert init_device(pissa, model, torch.device("cpu")) is None
    free["bytes"] = 5_999_999
    assert init_device(pissa, model, cuda) is None
