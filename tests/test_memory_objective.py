"""``lrft memory`` and ``trainer.memory_plan=auto`` with preference objectives (issue 23): a
micro-batch of B pairs is 2B rows, DPO / IPO add a no-grad reference forward on top of what the
training forward holds, ``sequence_logps`` holds one chunk of logits (``trainer.loss_chunk``; all
of them with 0), KTO's B examples add B KL rows scored with no grad before the training forward,
and a reference that would need a copy of the model (full fine-tuning) is flagged, or refused
under a budget.

The plan is the objective's own code run on meta; the CPU check runs the same code for real."""

import json
from contextlib import nullcontext

import pytest
import torch
from omegaconf import OmegaConf
from test_kto import rows as kto_rows
from test_preference import COMMON, pairs

from lrft.cli.main import main
from lrft.cli.memory import compose_memory, memory_main
from lrft.config.compose import compose
from lrft.errors import UserError
from lrft.memory.measure import LiveBytes
from lrft.memory.plan import Planner
from lrft.memory.preference import ReferencePhase
from lrft.methods.base import ApplyContext
from lrft.methods.registry import get_method
from lrft.model.activations import blocks, checkpoint_blocks
from lrft.model.load import load_model
from lrft.objectives import get_objective
from lrft.train import train

T = 64
SHAPE = ["model=tiny_llama", "dataset=preference", f"dataset.max_length={T}", "method.dropout=0.0"]


def planner_for(objective: str, *extra: str) -> Planner:
    return Planner(compose_memory([*SHAPE, f"objective={objective}", *extra]))


def test_a_pair_step_counts_two_rows_and_the_reference_forward():
    b = 2
    sft, orpo, dpo = (planner_for(o) for o in ("sft", "orpo", "dpo"))
    plans = {name: p.plan(b) for name, p in (("sft", sft), ("orpo", orpo), ("dpo", dpo))}
    for gc in (False, True):
        assert plans["dpo"].total(gc) >= plans["orpo"].total(gc) > plans["sft"].total(gc), gc
    assert plans["dpo"].total(False) > plans["orpo"].total(False)  # the reference's transient shows
    # 2 rows a pair: every block sees the 2B rows an sft step of 2B rows sees, byte for byte
    assert plans["orpo"].activations.layers == sft.activations(2 * b).layers
    assert plans["orpo"].rows_per_example == 2 and plans["sft"].rows_per_example == 1
    vocab = dpo.model.config.vocab_size
    for name in ("orpo", "dpo"):  # auto: 1024 positions a chunk on this vocabulary, more than 2B x T
        assert plans[name].logits_positions == 2 * b * T
        assert plans[name].logits_f32 == 2 * b * T * vocab * 4
    assert plans["orpo"].reference is None and plans["sft"].reference is None
    for gc in (False, True):
        parts = plans["dpo"].reference[gc]
        # the step's peak splits exactly around the reference forward
        assert plans["dpo"].peak[gc] == parts.peak == max(parts.train, parts.held + parts.transient)
        # the reference keeps nothing and holds at least its chunk's float32 logits and log-softmax
        assert parts.transient >= 2 * plans["dpo"].logits_f32
        # it runs after the training forward: what that forward keeps is live beneath it
        kept = plans["dpo"].activations
        assert parts.held >= (kept.outside if gc else kept.total)
    # no-grad forwards keep nothing: the reference adds no saved activations
    assert plans["dpo"].activations.total <= plans["orpo"].activations.total
    ipo = planner_for("ipo").plan(b)
    assert ipo.reference is not None
    assert ipo.reference[False].transient == plans["dpo"].reference[False].transient


def real_model(cfg):
    torch.manual_seed(0)
    model = load_model(cfg.model, None, cfg.quantization)
    method = get_method(cfg.method.name)(OmegaConf.to_object(cfg.method))
    defaults = {k: list(cfg.model[k]) for k in ("target_modules", "modules_to_save")}
    method.apply(model, defaults, ApplyContext())
    model.config.use_cache = False
    return model.train()


