"""The 2026 families through model=hf: Gemma 3 (sliding-window attention, final-logit soft-capping,
tied head), Qwen2, Qwen3 (q/k norms) and Llama 3 (rope_scaling "llama3"), as tiny random configs
that transformers builds offline. Each trains LoRA-FA with the chunked loss (small chunks, so the
head runs chunk by chunk), evaluates, merges (the merge verifies logits against the adapter model)
and generates the same answer from the run and from the merged folder."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lrft.config.compose import compose
from lrft.data.chat import CHATML
from lrft.export.generate import GenerateConfig, GenModel, run_generate
from lrft.export.merge import merge_run
from lrft.model.load import byte_tokenizer
from lrft.model.loss import chunkable_head, softcap
from lrft.train import train

COMMON = dict(
    vocab_size=261, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=1, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)  # fmt: skip
FAMILIES = {
    "gemma3_text": dict(
        head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
        final_logit_softcapping=30.0, tie_word_embeddings=True, query_pre_attn_scalar=16,
    ),
    "qwen2": dict(tie_word_embeddings=False),
    "qwen3": dict(head_dim=16, tie_word_embeddings=True),
    "llama": dict(
        rope_scaling=dict(
            rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=64,
        ),
    ),
}  # fmt: skip


def checkpoint(folder: Path, family: str) -> Path:
    torch.manual_seed(0)
    config = AutoConfig.for_model(family, **COMMON, **FAMILIES[family])
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tok = byte_tokenizer("llama")
    tok.chat_template = CHATML
    tok.save_pretrained(folder)
    return folder


def chats(path: Path) -> Path:
    words = ["cat", "dog", "sun", "map", "sea", "fox"]
    rows = [
        {"messages": [{"role": "user", "content": f"Shout {w}"}, {"role": "assistant", "content": w.upper()}]}
        for w in words * 3
    ]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_trains_evaluates_merges_and_generates(family, tmp_path):
    model = checkpoint(tmp_path / family, family)
    loaded = AutoModelForCausalLM.from_pretrained(model)
    assert chunkable_head(loaded) is not None  # the chunked loss applies, not the plain fallback
    assert softcap(loaded) == FAMILIES[family].get("final_logit_softcapping")
    run_dir = tmp_path / "run"
    overrides = [
        "model=hf", f"model.name_or_path={model}", "method=lora_fa", "dataset=chat",
        f"dataset.data_files.train={chats(tmp_path / 'chats.jsonl')}", "dataset.eval_holdout=2",
        "trainer.max_steps=3", "trainer.batch_size=4", "trainer.loss_chunk=16", "optimizer.lr=5e-3",
        "trainer.progress=false", f"output_dir={run_dir}",
    ]  # fmt: skip
    torch.set_num_threads(1)
    train(compose(overrides), run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["eval"]["n"] == 2 and torch.isfinite(torch.tensor(summary["eval"]["loss"]))
    merged = tmp_path / "merged"
    record = merge_run(run_dir, merged)
    assert record["verified"] and record["max_logit_diff"] <= record["tolerance"]
    from_run = run_generate(GenerateConfig(checkpoint=str(run_dir), prompt="Shout cat", max_new_tokens=6))
    from_merged = run_generate(
        GenerateConfig(model=GenModel(name_or_path=str(merged)), prompt="Shout cat", max_new_tokens=6)
    )
    assert from_run[0]["response"] == from_merged[0]["response"]
