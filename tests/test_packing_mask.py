"""Packing's explicit block-diagonal mask (what a compiled model gets): each attention
implementation honours it, and a compiled packed step (loss and gradients) equals the eager packed
step and the examples run one by one with a token-weighted loss.

Each test also runs a *crossing* control (a plain causal mask over the whole packed row, what
attention across examples computes) and requires it to be far off, so the equalities cannot hold
because the mask is ignored or the examples do not interact.
"""

import itertools

import pytest
import torch
from test_packing import PAD, examples, tiny_llama

import lrft
from lrft.data.packing import (
    MASK_STYLES,
    PackedCollator,
    batch_token_stats,
    block_causal_mask,
    pack_examples,
)
from lrft.data.packing import token_loss_sum as loss_sum


def spans(row: dict) -> list[tuple[int, int]]:
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
    return list(itertools.pairwise(starts))


def crossing(mask: torch.Tensor) -> torch.Tensor:
    """A plain causal mask of the same shape and convention: attention crosses examples."""
    n = mask.shape[-1]
    keep = torch.ones(n, n, dtype=torch.bool).tril().expand(mask.shape)
    if mask.dtype == torch.bool:
        return keep.clone()
    return torch.where(keep, 0.0, torch.finfo(torch.float32).min)


def test_block_causal_mask_is_causal_within_each_example_and_its_padding():
    batch = PackedCollator(PAD, pad_to=12)([{"input_ids": [5, 6, 7, 8, 9], "labels": [-100] * 5,
                                             "position_ids": [0, 1, 2, 0, 1]}])  # fmt: skip
    keep = block_causal_mask(batch["position_ids"])[0, 0]
    example = [0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 2, 2]  # two examples, then the padding's own block
    want = torch.tensor([[k <= q and example[k] == example[q] for k in range(12)] for q in range(12)])
    assert torch.equal(keep, want)
    add = block_causal_mask(batch["position_ids"], "additive")[0, 0]
    assert add.dtype == torch.float32 and torch.equal(add == 0, want)
    assert (add[~want] == torch.finfo(torch.float32).min).all()
    with pytest.raises(ValueError, match="mask style"):
        block_causal_mask(batch["position_ids"], "float")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_each_attention_implementation_honours_the_explicit_mask(attn):
    """sdpa takes the boolean mask, eager the additive one: per-example logits == the example
    alone (1e-5, float32); the same row under a crossing mask is far off."""
    model = tiny_llama(attn)
    exs = examples(24, seed=1)
    rows = pack_examples(exs, 64)
    batch = PackedCollator(PAD, pad_to=64, mask=MASK_STYLES[attn])(rows)
    assert batch["attention_mask"].shape == (len(rows), 1, 64, 64)
    inputs = {k: batch[k] for k in ("input_ids", "position_ids")}
    with torch.no_grad():
        packed = model(**inputs, attention_mask=batch["attention_mask"]).logits
        crossed = model(**inputs, attention_mask=crossing(batch["attention_mask"])).logits
        worst_crossed = 0.0
        for r, row in enumerate(rows):
            for a, b in spans(row):
                alone = model(input_ids=torch.tensor([row["input_ids"][a:b]])).logits[0]
                torch.testing.assert_close(packed[r, a:b], alone, rtol=1e-5, atol=1e-5)
                worst_crossed = max(worst_crossed, (crossed[r, a:b] - alone).abs().max().item())
    assert worst_crossed > 1e-2


def test_the_block_mask_does_not_change_token_counts():
    rows = pack_examples(examples(30, seed=4), 64)
    plain = PackedCollator(PAD, pad_to=64)(rows)
    masked = PackedCollator(PAD, pad_to=64, mask="bool")(rows)
    assert [t.item() for t in batch_token_stats(masked)] == [t.item() for t in batch_token_stats(plain)]
    assert batch_token_stats(masked)[0].item() == sum(len(r["input_ids"]) for r in rows)


def lora_model() -> torch.nn.Module:
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
    model = lrft.apply_method(tiny_llama(), "lora", r=4, alpha=8, dropout=0.0, target_modules=targets)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05)  # non-zero B: A's gradient is exercised too
    return model.train()


def loss_and_grads(model, batches: list[dict]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token-weighted loss over ``batches`` (sum of per-token losses / loss tokens) and its grads."""
    model.zero_grad(set_to_none=True)
    sums, counts = [], []
    for batch in batches:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        s, c = loss_sum(model(**inputs).logits, batch["labels"])
        sums.append(s)
        counts.append(c)
    loss = torch.stack(sums).sum() / torch.stack(counts).sum()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_grads_close(got: dict, want: dict, atol: float) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=atol, msg=name)


def test_compiled_packed_loss_and_grads_equal_eager_packed_and_unpacked():
    """One compile (sdpa, the default). Tolerances, float32: loss 1e-5 relative; gradients
    1e-4 relative + 1e-6 absolute (the largest entries are ~1e-1). The crossing control
    reuses the compiled graph (same shapes) and must move the loss by > 1e-3."""
    model = lora_model()
    exs = examples(20, seed=5)
    rows = pack_examples(exs, 64)
    assert any(len(spans(r)) > 2 for r in rows)  # rows really hold several examples
    collate = PackedCollator(PAD, pad_to=64, mask="bool")
    packed = [collate(rows[:3]), collate(rows[3:])]
    unpacked = [{"input_ids": torch.tensor([e["input_ids"]]), "labels": torch.tensor([e["labels"]])}
                for e in exs]  # fmt: skip
    no_mask = [{k: v for k, v in b.items() if k != "attention_mask"} for b in packed]

    ref_loss, ref_grads = loss_and_grads(model, unpacked)  # the examples one by one
    eager_loss, eager_grads = loss_and_grads(model, no_mask)  # transformers' own packed detection
    model.compile(backend="aot_eager")  # dynamo's tracing is what matters; no codegen
    comp_loss, comp_grads = loss_and_grads(model, packed)
    crossed = [dict(b, attention_mask=crossing(b["attention_mask"])) for b in packed]
    crossed_loss, _ = loss_and_grads(model, crossed)

    assert max(g.abs().max().item() for g in ref_grads.values()) > 1e-2  # a real gradient
    for loss, grads in ((eager_loss, eager_grads), (comp_loss, comp_grads)):
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
        assert_grads_close(grads, ref_grads, atol=1e-6)
    assert abs(crossed_loss.item() - ref_loss.item()) > 1e-3