def real_batch(objective: str, b: int) -> dict[str, torch.Tensor]:
    """What the collator gives: 2B full-length rows of pairs, or B labelled rows and B KL rows."""
    ids = torch.randint(5, 200, (b if objective == "kto" else 2 * b, T))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    if objective == "kto":
        kl = torch.randint(5, 200, (b, T))
        batch.update(kl_input_ids=kl, kl_attention_mask=torch.ones_like(kl), kl_labels=kl)
        batch["desirable"] = torch.tensor([1, 0] * (b // 2), dtype=torch.long)
    return batch


@pytest.mark.parametrize(
    ("objective", "chunk"),
    [("dpo", "auto"), ("orpo", "auto"), ("kto", "auto"), ("dpo", 0), ("kto", 0), ("dpo", 48)],
)
def test_plan_matches_a_real_cpu_step(objective, chunk):
    """The planned step peak, and its split into phases, against the same step on CPU: the
    objective's ``prepare`` (KTO's KL rows) and ``loss_terms`` on a real tiny LLaMA, 2 pairs (or
    2 examples + 2 KL rows) x 64 tokens, float32, with ``trainer.loss_chunk`` auto (one chunk),
    0 (the whole logits) and 48 (several chunks, each checkpointed)."""
    b = 2
    cfg = compose_memory([*SHAPE, f"objective={objective}", f"trainer.loss_chunk={chunk}"])
    planner = Planner(cfg)
    assert planner.pairs.objective.chunk == chunk  # set from the config, as the step sets it
    model = real_model(cfg)
    batch = real_batch(objective, b)
    obj = get_objective(cfg)
    obj.chunk = chunk  # as lrft.train.step.forward_backward does
    for gc in (False, True):
        checkpoint_blocks(model, len(blocks(model)) if gc else 0)
        with LiveBytes(model) as live, ReferencePhase(live, obj) as phase:
            obj.prepare(model, [batch], lambda x: x, lambda _b: nullcontext())
            obj.loss_terms(model, batch)[0].sum().backward()
        model.zero_grad(set_to_none=True)
        planned = planner.step_peak(b, gc)
        # exact on this model (torch 2.13 CPU); the bound for plans is 10%
        assert planned == phase.parts.peak, f"checkpointing={gc}"
        assert planner.reference_parts[(b, gc, False)] == phase.parts
        if objective == "kto":  # two no-grad forwards of the KL rows, before anything is held
            assert phase.parts.prepare > 0 and phase.parts.transient > 0
        else:
            assert phase.parts.prepare == 0  # a pair objective prepares nothing


def test_cli_labels_the_preference_rows(capsys):
    assert memory_main([*SHAPE, "objective=orpo,dpo", "trainer.batch_size=2"]) == 0
    out = capsys.readouterr().out
    for row in (
        "activations (2×B rows: chosen+rejected)",
        "reference forward (no grad): transient + held",
        "training forward + backward peak",
        "logits f32 at once (sequence_logps: positions x V)",
        "(every 256 positions)",
        "dpo: 2 pairs = 4 rows, + reference",
        "orpo: 2 pairs = 4 rows",
        "step peak, full logits (loss_chunk=0)",  # sequence_logps is chunked: the row applies
    ):
        assert row in out, row
    assert "KL rows pass" not in out  # no KTO column


def test_cli_plans_kto(capsys):
    assert memory_main([*SHAPE, "objective=kto", "trainer.batch_size=2", "trainer.loss_chunk=32"]) == 0
    out = capsys.readouterr().out
    for row in (
        "kto: 2 examples + 2 KL rows, + reference",
        "KL rows pass before forward (no grad)",
        "reference forward (no grad): transient + held",
        "(a chunk of 32 positions)",
    ):
        assert row in out, row
    flat = " ".join(out.split())
    assert "objective=kto: trainer.batch_size counts examples" in flat
    assert "loss_chunk=32 positions of logits at a time" in flat


def test_objective_dpo_alone_plans_preference_pairs(capsys):
    assert memory_main(["model=tiny_llama", "objective=dpo", "dataset.max_length=32"]) == 0
    assert "objective=dpo: trainer.batch_size counts pairs" in capsys.readouterr().out


def test_full_fine_tuning_with_a_reference_is_flagged_and_refused_under_a_budget(capsys):
    args = [*SHAPE[:-1], "method=full", "objective=dpo"]  # full fine-tuning has no dropout key
    assert memory_main(args) == 0
    out = " ".join(capsys.readouterr().out.split())  # rich wraps the notes
    assert "reference copy (refused: weights outside adapters train" in out
    assert "What works: a low-rank method" in out
    assert main(["memory", *args, "memory.budget_gb=8"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "nothing fits memory.budget_gb=8" in err and "objective=orpo" in err
    # beside a method that works, the refused column is left out and said
    assert memory_main([*SHAPE, "method=lora,full", "objective=dpo", "memory.budget_gb=8"]) == 0
    assert "not planned: full: objective=dpo with method=full" in " ".join(capsys.readouterr().out.split())
    # orpo needs no reference: full fine-tuning plans
    assert memory_main([*SHAPE[:-1], "method=full", "objective=orpo", "memory.budget_gb=8"]) == 0


def test_memory_plan_auto_picks_a_micro_batch_of_pairs(tmp_path):
    """A budget where 2 pairs (4 rows) fit without recomputation and 4 pairs do not: the run
    trains 2 pairs x 2 accumulation, the global batch of 4 pairs kept."""
    dpo = planner_for("dpo")
    resident = dpo.plan(1).resident
    budget = resident + dpo.step_peak(2, False)
    assert resident + dpo.step_peak(4, False) > budget
    run = tmp_path / "run"
    args = [*COMMON, *pairs(tmp_path), "objective=dpo", f"dataset.max_length={T}", "method.dropout=0.0",
            "trainer.batch_size=4", "trainer.grad_accum=1", "trainer.max_steps=1", f"output_dir={run}",
            "trainer.memory_plan=auto", f"memory.budget_gb={budget / (1 << 30)}"]  # fmt: skip
    assert main(["train", *args]) == 0  # the CLI's quick key check knows memory.budget_gb
    info = json.loads((run / "run_info.json").read_text())["memory_plan"]
    assert (info["batch_size"], info["grad_accum"], info["checkpointed"]) == (2, 2, 0)
    assert info["total"] == budget
    saved = OmegaConf.load(run / "config.yaml").trainer
    assert (saved.batch_size, saved.grad_accum) == (2, 2)


def test_lrft_train_takes_memory_keys_and_names_lrft_memory_s_own(tmp_path, capsys):
    """memory.budget_gb is a run's key (TrainConfig.memory, read by trainer.memory_plan=auto): the
    quick key check passes it; lrft memory's job keys are refused naming the run's equivalent."""
    base = [*COMMON, *pairs(tmp_path), "objective=orpo", f"output_dir={tmp_path / 'r'}"]
    assert main(["train", *base, "memory.sharding=fsdp"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "'memory.sharding' is a key of lrft memory" in err and "trainer.sharding" in err
    assert main(["train", *base, "memory.budget_g=8"]) == 2
    assert "Did you mean: budget_gb?" in capsys.readouterr().err
    assert main(["train", *base, "memory.budget_gb=0"]) == 2  # past the quick check: validate's own
    assert "memory.budget_gb must be > 0" in capsys.readouterr().err


def test_memory_plan_auto_picks_a_micro_batch_of_kto_examples(tmp_path):
    """As for pairs: 2 examples (+ 2 KL rows) fit without recomputation, 4 do not."""
    kto = planner_for("kto")
    resident = kto.plan(1).resident
    budget = resident + kto.step_peak(2, False)
    assert resident + kto.step_peak(4, False) > budget
    run = tmp_path / "run"
    args = [*COMMON, *kto_rows(tmp_path), "objective=kto", f"dataset.max_length={T}", "method.dropout=0.0",
            "trainer.batch_size=4", "trainer.grad_accum=1", "trainer.max_steps=1", f"output_dir={run}",
            "trainer.memory_plan=auto", f"memory.budget_gb={budget / (1 << 30)}"]  # fmt: skip
    train(compose(args), run)
    info = json.loads((run / "run_info.json").read_text())["memory_plan"]
    assert (info["batch_size"], info["grad_accum"], info["checkpointed"]) == (2, 2, 0)


def test_memory_plan_auto_refuses_a_reference_copy(tmp_path):
    run = tmp_path / "r"
    cfg = compose([*COMMON, *pairs(tmp_path), "objective=dpo", "method=full", "trainer.memory_plan=auto",
                   f"dataset.max_length={T}", "memory.budget_gb=8", f"output_dir={run}"])  # fmt: skip
    with pytest.raises(UserError, match="objective=orpo or objective=simpo"):
        train(cfg, run)


@pytest.mark.parametrize("objective", ["dpo", "kto"])
def test_a_precomputed_reference_plans_no_reference_forward(objective):
    """objective.precompute_ref=true: the batch carries π_ref (``ref_logps``), so the step runs no
    reference forward; its plan is the reference-free one and the note says why."""
    b = 2
    per_step = planner_for(objective)
    cached = planner_for(objective, "objective.precompute_ref=true")
    assert cached.pairs.precomputed and not cached.pairs.reference
    assert "precomputed" in cached.pairs.note
    for gc in (False, True):  # never more, but for the batch's own (B, 2) float32 table rows
        assert cached.step_peak(b, gc) <= per_step.step_peak(b, gc) + b * 2 * 4
    if objective == "dpo":  # no reference phase is planned: the step is ORPO-shaped
        assert cached.plan(b).reference is None and per_step.plan(b).reference is not None
