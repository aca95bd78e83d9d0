"""KTO (issue 23): TRL's unpaired rows, their mismatched KL rows, refusals of the other shape, a
run that learns, and a step-level KL estimate that keeps the update independent of the split.
Equality with TRL's KTOTrainer is in tests/test_trl_parity.py."""

import json
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from test_loop_invariants import ADAMW, SGD, max_diff, run

from lrft.cli.main import main
from lrft.config.compose import compose
from lrft.data.collate import Collator
from lrft.data.encode import encode_rows
from lrft.model.load import byte_tokenizer, load_model
from lrft.objectives import get_objective

COMMON = ["model=tiny_llama", "dataset=preference", "objective=kto", "trainer.log_every=1",
          "trainer.eval_every=0", "trainer.progress=false", "trainer.max_grad_norm=0"]  # fmt: skip


def rows(tmp: Path, n: int = 16) -> list[str]:
    """Good completions shout the word, bad ones whisper a piece of it; labels alternate in runs
    of unequal length so micro-batches hold unequal numbers of each."""
    path = tmp / "kto.jsonl"
    with path.open("w") as fh:
        for i in range(n):
            word = "abcdefghijkl"[: 1 + (i * 5) % 12]
            good = i % 3 != 1
            completion = f" {word.upper()}!" if good else f" {word[: 1 + i % 3]}."
            fh.write(json.dumps({"prompt": f"Shout {word}:", "completion": completion, "label": good}) + "\n")
    return [f"dataset.data_files.train={path}", f"dataset.data_files.validation={path}"]


def learned(tok, ids, labels) -> str:
    return tok.decode([i for i, y in zip(ids, labels, strict=True) if y != -100]).replace("</s>", "")


def test_unpaired_rows_encode_with_a_mismatched_kl_row(tmp_path):
    from lrft.data.chat import CHATML

    tok = byte_tokenizer("llama")
    tok.chat_template = CHATML
    dcfg = compose([*COMMON, "dataset.data_files.train=x.jsonl"]).dataset
    plain = [{"prompt": "Say hi:", "completion": " HI", "label": True},
             {"prompt": "Say no:", "completion": " no", "label": False},
             {"prompt": "Say ok:", "completion": " OK", "label": True}]  # fmt: skip
    out = encode_rows(plain, dcfg, "causal", tok)
    assert [learned(tok, e["input_ids"], e["labels"]) for e in out] == [" HI", " no", " OK"]
    # each prompt with the completion of the row before it (row 0: the last one's)
    assert [learned(tok, e["kl_input_ids"], e["kl_labels"]) for e in out] == [" OK", " HI", " no"]
    assert tok.decode(out[1]["kl_input_ids"]).startswith("<s>Say no:")
    assert [e["desirable"] for e in out] == [1, 0, 1]
    chat = [{"prompt": [{"role": "user", "content": p}], "completion": [{"role": "assistant", "content": c}],
             "label": good} for p, c, good in (("hi", "HI", True), ("no", "no", False))]  # fmt: skip
    out = encode_rows(chat, dcfg, "causal", tok)
    assert learned(tok, out[0]["input_ids"], out[0]["labels"]) == "HI<|im_end|>"
    assert learned(tok, out[0]["kl_input_ids"], out[0]["kl_labels"]) == "no<|im_end|>"
    batch = Collator(tok, "causal")(out)
    assert batch["input_ids"].shape[0] == 2 and batch["kl_input_ids"].shape[0] == 2  # B rows, not 2B
    assert batch["desirable"].tolist() == [1, 0]


