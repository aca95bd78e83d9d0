"""Preference tuning (issue 23): pairs data, the adapters-off reference, each objective's loss
against its formula, and an update that does not depend on how the pairs are split."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from launch import torchrun
from omegaconf import OmegaConf
from test_loop_invariants import ADAMW, SGD, final_state, max_diff, run

from lrft.cli.main import main
from lrft.config.compose import compose
from lrft.data.collate import Collator
from lrft.data.encode import encode_rows
from lrft.errors import UserError
from lrft.methods.layers import adapters_off
from lrft.model.load import byte_tokenizer
from lrft.objectives import get_objective
from lrft.objectives.preference import Logps

COMMON = ["model=tiny_llama", "dataset=preference", "trainer.log_every=1", "trainer.eval_every=0",
          "trainer.progress=false", "trainer.max_grad_norm=0"]  # fmt: skip


def pairs(tmp: Path, n: int = 16) -> list[str]:
    """Completions of unequal lengths (per-pair and per-token means differ), distinct per pair."""
    path = tmp / "pairs.jsonl"
    with path.open("w") as fh:
        for i in range(n):
            word = "abcdefghijkl"[: 1 + (i * 5) % 12]
            fh.write(json.dumps({"prompt": f"Shout {word}:", "chosen": f" {word.upper()}!",
                                 "rejected": f" {word[: 1 + i % 3]}."}) + "\n")  # fmt: skip
    return [f"dataset.data_files.train={path}", f"dataset.data_files.validation={path}"]


def test_standard_and_conversational_pairs_encode_with_completion_labels(tmp_path):
    from lrft.data.chat import CHATML

    tok = byte_tokenizer("llama")
    tok.chat_template = CHATML
    dcfg = compose([*COMMON, "dataset.data_files.train=x.jsonl", "objective=dpo"]).dataset
    rows = [
        {"prompt": "Say hi:", "chosen": " HI", "rejected": " no"},
        {"prompt": [{"role": "user", "content": "Say hi"}],
         "chosen": [{"role": "assistant", "content": "HI"}],
         "rejected": [{"role": "assistant", "content": "no"}]},
    ]  # fmt: skip
    plain, chat = encode_rows(rows, dcfg, "causal", tok)
    for ex, want in ((plain, (" HI", " no")), (chat, ("HI<|im_end|>", "no<|im_end|>"))):
        for ids, labels, text in (
            (ex["input_ids"], ex["labels"], want[0]),
            (ex["rejected_input_ids"], ex["rejected_labels"], want[1]),
        ):
            learned = [i for i, y in zip(ids, labels, strict=True) if y != -100]
            assert tok.decode(learned).replace("</s>", "") == text  # the completion only (and EOS)
    batch = Collator(tok, "causal")([plain, chat])
    assert batch["input_ids"].shape[0] == 4  # chosen, chosen, rejected, rejected
    assert batch["labels"][2].ne(-100).sum() == len([y for y in plain["rejected_labels"] if y != -100])


@pytest.mark.parametrize(
    ("row", "says"),
    [
        ({"prompt": "p", "chosen": "c"}, "missing column 'rejected'"),
        ({"prompt": "p", "chosen": "c", "rejected": None}, "column 'rejected' has no value"),
        ({"prompt": "p", "chosen": ["c"], "rejected": "r"}, "column 'chosen' must be text"),
        ({"prompt": [{"role": "user", "content": "p"}], "chosen": [{"role": "user", "content": "c"}],
          "rejected": [{"role": "assistant", "content": "r"}]}, "chosen[0] has role 'user': completions are"),
    ],
)  # fmt: skip
def test_bad_pairs_name_file_row_and_the_expected_columns(tmp_path, capsys, row, says):
    path = tmp_path / "pairs.jsonl"
    good = json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"})
    path.write_text(good + "\n" + json.dumps(row) + "\n")
    args = [*COMMON, "objective=dpo", f"dataset.data_files.train={path}", f"output_dir={tmp_path / 'r'}"]
    assert main(["train", *args]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"{path}, row 2: {says}" in err and "Expected columns for preference data: prompt, chosen" in err


def test_objective_and_data_must_match():
    with pytest.raises(UserError, match="learns from preference data"):
        compose(["model=tiny_llama", "objective=dpo"])
    with pytest.raises(UserError, match="train it with a preference objective"):
        compose(["model=tiny_llama", "dataset=preference", "dataset.data_files.train=x.jsonl"])
    with pytest.raises(UserError, match="packing"):
        compose([*COMMON, "objective=orpo", "dataset.data_files.train=x.jsonl", "dataset.packing=true"])


def test_a_reference_objective_refuses_weights_that_train_outside_the_adapters(tmp_path, capsys):
    args = [*COMMON, *pairs(tmp_path), "objective=dpo", "method=full", f"output_dir={tmp_path / 'r'}"]
    assert main(["train", *args]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "adapters switched off" in err and "objective=orpo" in err and not (tmp_path / "r").exists()


@pytest.mark.parametrize("method", ["lora", "dora", "pissa"])
def test_adapters_off_is_the_model_before_training(method):
    """π_ref without a copy: every low-rank layer's original output, offset bases included
    (PiSSA moves the principal part into the adapter; adapters_off must add it back)."""
    from lrft.methods import get_method
    from lrft.model.load import load_model
    from lrft.train.setup import OmegaConf

    cfg = compose(["model=tiny_llama", f"method={method}"])
    torch.manual_seed(0)
    model = load_model(cfg.model, None).eval()
    ids = torch.randint(3, 200, (2, 9))
    before = model(input_ids=ids).logits
    spec = get_method(method)(OmegaConf.to_object(cfg.method))
    adapted = spec.apply(model, {k: list(cfg.model[k]) for k in ("target_modules", "modules_to_save")})
    adapted.eval()  # no adapter dropout: the three forwards compare weights only
    with torch.no_grad():
        for p in adapted.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)  # as if trained: the output moves
    moved = adapted(input_ids=ids).logits
    with adapters_off(adapted) as n:
        ref = adapted(input_ids=ids).logits
    assert n > 0 and (moved - before).abs().max() > 1e-3
    assert (ref - before).abs().max() < 1e-5
    assert torch.equal(adapted(input_ids=ids).logits, moved)  # switched back on


def logps(chosen, rejected, nc, nr, ref_c=None, ref_r=None) -> Logps:
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return Logps(t(chosen), t(rejected), t(nc), t(nr), -t(chosen).sum(),
                 None if ref_c is None else t(ref_c), None if ref_r is None else t(ref_r))  # fmt: skip


@pytest.mark.parametrize("name", ["dpo", "ipo", "orpo", "simpo"])
def test_each_loss_is_its_paper_formula(name):
    """Per-pair losses from two made-up pairs, against the formulas written out here."""
    cfg = compose([*COMMON, "dataset.data_files.train=x.jsonl", f"objective={name}", "objective.beta=0.3"])
    obj = get_objective(cfg)
    lp = logps([-4.0, -9.0], [-6.0, -5.0], [2, 3], [3, 1], [-5.0, -8.0], [-5.5, -6.0])
    terms, chosen_r, rejected_r = obj.pair_terms(lp)
    b = 0.3
    want = []
    for i in range(2):
        pc, pr, rc, rr = (t[i].item() for t in (lp.chosen, lp.rejected, lp.ref_chosen, lp.ref_rejected))
        nc, nr = lp.n_chosen[i].item(), lp.n_rejected[i].item()
        if name == "dpo":
            want.append(-math.log(1 / (1 + math.exp(-b * ((pc - rc) - (pr - rr))))))
        elif name == "ipo":
            want.append(((pc - rc) / nc - (pr - rr) / nr - 1 / (2 * b)) ** 2)
        elif name == "orpo":
            ac, ar = pc / nc, pr / nr
            odds = (ac - math.log(1 - math.exp(ac))) - (ar - math.log(1 - math.exp(ar)))
            want.append(-b * math.log(1 / (1 + math.exp(-odds))))
        else:
            want.append(-math.log(1 / (1 + math.exp(-(b * (pc / nc - pr / nr) - 0.5)))))
    assert terms[0].item() == pytest.approx(sum(want), rel=1e-12)
    if name == "orpo":  # + the chosen tokens' NLL, averaged over the step's chosen tokens
        assert terms[1].item() == pytest.approx(13.0) and obj.denominators() == ("pairs", "chosen_tokens")
    reward = [b * (lp.chosen[0] - lp.ref_chosen[0]).item() if obj.reference else b * -2.0]
    assert chosen_r[0].item() == pytest.approx(reward[0])
    assert rejected_r.shape == (2,)


def test_dpo_starts_at_log_2_and_learns_the_preference(tmp_path):
    """At step 0 the policy is its reference, so every pair's loss is −log σ(0) = log 2 and the
    rewards are 0; after a few steps the chosen completions win."""
    out = tmp_path / "dpo"
    args = [*COMMON, *pairs(tmp_path), "objective=dpo", "trainer.max_steps=8", "trainer.batch_size=4",
            "optimizer.lr=1e-2", "trainer.eval_every=8", f"output_dir={out}"]  # fmt: skip
    assert main(["train", *args]) == 0
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in records if "loss" in r)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    last_eval = [r for r in records if "eval/rewards/accuracies" in r][-1]
    assert last_eval["eval/rewards/accuracies"] > 0.9 and last_eval["eval/rewards/margins"] > 0
    assert last_eval["eval/loss"] < 0.6 * math.log(2)
    # lrft eval on the finished run scores the held-out pairs with the run's objective, the same
    assert main(["eval", f"checkpoint={out}", "progress=false"]) == 0
    got = json.loads((out / "eval.json").read_text())["results"]["validation"]["metrics"]
    for key in ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen"):
        assert got[key] == pytest.approx(last_eval[f"eval/{key}"], rel=1e-5), key


@pytest.mark.parametrize(
    ("objective", "opt", "tol"),
    # AdamW measured: dpo 2.6e-6, orpo 2.0e-7 (float32 rounding magnified by Adam's first steps)
    [("dpo", SGD, 1e-6), ("orpo", SGD, 1e-6), ("dpo", ADAMW, 1e-5), ("orpo", ADAMW, 1e-5)],
    ids=["dpo-sgd", "orpo-sgd", "dpo-adamw", "orpo-adamw"],
)
def test_the_update_does_not_depend_on_the_split(tmp_path, objective, opt, tol):
    """4 pairs per step as one batch, or 2 micro-batches of 2 (ORPO: a per-pair and a per-token
    term, each averaged over the whole step); float32, with the shipped dropout."""
    args = [*COMMON, *pairs(tmp_path), f"objective={objective}", *opt, "trainer.max_steps=3"]
    whole = run(tmp_path, "whole", [*args, "trainer.batch_size=4"])
    split = run(tmp_path, "split", [*args, "trainer.batch_size=2", "trainer.grad_accum=2"])
    assert max_diff(whole, split) < tol
    assert max(v.abs().max().item() for k, v in whole.items() if "lora_B" in k) > 1e-3


def test_two_processes_train_the_pairs_of_one(tmp_path):
    args = [*COMMON, *pairs(tmp_path), "objective=dpo", *SGD, "trainer.max_steps=3"]
    one = run(tmp_path, "one", [*args, "trainer.batch_size=4"])
    two = tmp_path / "two"
    proc = torchrun([*args, "trainer.batch_size=2", f"output_dir={two}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert max_diff(final_state(two), one) < 1e-6


def test_chosen_nll_is_the_token_loss(tmp_path):
    """ORPO's NLL term is the plain next-token loss of the chosen rows (the SFT loss)."""
    tok = byte_tokenizer("llama")
    cfg = compose([*COMMON, "objective=orpo", *pairs(tmp_path)])
    from lrft.data.load import load_rows
    from lrft.model.load import load_model

    examples = encode_rows(load_rows(cfg.dataset, "train")[:3], cfg.dataset, "causal", tok)
    batch = Collator(tok, "causal")(examples)
    torch.manual_seed(0)
    model = load_model(cfg.model, None).eval()
    lp = get_objective(cfg).logps(model, batch)
    logits = model(input_ids=batch["input_ids"][:3], attention_mask=batch["attention_mask"][:3]).logits
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:3, 1:].reshape(-1),
                          ignore_index=-100, reduction="sum")  # fmt: skip
    assert lp.chosen_nll.item() == pytest.approx(nll.item(), rel=1e-5)


