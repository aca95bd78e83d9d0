"""The GPU check, on CPU: the exact device command (``bash scripts/gpu_check.sh --wheels wheels``)
with ``--tiny`` and ``OUT`` set to a temp dir, and the wheel list the device needs.

The report must have one row per configuration, each with numbers (or an explicit ``error:``
reason), so a GPU session runs a script whose every section has already run somewhere.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, requires
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NUMBER = re.compile(r"^[\d,]+(\.\d+)?")
WHEELS = ROOT / "wheels"

TRAIN_ROWS = [
    "lrft lora_fa", "lrft lora", "PEFT LoRA", "PEFT LoRA, A frozen", "lrft lora_fa, eager dropout kernel",
    "lrft QLoRA-FA (nf4 base)",
]  # fmt: skip
INIT_ROWS = ["PiSSA, randomized SVD", "LoRA-GA"]

# The device image's Python packages ('cuda' image, .library/device/KINDS.md as read 2026-11-17)
IMAGE_NAMES = """
    absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch
    build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-
    bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops
    equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch
    grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio iniconfig
    interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-
    loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py
    markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-
    extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-ml-py onnx onnx-ir
    onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-
    checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client
    propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-
    extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-
    dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core
    scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham
    simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server
    tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq
    torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer typing-extensions
    typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
