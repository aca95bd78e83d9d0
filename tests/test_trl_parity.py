"""The preference objectives against TRL (a test-only dependency), on the same tiny LLaMA, the same
adapter weights and the same batch: loss and adapter gradients within 1e-5 relative (float32).

DPO and IPO run through TRL's own ``DPOTrainer._compute_loss`` (its forward, its PEFT reference);
ORPO and SimPO through TRL's loss functions (``ORPOTrainer.odds_ratio_loss``, ``CPOTrainer.cpo_loss``
with ``loss_type="simpo"``) and its ``get_batch_logps``, on the same model's logits.
"""

import tempfile
import types

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from lrft.config.compose import compose
from lrft.methods import get_method
from lrft.model.load import byte_tokenizer
from lrft.objectives import get_objective

trl = pytest.importorskip("trl")
TOL = 1e-5

CONFIG = dict(vocab_size=261, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=2, num_key_value_heads=1, pad_token_id=0, bos_token_id=1,
              eos_token_id=2)  # fmt: skip
# 2 pairs: rows chosen, chosen, rejected, rejected; completions of unequal lengths
IDS = torch.tensor([[1, 10, 11, 12, 20, 21, 0], [1, 13, 14, 22, 23, 24, 25],
                    [1, 10, 11, 12, 30, 0, 0], [1, 13, 14, 31, 32, 0, 0]])  # fmt: skip
COMPLETION = torch.zeros_like(IDS)
for row, (a, b) in enumerate([(4, 6), (3, 7), (4, 5), (3, 5)]):
    COMPLETION[row, a:b] = 1
MASK = (IDS != 0).long()
LABELS = IDS.masked_fill(COMPLETION == 0, -100)


def base_model():
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **CONFIG))


def lrft_model(objective: str, state: dict | None = None):
    """tiny LLaMA with lrft's LoRA on q, v (r 4, α 8, no dropout); B random: a trained policy."""
    cfg = compose(["model=tiny_llama", "method=lora", "method.r=4", "method.alpha=8",
                   "method.dropout=0.0", "method.target_modules=[q_proj,v_proj]", "dataset=preference",
                   "dataset.data_files.train=x.jsonl", f"objective={objective}",
                   "objective.beta=0.2"])  # fmt: skip
    method = get_method("lora")(OmegaConf.to_object(cfg.method))
    model = method.apply(base_model(), {"target_modules": ["q_proj", "v_proj"], "modules_to_save": []})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if state is not None and name in state:
                p.copy_(state[name])
            elif "lora_B" in name:
                p.normal_(0, 0.1)
    return model.train(), get_objective(cfg)


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


def ours(model, objective) -> torch.Tensor:
    terms, _ = objective.loss_terms(model, {"input_ids": IDS, "attention_mask": MASK, "labels": LABELS})
    counts = objective.counts({"input_ids": IDS, "labels": LABELS})
    return (terms / counts).sum()


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_and_ipo_equal_trl_dpotrainer(loss_type):
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from trl import DPOConfig, DPOTrainer

    peft_model = get_peft_model(
        base_model(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    )
    args = DPOConfig(output_dir=tempfile.mkdtemp(), beta=0.2, loss_type=[loss_type], report_to=[],
                     use_cpu=True, per_device_train_batch_size=2)  # fmt: skip
    pairs = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}] * 2)
    tok = byte_tokenizer("llama")
    trainer = DPOTrainer(model=peft_model, args=args, train_dataset=pairs, processing_class=tok)
    # TRL keeps the adapter it was given (B = 0: the base model) as its reference "ref"; the
    # policy's adapter then moves, as after training
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "lora_B.default" in name:
                p.normal_(0, 0.1)
    trainer.model.train()
    inputs = {"input_ids": IDS, "attention_mask": MASK, "completion_mask": COMPLETION}
    theirs = trainer._compute_loss(trainer.model, inputs, False)
    theirs = theirs[0] if isinstance(theirs, tuple) else theirs
    theirs.backward()
    want = {
        n.replace("base_model.model.", "").replace(".default.weight", ""): p.grad
        for n, p in trainer.model.named_parameters()
        if p.grad is not None and ".default" in n
    }
    state = {
        n.replace("base_model.model.", "").replace(".default.weight", ""): p.detach()
        for n, p in trainer.model.named_parameters()
        if ".default" in n
    }
    model, objective = lrft_model("dpo" if loss_type == "sigmoid" else "ipo", state)
    loss = ours(model, objective)
    loss.backward()
    got = grads(model)
    assert got.keys() == want.keys()
    assert abs(loss.item() - theirs.item()) <= TOL * abs(theirs.item())
    assert max(rel(got[k], want[k]) for k in want) < TOL