@pytest.mark.parametrize("chunk", [3, "auto"])
def test_chunked_sequence_logps_equal_the_full_logits(tmp_path, chunk):
    """The policy's log-probs from C positions of logits at a time (checkpointed per chunk) equal
    the full-logits ones, and so do the adapter gradients of a DPO-like nonlinear loss."""
    from lrft.methods import get_method
    from lrft.objectives.preference import sequence_logps

    cfg = compose([*COMMON, "objective=dpo", *pairs(tmp_path)])
    tok = byte_tokenizer("llama")
    from lrft.data.load import load_rows
    from lrft.model.load import load_model

    batch = Collator(tok, "causal")(
        encode_rows(load_rows(cfg.dataset, "train")[:3], cfg.dataset, "causal", tok)
    )
    torch.manual_seed(0)
    method = get_method("lora")(OmegaConf.to_object(compose(["method=lora", "method.dropout=0.0"]).method))
    model = method.apply(
        load_model(cfg.model, None), {"target_modules": ["q_proj", "v_proj"], "modules_to_save": []}
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    got = {}
    for c in (0, chunk):
        model.zero_grad(set_to_none=True)
        lp, n = sequence_logps(model, batch, c)
        (-F.logsigmoid(lp[:3] - lp[3:])).sum().backward()
        got[c] = (
            lp.detach(),
            n,
            {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None},
        )
    (full, n0, g0), (part, n1, g1) = got[0], got[chunk]
    assert torch.equal(n0, n1)
    assert (full - part).abs().max().item() < 1e-5 * full.abs().max().item()
    assert g0.keys() == g1.keys() and g0
    assert max(((g0[k] - g1[k]).abs().max() / g0[k].abs().max().clamp(min=1e-12)).item() for k in g0) < 1e-5


def test_generate_prompts_a_preference_run_as_it_trained(tmp_path):
    """lrft generate (and a merged folder's prompt_format) on a preference run: conversational pairs
    were rendered with the chat template, text pairs were plain prompt + completion."""
    from lrft.export.generate import run_prompt_format

    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"prompt": [{"role": "user", "content": "hi"}],
                                "chosen": [{"role": "assistant", "content": "HI"}],
                                "rejected": [{"role": "assistant", "content": "no"}]}) + "\n")  # fmt: skip
    for data, want in ((pairs(tmp_path), "plain"), ([f"dataset.data_files.train={chat}"], "chat")):
        assert run_prompt_format(compose([*COMMON, "objective=dpo", *data])) == want
    gone = compose([*COMMON, "objective=dpo", f"dataset.data_files.train={tmp_path / 'moved.jsonl'}"])
    assert run_prompt_format(gone) == "plain"