"""
IMAGE = set(IMAGE_NAMES.split())


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_list() -> dict[str, tuple[str, str]]:
    """{distribution: (pinned version, module)} of scripts/gpu_wheels.txt."""
    out = {}
    for line in (ROOT / "scripts" / "gpu_wheels.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            spec, module = line.split()[:2]
            dist, version = spec.split("==")
            out[norm(dist)] = (version, module)
    return out


def rows(md: str, section: str) -> dict[str, list[str]]:
    """{first cell: other cells} of the table under the heading starting with ``section``."""
    block = md.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in block.splitlines() if ln.startswith("|")][2:]  # header, separator
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    return {c[0]: c[1:] for c in cells}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, float]:
    """The device command itself, on CPU: (report under $OUT, its stdout, seconds)."""
    out = tmp_path_factory.mktemp("out")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "OUT": str(out)}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # python3: this one
    env["GPU_CHECK_SITE"] = str(out / "site")  # nothing to install here; never the device's folder
    docs = (ROOT / "docs" / "gpu.md").stat().st_mtime_ns
    start = time.monotonic()
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--wheels", "wheels", "--tiny"],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )  # fmt: skip
    seconds = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (ROOT / "docs" / "gpu.md").stat().st_mtime_ns == docs  # $OUT set: docs/gpu.md untouched
    return (out / "gpu.md").read_text(), proc.stdout, seconds


def test_report_is_under_out_and_printed(run: tuple[str, str, float]) -> None:
    report, stdout, seconds = run
    assert "CPU smoke run (no GPU was lent to this session)" in report
    assert "bash scripts/gpu_check.sh --wheels wheels" in report
    assert "Unfinished" not in report and "error:" not in report, report
    # every table printed to stdout as its rows came in; the last print of each is the final table
    headings = ["Environment", "Training step", "`lrft memory`", "The production step", "Data-aware"]
    for heading in [*headings, "fp16", "Through `lrft.train.train`", "Dropout"]:
        printed = stdout.split(f"## {heading}")
        assert len(printed) > 1, heading
        assert rows(f"## {heading}" + printed[-1], "") == rows(report, heading), heading
    print(f"device command --tiny: {seconds:.1f} s")


def test_environment_rows(run: tuple[str, str, float]) -> None:
    env = rows(run[0], "Environment")
    assert list(env) == ["device", "python / torch / CUDA", "packages", "lrft imports", "matmul peak"]
    assert env["lrft imports"][0].startswith("ok")
    assert "TFLOP/s" in env["matmul peak"][0]


def test_training_rows_have_speed_and_prediction(run: tuple[str, str, float]) -> None:
    report = run[0]
    table = rows(report, "Training step")
    assert list(table) == TRAIN_ROWS  # QLoRA last: its section runs last
    for label, (trainable, ms, tps, peak) in table.items():
        for cell in (trainable, ms, tps):
            value = NUMBER.match(cell)
            assert value and float(value.group().replace(",", "")) > 0, (label, cell)
        assert peak == "n/a (CPU)"
    planner = rows(report, "`lrft memory`")
    assert list(planner) == ["lrft lora_fa", "lrft lora", "lrft QLoRA-FA (nf4 base)"]
    for label, (_measured, predicted, _ratio) in planner.items():
        assert NUMBER.match(predicted) and float(NUMBER.match(predicted).group()) > 0, (label, predicted)
    # LoRA-FA trains only B: fewer trainable parameters than LoRA, the same as PEFT with A frozen
    n = {k: float(v[0].rstrip("M")) for k, v in table.items()}
    assert n["lrft lora_fa"] < n["lrft lora"] == n["PEFT LoRA"]
    assert n["lrft lora_fa"] == n["PEFT LoRA, A frozen"] == n["lrft QLoRA-FA (nf4 base)"]
    assert n["lrft lora_fa"] == n["lrft lora_fa, eager dropout kernel"]


def test_dropout_mask_rows(run: tuple[str, str, float]) -> None:
    table = rows(run[0], "Dropout masks")
    labels = [k.split(" [")[0] for k in table]
    assert labels == [
        "lrft hash, eager (~15 ops)", "lrft hash, fused (one compiled kernel)", "torch.nn.functional.dropout",
        "fused, more than 2^22 (--tiny) elements",
    ]  # fmt: skip
    *timed, (_, huge) = table.items()
    for label, (ms, equal, ran, keep) in timed:
        assert NUMBER.match(ms) and float(ms) > 0, (label, ms)
        assert equal == ("True" if "fused" in label else "-"), (label, equal)
        # the fused row says the compiled kernel made its masks (a silent eager fallback would not)
        assert ran == ("fused (22 masks)" if "fused" in label else "-"), (label, ran)
        assert abs(float(keep.split()[0]) - 0.95) < 0.01, (label, keep)
    _ms, equal, ran, keep = huge
    assert equal == "True" and ran == "fused (1 masks)", huge
    assert "past element 4,194,304" in keep and abs(float(keep.split()[0]) - 0.95) < 0.02, keep


def test_production_rows(run: tuple[str, str, float]) -> None:
    """lrft's real step under bf16 autocast on packed batches: every row has its numbers, the lrft
    rows a prediction, and checkpointing lowers the prediction."""
    table = rows(run[0], "The production step")
    labels = ["lrft lora_fa", "lrft lora", "PEFT LoRA"]
    assert list(table) == labels + [f"{x}, checkpointed" for x in labels]
    for label, (ckpt, ms, tps, peak, predicted, _ratio, mfu, syncs) in table.items():
        assert syncs == "n/a (CPU)"  # CUDA's sync debug mode: the GPU run counts them
        assert ckpt == ("every block" if "checkpointed" in label else "off"), label
        for cell in (ms, tps):
            assert float(NUMBER.match(cell).group().replace(",", "")) > 0, (label, cell)
        assert peak == "n/a (CPU)"
        assert re.match(r"^[\d.]+% \(", mfu), (label, mfu)
        assert (predicted == "-") == label.startswith("PEFT"), (label, predicted)
    mib = {k: float(v[4].split()[0]) for k, v in table.items() if k.startswith("lrft")}
    assert mib["lrft lora_fa, checkpointed"] < mib["lrft lora_fa"] < mib["lrft lora"]


def test_loop_rows_resume_and_quantized_inits(run: tuple[str, str, float]) -> None:
    table = rows(run[0], "Through `lrft.train.train`")
    assert list(table) == ["lora_fa, save every 2 steps and resume"] + [
        f"{m} on a {q} base" for m in ("pissa", "lora_ga") for q in ("nf4", "int8")
    ]
    (resumed, *quantized) = table.values()
    assert resumed[0] == "4 (resumed at 2: 4)"
    assert resumed[4] == "max abs diff of the final adapters 0 (bit-identical)", resumed  # CPU: exact
    for steps, loss, _seconds, device, check in quantized:
        assert steps == "3" and float(loss) > 0 and device == "cpu"
        assert check == "finite loss, no skipped step"


def test_packed_batch_and_useful_flops() -> None:
    """The production rows' batch is full rows of several documents each (no padding), and the
    FLOPs count gives a trainable matmul weight 6 FLOPs per element per token, a frozen one 4."""
    g = gpu_check()
    from transformers import AutoConfig, AutoModelForCausalLM

    batch = g.gpu_train.packed_batch(vocab=261, rows=3, length=64)
    assert batch["input_ids"].shape == (3, 64) and "attention_mask" not in batch
    starts = batch["position_ids"] == 0
    assert (starts.sum(1) >= 2).all() and starts[:, 0].all()  # several documents per row
    assert ((batch["labels"] == -100) == starts).all()  # only a document's first token has no label
    shapes = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)
    config = AutoConfig.for_model("llama", vocab_size=261, num_hidden_layers=2, **shapes)
    model = AutoModelForCausalLM.from_config(config).requires_grad_(False)
    frozen = g.gpu_train.flops_per_token(model, batch)
    model.model.layers[0].mlp.down_proj.weight.requires_grad_(True)
    assert g.gpu_train.flops_per_token(model, batch) - frozen == 2 * 32 * 64
    matmuls = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n)
    mean_keys = (batch["position_ids"].float() + 1).mean().item()
    assert frozen == 4 * matmuls + 12 * 2 * 32 * mean_keys


def test_init_and_fp16_rows(run: tuple[str, str, float]) -> None:
    inits = rows(run[0], "Data-aware inits")
    assert [next(k for k in inits if k.startswith(p)) for p in INIT_ROWS]
    for label, (seconds, layers, *_rest) in inits.items():
        assert NUMBER.match(seconds), (label, seconds)
        assert int(layers) == 14  # 2 layers x 7 projections of tiny_llama
    ((label, fp16),) = rows(run[0], "fp16").items()
    steps, overflow, scales = fp16[:3]
    assert int(steps) == 3 and int(overflow) >= 0
    assert float(scales.split(",")[-1]) > 0, scales


def gpu_check():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    return gpu_check


def test_a_failing_row_is_written_not_raised() -> None:
    g = gpu_check()

    def boom() -> dict[str, str]:
        raise RuntimeError("CUDA error: an illegal memory access | tried 2 GiB")

    failed = g.guarded(boom)
    assert failed["status"].startswith("error: RuntimeError: CUDA error")
    assert g.sticky(failed)  # the section's process ends after it; a fresh one goes on
    md = g.table([("a", failed), ("b", {"x": "1"})], ["x", "y"])
    lines = md.splitlines()
    assert all(ln.count("|") == 4 for ln in lines[2:]), md  # a "|" in a reason cannot break the table
    assert lines[3] == "| b | 1 |  |"


def test_a_crashed_or_hung_section_costs_only_its_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A row that kills its process gets an error row and the section goes on after it, in a new
    process; a row that hangs is killed at the section's limit, the rows after it read "not run"."""
    g = gpu_check()

    def crash() -> dict:
        os._exit(7)

    def hang() -> dict:
        time.sleep(60)
        return {}

    plans = {
        "crashy": [
            ("steps", "a", lambda: {"trainable": "1"}), ("steps", "b", crash), ("steps", "c", lambda: {})
        ],
        "hangs": [("inits", "d", hang), ("inits", "e", lambda: {})],
    }  # fmt: skip
    monkeypatch.setattr(g, "plan", lambda check, section, results: plans[section])
    args = argparse.Namespace(tiny=True, r=8, batch=2, length=8, warmup=1, steps=1, ga_batches=1)
    report = g.Report(args, tmp_path / "gpu.md", cuda=False)
    g.supervise(args, report, "crashy", 60, tmp_path / "r.json")
    start = time.monotonic()
    g.supervise(args, report, "hangs", 3, tmp_path / "r.json")
    assert time.monotonic() - start < 20
    assert report.rows["steps"]["a"] == {"trainable": "1"}
    assert report.rows["steps"]["b"]["status"] == "error: process exit 7"
    assert report.rows["steps"]["c"] == {}
    assert report.rows["steps"]["d"]["status"].startswith("error: timed out after 3 s")
    assert report.rows["steps"]["e"]["status"].startswith("error: not run: timed out")
    md = (tmp_path / "gpu.md").read_text()
    assert "| b | error: process exit 7 |" in md and "Unfinished" in md
    assert "| b | error: process exit 7 |" in capsys.readouterr().out  # printed at once


