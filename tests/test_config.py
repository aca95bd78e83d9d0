"""The real configs compose, every option of every group; bad keys fail with did-you-mean."""

import subprocess
import sys

import pytest
import yaml

from lrft.cli.main import main
from lrft.cli.train import expand_sweeps
from lrft.config.compose import compose, config_dir, group_options
from lrft.errors import UserError
from lrft.schema import GROUPS

DATASET_FOR = {"classification": "glue/sst2", "seq2seq": "glue/sst2", "causal": "quickstart"}
MODEL_FOR = {"glue": "tiny_roberta", "instruction": "tiny_llama", "chat": "tiny_llama"}


def test_groups_have_the_required_options():
    assert {"full", "lora", "lora_fa"} <= set(group_options("method"))
    assert {
        "roberta_base",
        "roberta_large",
        "t5_base",
        "t5_large",
        "llama7b",
        "llama13b",
        "tiny_roberta",
        "tiny_t5",
        "tiny_llama",
    } <= set(group_options("model"))
    glue = {f"glue/{t}" for t in ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte")}
    assert glue | {"alpaca", "quickstart"} <= set(group_options("dataset"))
    assert {"adamw", "sgd"} <= set(group_options("optimizer"))
    assert "none" in group_options("quantization")


@pytest.mark.parametrize(("group", "option"), [(g, o) for g in GROUPS for o in group_options(g)])
def test_every_option_composes(group, option):
    overrides = [f"{group}={option}"]
    if group == "model" and option == "hf":  # everything comes from the checkpoint: tests/test_hf_chat.py
        with pytest.raises(UserError, match=r"set model.name_or_path"):
            compose(overrides)
        return
    if group == "model":
        task = yaml.safe_load((config_dir() / "model" / f"{option}.yaml").read_text())["task"]
        overrides.append(f"dataset={DATASET_FOR[task]}")
    if group == "optimizer" and option.startswith("galore"):
        overrides.append("method=galore")  # GaLore's optimizers project GaLore's weights only
    if group == "dataset" and option == "mmlu":  # evaluation only: composed by `lrft eval`
        assert compose([*overrides, "model=tiny_llama"], "eval").dataset.kind == "mmlu"
        with pytest.raises(UserError, match="cannot train on dataset"):
            compose([*overrides, "model=tiny_llama"])
        return
    if group == "dataset":
        kind = "glue" if option.startswith("glue/") else "chat" if option == "chat" else "instruction"
        overrides.append(f"model={MODEL_FOR[kind]}")
    if (group, option) == ("dataset", "preference") or (group == "objective" and option != "sft"):
        # pairs and a preference objective come together (either alone is refused: test_preference.py)
        overrides += ["model=tiny_llama", "dataset=preference", "dataset.data_files.train=p.jsonl"]
        overrides += [] if group == "objective" else ["objective=dpo"]
    cfg = compose(overrides)
    assert cfg[group].name
    assert cfg.output_dir


def test_real_models_keep_their_hub_ids_and_local_override():
    cfg = compose(["method=lora_fa", "model=llama7b"])
    assert cfg.model.name_or_path == "huggyllama/llama-7b" and cfg.model.dtype == "bfloat16"
    cfg = compose(["model=roberta_base", "dataset=glue/mrpc", "model.name_or_path=/data/roberta"])
    assert cfg.model.name_or_path == "/data/roberta"


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["method=lora_faa"], "Unknown option 'lora_faa' for method. Did you mean: lora_fa"),
        (["trainer.max_step=3"], "Unknown config key 'trainer.max_step'. Did you mean: max_steps"),
        (["method.rr=3"], "Did you mean: r"),
        (["+method.foo=1"], "Unknown config key 'method.foo'"),
        (["+trainer.max_step=1"], "Did you mean: max_steps"),
        (["modle=tiny_t5"], "Did you mean: model"),
        (["dataset=glue/cola"], "Combinations that work"),
        (["model=tiny_roberta"], "cannot train on dataset 'quickstart'"),
        (["trainer.mixed_precision=fp8"], "trainer.mixed_precision='fp8' is not valid"),
        (["method.dropout=1.5"], "method.dropout must be in [0, 1)"),
        (["method.r=abc"], "could not be converted to Integer"),
        (["trainer.gradient_checkpointing=some"], "use false, true (every block), a number N"),
        (["trainer.gradient_checkpointing=-1"], "use false, true (every block), a number N"),
        (["trainer.memory_plan=yes"], "trainer.memory_plan='yes' is not valid"),
        (["memory.budget_gb=0"], "memory.budget_gb must be > 0"),
        (["memory.budget=3"], "Did you mean: budget_gb"),
    ],
)
def test_bad_overrides_fail_with_a_clear_message(overrides, needle):
    with pytest.raises(UserError) as err:
        compose(overrides)
    assert needle in str(err.value)


def test_sweeps_expand_to_every_combination():
    combos = expand_sweeps(["method=lora,lora_fa", "method.r=4,8", "trainer.seed=1"])
    assert len(combos) == 4 and ["method=lora", "method.r=8", "trainer.seed=1"] in combos


def test_cli_exit_code_2_and_one_message(capsys):
    assert main(["train", "method=lora_faa"]) == 2
    err = capsys.readouterr().err
    assert "lora_fa" in err and "Traceback" not in err
    assert main(["trian"]) == 2
    assert "Did you mean: train" in capsys.readouterr().err


def test_cli_help_lists_commands_and_groups(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert all(cmd in text for cmd in ("train", "eval", "merge"))
    assert main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    assert all(g in text for g in GROUPS) and "lora_fa" in text and "tiny_llama" in text


def test_cfg_job_prints_the_llama7b_config_offline(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "lrft", "train", "method=lora_fa", "model=llama7b", "--cfg", "job"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "huggyllama/llama-7b" in proc.stdout and "name: lora_fa" in proc.stdout
    assert not any(tmp_path.iterdir()), "--cfg job must not create a run folder"
