"""bitsandbytes bases: loading (random-init and from_pretrained), what stays full precision, QPiSSA."""

import pytest
import torch
from torch import nn

import lrft
from lrft.config.compose import compose
from lrft.errors import UserError
from lrft.methods import LowRankLinear
from lrft.model.load import load_model
from lrft.model.quantization import (
    SOURCE_ATTR,
    dense_weight,
    from_pretrained_kwargs,
    is_quantized,
    set_dense_weight,
    source_weight,
)


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def load(model: str, quant: str, *extra: str, num_labels=None):
    cfg = compose([f"model={model}", f"quantization={quant}", *extra])
    torch.manual_seed(0)
    return load_model(cfg.model, num_labels=num_labels, qcfg=cfg.quantization), cfg


@pytest.mark.parametrize(
    ("quant", "kind"), [("nf4", "Linear4bit"), ("fp4", "Linear4bit"), ("int8", "Linear8bitLt")]
)
def test_random_init_model_is_quantized_except_heads(quant, kind):
    model, _ = load("tiny_roberta", quant, "dataset=glue/sst2", num_labels=2)
    linears = {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert linears["roberta.encoder.layer.0.attention.self.query"] == kind
    assert {n: k for n, k in linears.items() if n.startswith("classifier")} == {
        "classifier.dense": "Linear",
        "classifier.out_proj": "Linear",
    }  # modules_to_save train fully, so they stay full precision
    assert model.config.quantization_config is not None  # saves and reloads as a quantized model
    q = model.roberta.encoder.layer[0].attention.self.query
    assert getattr(q, SOURCE_ATTR, None) is not None  # QPiSSA can read the full-precision weight


def test_bnb_config_carries_the_keys():
    cfg = compose(
        ["quantization=nf4", "quantization.double_quant=false", "quantization.compute_dtype=float16"]
    )
    bnb = from_pretrained_kwargs(cfg.quantization, cfg.model)["quantization_config"]
    assert bnb.load_in_4bit and bnb.bnb_4bit_quant_type == "nf4" and not bnb.bnb_4bit_use_double_quant
    assert bnb.bnb_4bit_compute_dtype == torch.float16 and "lm_head" in bnb.llm_int8_skip_modules
    assert from_pretrained_kwargs(compose([]).quantization, cfg.model) == {}


def test_dense_weight_round_trips_through_requantization():
    model, _ = load("tiny_llama", "nf4")
    layer = model.model.layers[0].self_attn.q_proj
    w = dense_weight(layer)
    x = torch.randn(3, layer.in_features)
    layer.eval()
    torch.testing.assert_close(layer(x).float(), x @ w.t().to(torch.bfloat16).float(), rtol=0.02, atol=0.02)
    set_dense_weight(layer, w)  # re-quantizing a dequantized weight: same codes, and the block
    # scales (double-quantized) come back within 1e-4
    torch.testing.assert_close(dense_weight(layer), w, rtol=0, atol=1e-4)


def test_qpissa_quantizes_the_residual_and_loses_less():
    """On a weight with a decaying spectrum, Q(W − s·BA) + s·BA is much closer to W than Q(W)."""
    torch.manual_seed(0)
    d, k, r = 64, 128, 8
    u, _ = torch.linalg.qr(torch.randn(d, d))
    v, _ = torch.linalg.qr(torch.randn(k, d))
    w = (u * torch.cat([torch.linspace(8, 4, r), torch.full((d - r,), 0.05)])) @ v.t()
    import bitsandbytes as bnb

    def quantized_layer():
        layer = bnb.nn.Linear4bit(k, d, bias=False, compute_dtype=torch.float32, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4", module=layer).to(
            "cpu"
        )
        setattr(layer, SOURCE_ATTR, lambda: w.clone())
        return layer

    plain_err = (dense_weight(quantized_layer()) - w).norm()
    adapted = lrft.apply_method(nn.Sequential(quantized_layer()), "pissa", r=r, alpha=r)[0]
    assert isinstance(adapted, LowRankLinear) and is_quantized(adapted.base_layer)
    qpissa_err = (adapted.original_weight() - w).norm()  # Q(W_res) + s·B₀A₀ vs W
    assert qpissa_err < 0.2 * plain_err, (qpissa_err, plain_err)


def test_pissa_refuses_an_already_quantized_checkpoint(tmp_path):
    model, _ = load("tiny_llama", "nf4")
    model.save_pretrained(tmp_path / "q4")  # a 4-bit checkpoint: no full-precision weight left
    overrides = [f"model.name_or_path={tmp_path / 'q4'}", "quantization=nf4"]
    with pytest.raises(UserError, match="already quantized"):
        compose([*overrides, "method=pissa"])
    compose([*overrides, "method=lora"])  # QLoRA on it is fine
    cfg = compose(overrides)
    reloaded = load_model(cfg.model, qcfg=cfg.quantization)
    with pytest.raises(UserError, match="unquantized checkpoint"):
        source_weight(reloaded.model.layers[0].self_attn.q_proj)


def test_from_pretrained_reads_full_precision_back_for_qpissa(tmp_path):
    """A full-precision folder loaded quantized: each layer reads its own weight from the file."""
    full, _ = load("tiny_llama", "none")
    full.save_pretrained(tmp_path / "fp")
    model, _ = load("tiny_llama", "nf4", f"model.name_or_path={tmp_path / 'fp'}", "model.tokenizer=byte")
    layer = model.model.layers[1].mlp.down_proj
    assert is_quantized(layer)
    torch.testing.assert_close(source_weight(layer), full.model.layers[1].mlp.down_proj.weight)