def closure(names: list[str]) -> set[str]:
    """Distributions lrft needs at run time beyond the image: ``names`` not in IMAGE, with their own
    requirements (as installed here, markers evaluated, extras skipped) not in IMAGE, recursively."""
    from packaging.requirements import Requirement

    need: set[str] = set()
    todo = [norm(n) for n in names]
    while todo:
        name = todo.pop()
        if name in IMAGE or name in need:
            continue
        need.add(name)
        try:
            reqs = requires(name) or []
        except PackageNotFoundError:
            continue  # not installed here: its own requirements cannot be read (the wheel test does)
        for text in reqs:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": "", "python_version": "3.12"}):
                todo.append(norm(req.name))
    return need


def test_wheel_list_names_every_runtime_dependency_the_image_lacks() -> None:
    """Downloads nothing: pyproject.toml's dependencies minus the image's packages, with their own
    dependencies, are exactly the wheel list (nothing missing, nothing the image already has)."""
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    need = closure([Requirement(d).name for d in deps])
    listed = wheel_list()
    assert need == set(listed), f"missing {need - set(listed)}, not needed {set(listed) - need}"
    assert not set(listed) & IMAGE


@pytest.mark.skipif(not WHEELS.is_dir(), reason="wheels/ not built here (docs/gpu.md says how)")
def test_carried_wheels_install_offline_into_an_empty_target(tmp_path: Path) -> None:
    """What the device does, from wheels/ alone (--no-index): every listed wheel installs into an
    empty --target (for the image's Python 3.12), and lrft's config and loop import from there."""
    target = tmp_path / "site"
    specs = [f"{d}=={v}" for d, (v, _m) in wheel_list().items()]
    plat = ["--platform", "manylinux_2_24_x86_64", "--platform", "manylinux2014_x86_64"]
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
    cmd += ["--find-links", str(WHEELS), "--target", str(target), "--only-binary=:all:"]
    cmd += ["--python-version", "3.12", "--implementation", "cp", *plat, *specs]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    modules = [m for _v, m in wheel_list().values() if m != "multiprocess"]  # its wheel is py312-only
    probe = (
        f"import sys; sys.path[:0] = [{str(target)!r}, {str(ROOT)!r}]\n"
        f"import importlib\nfor m in {modules!r}:\n"
        f"    f = importlib.import_module(m).__file__\n"
        f"    assert f.startswith({str(target)!r}), (m, f)\n"
        "import lrft.config.compose, lrft.train\nprint('ok')"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
