"""Packing: packed rows are exactly their examples run one by one (logits, one SGD step), and the
bookkeeping around it (rows, labels, positions, token counts, config refusals)."""

import copy
import itertools
import random

import pytest
import torch

from lrft.config.compose import compose
from lrft.data.collate import IGNORE_INDEX, Collator
from lrft.data.packing import PackedCollator, batch_token_stats, pack_examples, token_loss_sum
from lrft.errors import UserError
from lrft.model.load import load_model

PAD = 0


def examples(n: int, seed: int = 0, vocab: int = 261, long_tail: bool = True) -> list[dict]:
    """Causal examples: a prompt (labels -100) then a response (labelled), long-tailed lengths."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        total = min(60, 3 + int(rng.paretovariate(1.2) * 4)) if long_tail else rng.randint(3, 20)
        prompt = rng.randint(1, total - 1)
        ids = [rng.randrange(3, vocab) for _ in range(total)]
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return out


def test_rows_hold_every_example_once_with_restarting_positions_and_a_cut_first_label():
    exs = examples(200)
    rows = pack_examples(exs, 64)
    assert pack_examples(exs, 64) == rows  # deterministic
    seen = []
    for row in rows:
        assert len(row["input_ids"]) <= 64
        assert len(row["labels"]) == len(row["position_ids"]) == len(row["input_ids"])
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
        for a, b in itertools.pairwise(starts):
            assert row["position_ids"][a:b] == list(range(b - a))
            assert row["labels"][a] == IGNORE_INDEX
            seen.append((tuple(row["input_ids"][a:b]), tuple(row["labels"][a + 1 : b])))
    expected = [(tuple(e["input_ids"]), tuple(e["labels"][1:])) for e in exs]
    assert sorted(seen) == sorted(expected)  # nothing split, lost, duplicated, or relabelled
    # best fit: close to the bound of ceil(total / max_length) rows
    total = sum(len(e["input_ids"]) for e in exs)
    assert len(rows) <= -(-total // 64) + 2


def test_an_example_longer_than_a_row_is_truncated_and_alone():
    long = {"input_ids": list(range(3, 103)), "labels": list(range(3, 103))}
    short = {"input_ids": [5, 6, 7], "labels": [5, 6, 7]}
    rows = pack_examples([short, long], 50)
    assert [len(r["input_ids"]) for r in rows] == [50, 3]
    assert rows[0]["input_ids"] == list(range(3, 53)) and rows[0]["position_ids"] == list(range(50))


def tiny_llama(attn: str = "sdpa") -> torch.nn.Module:
    cfg = compose(["model=tiny_llama", f"model.attn_implementation={attn}"])
    torch.manual_seed(0)
    model = load_model(cfg.model)
    model.config.use_cache = False
    return model.float().eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_equal_unpacked(attn):
    """Each example's logits inside a packed batch == the example alone (float32, 1e-5)."""
    model = tiny_llama(attn)
    exs = examples(24, seed=1)
    rows = pack_examples(exs, 64)
    batch = PackedCollator(PAD)(rows)
    assert "attention_mask" not in batch
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        by_ids = {}
        for r, row in enumerate(rows):
            starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
            for a, b in itertools.pairwise(starts):
                by_ids.setdefault(tuple(row["input_ids"][a:b]), []).append(packed[r, a:b])
        for ex in exs:
            alone = model(input_ids=torch.tensor([ex["input_ids"]])).logits[0]
            got = by_ids[tuple(ex["input_ids"])].pop()
            torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-5)


def test_one_sgd_step_packed_equals_unpacked_with_a_token_weighted_loss():
    import lrft

    base = tiny_llama()
    targets = ["q_proj", "v_proj", "down_proj"]
    model = lrft.apply_method(base, "lora", r=4, alpha=8, dropout=0.0, target_modules=targets)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)  # non-zero B: A's gradient is exercised too
    model.train()
    exs = examples(16, seed=2)
    packed_model, padded_model = model, copy.deepcopy(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def step(m, batches):
        params = [p for p in m.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=0.5)
        sums, counts = [], []
        for batch in batches:
            labels = batch.pop("labels")
            s, c = token_loss_sum(m(**batch).logits, labels)
            sums.append(s)
            counts.append(c)
        (torch.stack(sums).sum() / torch.stack(counts).sum()).backward()
        opt.step()
        return {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}

    rows = pack_examples(exs, 64)
    after_packed = step(packed_model, [PackedCollator(PAD)(rows[:3]), PackedCollator(PAD)(rows[3:])])
    tok = type("Tok", (), {"pad_token_id": PAD, "eos_token_id": 2})()
    collate = Collator(tok, "causal")
    after_padded = step(padded_model, [collate(exs[:5]), collate(exs[5:])])  # another split, padded
    moved = max((after_packed[n] - before[n]).abs().max().item() for n in before)
    assert moved > 1e-3  # the step did something
    for name, value in after_packed.items():
        torch.testing.assert_close(value, after_padded[name], rtol=0, atol=1e-6)


def test_token_loss_sum_matches_transformers_mean():
    model = tiny_llama()
    tok = type("Tok", (), {"pad_token_id": PAD, "eos_token_id": 2})()
    batch = Collator(tok, "causal")(examples(6, seed=3))
    with torch.no_grad():
        out = model(**batch)
    total, count = token_loss_sum(out.logits, batch["labels"])
    assert count.item() == sum((batch["labels"][:, 1:] != IGNORE_INDEX).flatten().tolist())
    torch.testing.assert_close(total / count, out.loss, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_batch_token_stats_counts_real_tokens_packed_and_padded(pad_is_eos):
    exs = examples(30, seed=4)
    pad = 7
    if pad_is_eos:  # every example ends with the pad id, labelled (an EOS that doubles as pad)
        exs = [{"input_ids": e["input_ids"] + [pad], "labels": e["labels"] + [pad]} for e in exs]
    real = sum(len(e["input_ids"]) for e in exs)
    tok = type("Tok", (), {"pad_token_id": pad, "eos_token_id": pad})()
    padded = Collator(tok, "causal")(exs)
    r, p = batch_token_stats(padded)
    assert (r.item(), p.item()) == (real, padded["input_ids"].numel() - real)
    packed = PackedCollator(pad)(pack_examples(exs, 64))
    for pad_id in (None, pad):
        r, p = batch_token_stats(packed, pad_id)
        assert (r.item(), p.item()) == (real, packed["input_ids"].numel() - real)
    padded_share = batch_token_stats(padded)[1].item() / padded["input_ids"].numel()
    assert p.item() / (r + p).item() < padded_share / 3  # what packing buys on long-tailed lengths


def test_packing_config_key_and_refusal_for_encoders():
    assert compose(["model=tiny_llama", "dataset.packing=true"]).dataset.packing is True
    assert compose(["model=tiny_llama", "trainer.group_by_length=true"]).trainer.group_by_length is True
    for model in ("tiny_roberta", "tiny_t5"):
        with pytest.raises(UserError, match="packing=true needs a causal"):
            compose([f"model={model}", "dataset=glue/sst2", "dataset.packing=true"])
