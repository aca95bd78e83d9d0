"""The chunked linear cross-entropy (lrft.model.loss) equals the plain loss and its gradients.

One row per architecture family people fine-tune now (tiny random configs, built offline): the
chunked loss must match ``cross_entropy(model(x).logits)`` within 1e-5 relative in float32, for
every parameter's gradient, with ignored labels, tied heads and Gemma's logit soft-capping; under
bf16 autocast the float32 adapter gradients match as well; and the head never sees more than one
chunk of positions, so the full [tokens x vocab] logits are never materialised.
"""

import pytest
import torch
import transformers as tf

from lrft.config.compose import compose
from lrft.errors import UserError
from lrft.memory.measure import LiveBytes
from lrft.model.loss import chunk_positions, chunkable_head, loss_sum

SMALL = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
FAMILIES = {
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {"tie_word_embeddings": False}),
    "llama3-rope-tied": (
        tf.LlamaConfig,
        tf.LlamaForCausalLM,
        {"tie_word_embeddings": True, "rope_scaling": LLAMA3_ROPE},
    ),
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, {}),
    "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, {"head_dim": 8}),
    "gemma3-softcap": (
        tf.Gemma3TextConfig,
        tf.Gemma3ForCausalLM,
        {"head_dim": 8, "final_logit_softcapping": 0.05, "sliding_window": 4},
    ),
}


def build(family: str, vocab: int = 301) -> torch.nn.Module:
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(0)
    return model_cls(config_cls(vocab_size=vocab, **SMALL, **extra)).float()


def batch(vocab: int = 301, rows: int = 3, length: int = 19) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (rows, length), generator=g)
    labels = ids.clone()
    labels[0, :6] = -100  # a prompt
    labels[rows - 1, 11:] = -100  # padding
    return {"input_ids": ids, "labels": labels}


def loss_and_grads(model, b, chunk, upstream=None):
    model.zero_grad(set_to_none=True)
    s = loss_sum(model, b, "causal", chunk=chunk, upstream=upstream)
    (s * (upstream if upstream is not None else 1.0)).backward()
    return s.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_chunked_equals_plain_loss_and_every_gradient(family):
    model, b = build(family), batch()
    assert chunkable_head(model) is model.get_output_embeddings()
    plain, gp = loss_and_grads(model, b, 0)
    chunked, gc = loss_and_grads(model, b, 5)  # 57 positions: 12 chunks, the last one short
    assert rel(chunked, plain) < 1e-5
    assert gp.keys() == gc.keys() and len(gp) > 5
    assert max(rel(gc[k], gp[k]) for k in gp) < 1e-5
    if model.config.tie_word_embeddings:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_head_never_sees_more_than_a_chunk():
    model, b = build("gemma3-softcap"), batch()
    widths: list[int] = []
    model.get_output_embeddings().register_forward_hook(lambda m, a, out: widths.append(out.shape[-2]))
    loss_and_grads(model, b, 8)
    assert widths[0] == 0  # the model's own call projects no position
    assert max(widths) == 8 and sum(widths[1:]) == b["input_ids"].numel()


def test_softcap_is_applied():
    """Without the cap the loss would differ: the row would pass for the wrong reason otherwise."""
    model, b = build("gemma3-softcap"), batch()
    capped, _ = loss_and_grads(model, b, 5)
    model.config.final_logit_softcapping = None
    assert rel(loss_and_grads(model, b, 5)[0], capped) > 1e-3


def test_bf16_autocast_adapter_gradients_match(tmp_path):
    """LoRA adapters (float32) on a float32 base under bf16 autocast, with the step's token weight
    as ``upstream``: half-precision casts round as in the plain path."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(build("llama"), lora)
    b = batch()
    scale = torch.tensor(1 / 41.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain, gp = loss_and_grads(model, b, 0, scale)
        chunked, gc = loss_and_grads(model, b, 5, scale)
    assert len(gp) == 8
    assert rel(chunked, plain) < 1e-5
    assert max(rel(gc[k], gp[k]) for k in gp) < 1e-5


def test_never_holds_the_full_logits():
    """Peak bytes of a forward + backward (LoRA-style frozen head): the plain path holds the
    [tokens x vocab] logits and their float32 copy; the chunked one a chunk of them."""
    vocab, rows, length = 8192, 2, 64
    model = build("llama", vocab).requires_grad_(False)
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(True)
    b = batch(vocab, rows, length)
    peaks = {}
    for chunk in (0, 16):
        with LiveBytes(model) as live:
            loss_sum(model, b, "causal", chunk=chunk).backward()
        peaks[chunk] = live.peak
    logits = rows * length * vocab * 4
    assert peaks[0] > 2 * logits
    assert peaks[16] < logits / 2, peaks


class IgnoresLogitsToKeep(tf.LlamaForCausalLM):
    def forward(self, *args, logits_to_keep=0, **kwargs):
        return super().forward(*args, **kwargs)


def test_a_model_that_ignores_logits_to_keep_gets_the_plain_path():
    torch.manual_seed(0)
    model = IgnoresLogitsToKeep(tf.LlamaConfig(vocab_size=301, **SMALL))
    b = batch()
    widths: list[int] = []
    model.lm_head.register_forward_hook(lambda m, a, out: widths.append(out.shape[-2]))
    plain, gp = loss_and_grads(model, b, 0)
    chunked, gc = loss_and_grads(model, b, 5)
    assert widths == [19, 19]  # the full logits both times, used as they came
    assert rel(chunked, plain) < 1e-6 and max(rel(gc[k], gp[k]) for k in gp) < 1e-6


@pytest.mark.parametrize(
    ("vocab", "positions"), [(261, 1024), (32000, 1024), (65536, 1024), (128256, 523), (262144, 256)]
)
def test_auto_chunk_keeps_a_chunks_logits_within_2_26_values(vocab, positions):
    assert chunk_positions("auto", vocab) == positions and chunk_positions(7, vocab) == 7


def test_auto_is_the_default_and_runs_at_the_models_vocabulary():
    model, b = build("llama"), batch()
    widths: list[int] = []
    model.get_output_embeddings().register_forward_hook(lambda m, a, out: widths.append(out.shape[-2]))
    auto, _ = loss_and_grads(model, b, "auto")
    assert max(widths) == min(b["input_ids"].numel(), chunk_positions("auto", model.config.vocab_size))
    assert rel(auto, loss_and_grads(model, b, 0)[0]) < 1e-5
    assert compose(["model=tiny_llama"]).trainer.loss_chunk == "auto"
    for bad in ("-1", "big", "true"):
        with pytest.raises(UserError, match=r"trainer\.loss_chunk must be auto"):
            compose(["model=tiny_llama", f"trainer.loss_chunk={bad}"])