@pytest.mark.parametrize("name", ["orpo", "simpo"])
def test_orpo_and_simpo_equal_trl_losses(name):
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    model, objective = lrft_model(name)
    loss = ours(model, objective)
    loss.backward()
    got = grads(model)
    model.zero_grad(set_to_none=True)

    logits = model(input_ids=IDS, attention_mask=MASK).logits
    stub = types.SimpleNamespace(beta=0.2, accelerator=types.SimpleNamespace(device=IDS.device), alpha=0.0,
                                 loss_type="simpo", simpo_gamma=0.5, label_smoothing=0.0)  # fmt: skip
    avg = ORPOTrainer.get_batch_logps(logits, LABELS, average_log_prob=True)
    if name == "orpo":
        losses = ORPOTrainer.odds_ratio_loss(stub, avg[:2], avg[2:])[0]
        nll = F.cross_entropy(logits[:2, :-1].reshape(-1, logits.shape[-1]), LABELS[:2, 1:].reshape(-1))
        theirs = nll - losses.mean()  # ORPOTrainer.get_batch_loss_metrics
    else:
        theirs = CPOTrainer.cpo_loss(stub, avg[:2], avg[2:])[0].mean()  # cpo_alpha = 0: SimPO
    theirs.backward()
    want = grads(model)
    assert abs(loss.item() - theirs.item()) <= TOL * abs(theirs.item())
    assert max(rel(got[k], want[k]) for k in want) < TOL


def test_kto_equals_trl_ktotrainer(seed=None):
    """KTO through TRL's own ``KTOTrainer._compute_loss`` (its forward, its KL rows, its PEFT
    reference). One micro-batch on one process: there TRL's per-micro-batch KL estimate is lrft's
    per-step one, so loss and gradients agree within 1e-5 (with more micro-batches or processes
    they differ by design: lrft averages z₀ over the whole step, see lrft/objectives/kto.py)."""
    from contextlib import nullcontext

    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from trl import KTOConfig, KTOTrainer

    peft_model = get_peft_model(
        base_model(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    )
    args = KTOConfig(output_dir=tempfile.mkdtemp(), beta=0.2, report_to=[], use_cpu=True,
                     per_device_train_batch_size=2)  # fmt: skip
    rows = Dataset.from_list([{"prompt": "a", "completion": "b", "label": True},
                              {"prompt": "a", "completion": "c", "label": False}])  # fmt: skip
    trainer = KTOTrainer(
        model=peft_model, args=args, train_dataset=rows, processing_class=byte_tokenizer("llama")
    )
    # a policy that has learnt the mismatched rows a little: a random adapter only lowers log-probs,
    # so z₀ would clamp to 0 and the KL path would go untested
    trained = [p for n, p in trainer.model.named_parameters() if ".default" in n]
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "lora_B.default" in name:
                p.normal_(0, 0.02)
    opt = torch.optim.SGD(trained, lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        logits = trainer.model(input_ids=IDS[2:], attention_mask=MASK[2:]).logits[:, :-1]
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), LABELS[2:, 1:].reshape(-1)).backward()
        opt.step()
    trainer.model.zero_grad(set_to_none=True)
    trainer.model.train()
    # rows 0, 1 are the examples (good, bad); rows 2, 3 their mismatched KL rows
    inputs = {"input_ids": IDS[:2], "attention_mask": MASK[:2], "completion_mask": COMPLETION[:2],
              "KL_input_ids": IDS[2:], "KL_attention_mask": MASK[2:], "KL_completion_mask": COMPLETION[2:],
              "label": torch.tensor([True, False])}  # fmt: skip
    theirs = trainer._compute_loss(trainer.model, inputs, False)
    theirs = theirs[0] if isinstance(theirs, tuple) else theirs
    theirs.backward()
    prefix = "base_model.model."
    named = [(n.replace(prefix, "").replace(".default.weight", ""), p)
             for n, p in trainer.model.named_parameters() if ".default" in n]  # fmt: skip
    want = {n: p.grad for n, p in named if p.grad is not None}
    state = {n: p.detach() for n, p in named}
    model, objective = lrft_model("kto", state)
    batch = {"input_ids": IDS[:2], "attention_mask": MASK[:2], "labels": LABELS[:2],
             "kl_input_ids": IDS[2:], "kl_attention_mask": MASK[2:], "kl_labels": LABELS[2:],
             "desirable": torch.tensor([1, 0])}  # fmt: skip
    objective.prepare(model, [batch], lambda x: x, lambda _b: nullcontext())
    assert objective.kl.item() > 0.05  # the anchor is live (not clamped to 0) on this batch
    terms, _ = objective.loss_terms(model, batch)
    loss = (terms / objective.counts(batch)).sum()
    loss.backward()
    got = grads(model)
    assert got.keys() == want.keys()
    assert abs(loss.item() - theirs.item()) <= TOL * abs(theirs.item())
    assert max(rel(got[k], want[k]) for k in want) < TOL