@pytest.mark.parametrize(
    ("lines", "says"),
    [
        ([{"prompt": "p", "completion": "c", "label": "yes"}], "row 2: column 'label' must be true or false"),
        ([{"prompt": "p", "completion": None, "label": True}], "row 2: column 'completion' has no value"),
        ([{"prompt": [{"role": "user", "content": "p"}], "label": True,
           "completion": [{"role": "assistant", "content": "c"}]}],
         "row 2: this row holds labelled completions of message lists"),
        ([{"prompt": "p", "chosen": "c", "rejected": "r"}], "row 2: this row holds chosen/rejected pairs"),
    ],
    ids=["label", "null", "mixed-form", "mixed-shape"],
)  # fmt: skip
def test_bad_rows_name_file_and_row(tmp_path, capsys, lines, says):
    path = tmp_path / "kto.jsonl"
    good = {"prompt": "a", "completion": "b", "label": True}
    path.write_text("\n".join(json.dumps(x) for x in [good, *lines]) + "\n")
    args = [*COMMON, f"dataset.data_files.train={path}", f"output_dir={tmp_path / 'r'}"]
    assert main(["train", *args]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert str(path) in err and says in err


def test_each_objective_refuses_the_other_shape(tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n")
    args = [*COMMON, f"dataset.data_files.train={pairs}", f"output_dir={tmp_path / 'a'}"]
    assert main(["train", *args]) == 2
    assert "one good and one bad row" in " ".join(capsys.readouterr().err.split())
    labelled = rows(tmp_path)
    args = [*COMMON, *labelled, "objective=dpo", f"output_dir={tmp_path / 'b'}"]
    assert main(["train", *args]) == 2
    assert "train it with objective=kto" in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "b" / "final").exists()


def test_the_loss_is_the_paper_formula_with_the_step_kl():
    """One batch through the objective: z₀ is the mean log-ratio of the KL rows, clamped at 0,
    and each example's loss is 1 − σ(β(r − z₀)) (good) or 1 − σ(β(z₀ − r)) (bad)."""
    cfg = compose([*COMMON, "dataset.data_files.train=x.jsonl", "objective.beta=0.5",
                   "objective.undesirable_weight=2.0"])  # fmt: skip
    objective = get_objective(cfg)
    tok = byte_tokenizer("llama")
    batch = Collator(tok, "causal")(
        encode_rows([{"prompt": f"p{i}", "completion": f" c{i * 7}", "label": i % 2 == 0} for i in range(4)],
                    cfg.dataset, "causal", tok)
    )  # fmt: skip
    torch.manual_seed(0)
    model = load_model(cfg.model, None).eval()
    logps = torch.tensor([0.0, -1.0, -2.0, -3.0])
    ref = torch.tensor([-0.5, -0.5, -0.5, -0.5])
    calls = iter([logps + 1.0, ref, logps, ref])  # KL rows (policy, ref), then the examples
    import lrft.objectives.kto as kto

    real = kto.sequence_logps
    kto.sequence_logps = lambda _m, _b, _chunk: (next(calls), None)
    try:
        objective.prepare(model, [batch], lambda x: x, lambda _b: nullcontext())
        terms, metrics = objective.loss_terms(model, batch)
    finally:
        kto.sequence_logps = real
    z0 = ((logps + 1.0) - ref).mean().clamp(min=0)
    r = logps - ref
    want = torch.where(
        batch["desirable"].bool(), 1 - torch.sigmoid(0.5 * (r - z0)), 2 * (1 - torch.sigmoid(0.5 * (z0 - r)))
    )
    assert objective.kl.item() == pytest.approx(z0.item())
    assert terms.item() == pytest.approx(want.sum().item(), rel=1e-6)
    assert metrics["count/chosen"].item() == 2 and metrics["rewards/chosen"].item() == pytest.approx(
        0.5 * (r[0] + r[2]).item()
    )


def test_kto_learns_and_lrft_eval_equals_the_in_loop_eval(tmp_path):
    out = tmp_path / "kto"
    args = [*COMMON, *rows(tmp_path), "trainer.max_steps=8", "trainer.batch_size=4", "optimizer.lr=1e-2",
            "trainer.eval_every=8", f"output_dir={out}"]  # fmt: skip
    assert main(["train", *args]) == 0
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in records if "loss" in r)
    assert first["loss"] == pytest.approx(0.5, abs=1e-6)  # π = π_ref: r = z₀ = 0, 1 − σ(0)
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "kl", "logps/chosen"} <= set(first)
    last = [r for r in records if "eval/rewards/margins" in r][-1]
    assert last["eval/rewards/margins"] > 0 and last["eval/loss"] < 0.5
    assert main(["eval", f"checkpoint={out}", "progress=false"]) == 0
    got = json.loads((out / "eval.json").read_text())["results"]["validation"]["metrics"]
    for key in ("loss", "rewards/chosen", "rewards/margins", "kl"):
        assert got[key] == pytest.approx(last[f"eval/{key}"], rel=1e-5), key


@pytest.mark.parametrize(("opt", "tol"), [(SGD, 1e-6), (ADAMW, 1e-5)], ids=["sgd", "adamw"])
def test_the_update_does_not_depend_on_the_split(tmp_path, opt, tol):
    """4 examples per step as one batch or 2 × 2: z₀ is estimated over the whole step, and the
    loss is averaged over its examples, so both train the same adapters. Two processes:
    tests/test_preference_fsdp2.py (KTO sharded over 2 processes equals one)."""
    args = [*COMMON, *rows(tmp_path), *opt, "trainer.max_steps=3"]
    whole = run(tmp_path, "whole", [*args, "trainer.batch_size=4"])
    split = run(tmp_path, "split", [*args, "trainer.batch_size=2", "trainer.grad_accum=2"])
    assert max_diff(whole, split) < tol
    assert max(v.abs().max().item() for k, v in whole.items() if "lora_B" in k) > 1e-3


@pytest.mark.parametrize("objective", ["kto", "dpo"])
def test_lora_ga_initialises_from_the_preferred_completions(tmp_path, objective):  # dpo: no run
    """LoRA-GA's gradient probe sees token-loss batches of the completions to learn (KTO: the good
    rows; pairs: the chosen rows), not KTO's KL rows or the rejected completions."""
    from lrft.data.load import load_rows

    data = rows(tmp_path) if objective == "kto" else []
    if objective == "dpo":
        path = tmp_path / "pairs.jsonl"
        lines = [{"prompt": f"Say {w}:", "chosen": f" {w.upper()}", "rejected": f" {w}"} for w in "abcd"]
        path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
        data = [f"dataset.data_files.train={path}", f"dataset.data_files.validation={path}"]
    cfg = compose([*COMMON, *data, f"objective={objective}"])
    tok = byte_tokenizer("llama")
    examples = encode_rows(load_rows(cfg.dataset, "train")[:4], cfg.dataset, "causal", tok)
    batch = Collator(tok, "causal")(examples)
    calib = get_objective(cfg).calibration_batch(batch)
    assert set(calib) == {"input_ids", "attention_mask", "labels"}
    if objective == "kto":
        assert calib["input_ids"].shape[0] == int(batch["desirable"].sum())
    else:
        assert torch.equal(calib["input_ids"], batch["input_ids"][:4])
    if objective == "dpo":  # lora_ga trains on pairs in tests/test_preference_methods.py
        return
    out = tmp_path / "ga"
    args = [*COMMON, *data, f"objective={objective}", "method=lora_ga", "method.init_batches=2",
            "trainer.max_steps=2", "trainer.batch_size=2", f"output_dir={out}"]  # fmt: skip
    assert main(["train", *args]) == 0
    assert (out / "final").is_dir()
