"""Summed losses of one batch; a causal LM's never holds more than one chunk of logits.

A causal LM's plain loss materialises ``[B·T, V]`` logits, a float32 copy and cross-entropy's
softmax for backward: on a 262k vocabulary at 8 × 2048 tokens that is tens of GiB, more than every
other activation together. :func:`chunked_lm_loss` instead runs the model with an empty
``logits_to_keep`` (the head projects nothing), takes the final hidden states ``h`` (B, T, d) from
the decoder body, and for each chunk of C positions computes

    z = softcap(h_c Wᵀ [+ b]),   ℓ_c = Σ_{t ∈ c, y_t ≠ ignore} ( logsumexp(z_t) − z_t[y_t] )

in float32, summed. Each chunk's gradients (∂ℓ/∂h_c, and the head's own where it trains) are
computed right there, by autograd on that chunk alone, and its logits are freed before the next
chunk (:class:`_ChunkedLinearCE`): forward and backward hold one chunk's logits at a time (about
C·V·(2 + 4 + 4) bytes under bf16: the logits, their float32 copy, the softmax gradient) and no
matmul runs twice, so the step costs what the plain one does. The head is called as the module it
is (a tied embedding, a low-rank layer, an FSDP2-sharded root): the same arithmetic in the same
dtypes, only in pieces, so loss and gradients equal the plain path's to float32 rounding.

``softcap`` is Gemma 2/3's ``final_logit_softcapping``: ``z = cap · tanh(z / cap)``. A model
whose head does more (a logit scale, a bias added in forward) or that ignores ``logits_to_keep``
gets the plain path: its logits come back full, and are used as they are.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100
DEFAULT_CHUNK = "auto"  # trainer.loss_chunk: positions per chunk, or auto (chunk_positions)
AUTO_CHUNK_VALUES = 1 << 26  # auto: a chunk's logits hold at most this many values (256 MiB f32)
AUTO_CHUNK_MAX, AUTO_CHUNK_MIN = 1024, 64
# config attributes of heads that transform logits in ways chunking does not reproduce
_OTHER_LOGIT_TRANSFORMS = ("logit_scale", "logits_scaling", "output_multiplier_scale")


def loss_count(batch: dict[str, Any], task: str) -> torch.Tensor:
    """How many terms the loss of ``batch`` sums: predicted label tokens, or examples."""
    labels = batch["labels"]
    if task == "classification":
        # on the device, without the host-to-device copy torch.tensor(int, device=cuda) makes
        return torch.full((), labels.shape[0], dtype=torch.long, device=labels.device)
    if task == "causal":  # the first position predicts nothing: labels shift left by one
        labels = labels[:, 1:]
    return (labels != IGNORE_INDEX).sum()


def loss_sum(
    model: nn.Module,
    batch: dict[str, Any],
    task: str,
    decoder_inputs: Callable | None = None,
    chunk: int = DEFAULT_CHUNK,
    upstream: torch.Tensor | None = None,
) -> torch.Tensor:
    """Summed (not averaged) float32 loss of one micro-batch.

    ``decoder_inputs(labels)`` builds a seq2seq model's decoder inputs (T5 shifts right); the
    model computes no loss of its own, so nothing is reduced twice. ``chunk`` > 0: a causal LM's
    loss in chunks of that many positions (:func:`chunked_lm_loss`); 0: from the full logits.
    ``upstream``: the gradient backward will bring to the loss (the step's token weight), if known.
    """
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if task == "causal":
        return causal_lm_loss(model, inputs, labels, chunk, upstream)
    if task == "seq2seq":
        if decoder_inputs is not None:
            inputs["decoder_input_ids"] = decoder_inputs(labels=labels)
        else:  # models that only shift labels inside forward
            inputs["labels"] = labels
    logits = model(**inputs).logits
    if task == "classification":
        if logits.shape[-1] == 1:  # regression (STS-B): squared error, as transformers' MSELoss
            return ((logits.squeeze(-1).float() - labels.float()) ** 2).sum()
        return F.cross_entropy(logits.float(), labels, reduction="sum")
    return _cross_entropy_sum(logits, labels)


def _cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    flat = logits.float().reshape(-1, logits.shape[-1])
    return F.cross_entropy(flat, labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")


def shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """Position t predicts token t+1: labels move left, the last position predicts nothing.

    Shifting the labels (not slicing the hidden states) keeps ``h`` contiguous: no copy."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def causal_lm_loss(
    model: nn.Module,
    inputs: dict[str, Any],
    labels: torch.Tensor,
    chunk: int | str,
    upstream: torch.Tensor | None = None,
) -> torch.Tensor:
    """Summed next-token loss of a causal LM: chunked where the model allows, else plain.
    ``chunk``: positions per chunk, 0 for the full logits, or ``auto`` (:func:`chunk_positions`)."""
    head = chunkable_head(model) if chunk != 0 else None
    if head is None:
        logits = model(**inputs).logits
        return _cross_entropy_sum(logits[:, :-1], labels[:, 1:])
    hidden, logits = final_hidden(model, inputs)
    if logits.shape[1] != 0:  # the model ignored logits_to_keep: use what it computed
        return _cross_entropy_sum(logits[:, :-1], labels[:, 1:])
    positions = chunk_positions(chunk, head.weight.shape[0])
    return chunked_lm_loss(hidden, shifted_labels(labels), head, softcap(model), positions, upstream)


def chunk_positions(setting: int | str, vocab: int) -> int:
    """``trainer.loss_chunk`` as positions per chunk. An int is taken as given; ``auto`` is 1024
    positions, fewer where the vocabulary is large, so that one chunk's logits stay within 2^26
    values (256 MiB in float32; the chunk's backward holds about three such buffers): 1024 up to
    a 65,536 vocabulary, 523 for Llama 3 (128,256), 256 for Gemma 3 (262,144). Measured on
    Gemma 3 270M (docs/memory.md): 1024 positions would cost 2.3 GiB more per step than 256."""
    if setting == "auto":
        return max(AUTO_CHUNK_MIN, min(AUTO_CHUNK_MAX, AUTO_CHUNK_VALUES // max(vocab, 1)))
    return int(setting)


def chunkable_head(model: nn.Module) -> nn.Module | None:
    """The output projection, where the chunked loss reproduces the model's logits exactly."""
    inner = unwrapped(model)
    try:
        params = inspect.signature(type(inner).forward).parameters
    except (TypeError, ValueError):
        return None
    get_head = getattr(inner, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    config = getattr(inner, "config", None)
    if "logits_to_keep" not in params or head is None or getattr(inner, "base_model", inner) is inner:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if any(getattr(text, k, None) not in (None, 1, 1.0) for k in _OTHER_LOGIT_TRANSFORMS):
        return None
    return head


def unwrapped(model: nn.Module) -> nn.Module:
    """The transformers model under torch.compile's and DDP's wrappers (which are called, not it)."""
    while True:
        inner = getattr(model, "_orig_mod", None) or (
            model.module if isinstance(model, nn.parallel.DistributedDataParallel) else None
        )
        if inner is None:
            return model
        model = inner


def softcap(model: nn.Module) -> float | None:
    config = getattr(unwrapped(model), "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "final_logit_softcapping", None)


def final_hidden(model: nn.Module, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` projecting no position; return the decoder body's last hidden states and the
    (empty) logits. The call goes through the whole model, so its hooks (FSDP2's) run as usual."""
    inner = unwrapped(model)
    seen: list[torch.Tensor] = []

    def grab(module: nn.Module, args: Any, out: Any) -> None:
        seen.append(out[0] if isinstance(out, tuple) else out.last_hidden_state)

    device = inputs["input_ids"].device if "input_ids" in inputs else None
    handle = inner.base_model.register_forward_hook(grab)
    try:
        logits = model(**inputs, logits_to_keep=torch.empty(0, dtype=torch.long, device=device)).logits
    finally:
        handle.remove()
    return seen[-1], logits


def _chunk_loss(
    h: torch.Tensor, y: torch.Tensor, head: nn.Module, cap: float | None, reduction: str = "sum"
) -> torch.Tensor:
    z = head(h)
    if cap is not None:  # in the head's dtype, as the model applies it
        z = torch.tanh(z / cap) * cap
    return F.cross_entropy(z.float(), y, ignore_index=IGNORE_INDEX, reduction=reduction)


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return b if a is None else a if b is None else a + b


class _ChunkedLinearCE(torch.autograd.Function):
    """Forward computes each chunk's loss AND its gradients (local autograd on the chunk), then
    frees the chunk's logits; backward only scales the stored gradients. So no chunk is computed
    twice, and what is kept is ∂ℓ/∂h (the size of ``h``) and the head's trainable gradients.

    ``upstream`` is the gradient backward is expected to bring (the step's token weight): the
    chunk gradients are computed with it, so their half-precision casts round exactly as the
    plain path's do; backward then multiplies by ``grad / upstream``, which is 1.0 when it came.
    """

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, y: torch.Tensor, upstream: torch.Tensor, chunk: int,
                head: nn.Module, cap: float | None, *params: torch.Tensor) -> torch.Tensor:  # fmt: skip
        grad_h = torch.empty_like(h)
        grads: list[torch.Tensor | None] = [None] * len(params)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        with torch.enable_grad():
            for start in range(0, h.shape[0], chunk):
                hc = h[start : start + chunk].detach().requires_grad_(True)
                loss = _chunk_loss(hc, y[start : start + chunk], head, cap)
                got = torch.autograd.grad(loss, [hc, *params], upstream, allow_unused=True)
                grad_h[start : start + chunk] = got[0]
                grads = [_add(a, g) for a, g in zip(grads, got[1:], strict=True)]
                total += loss.detach()
        ctx.save_for_backward(grad_h, upstream, *[g if g is not None else torch.empty(0) for g in grads])
        ctx.unused = [g is None for g in grads]
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_h, upstream, *grads = ctx.saved_tensors
        ratio = grad / upstream
        out = [None if unused else g * ratio for g, unused in zip(grads, ctx.unused, strict=True)]
        return (grad_h * ratio, None, None, None, None, None, *out)


def chunked_lm_loss(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    head: nn.Module,
    cap: float | None,
    chunk: int,
    upstream: torch.Tensor | None = None,
) -> torch.Tensor:
    """Σ of the cross-entropy of ``head(hidden)`` against ``labels`` (already aligned), C positions
    at a time; ``hidden`` (…, d) and ``labels`` (…) are flattened. ``upstream``: the gradient the
    loss will receive in backward, if known (see :class:`_ChunkedLinearCE`)."""
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1).to(h.device)
    params = [p for p in head.parameters() if p.requires_grad]
    if not torch.is_grad_enabled() or not (h.requires_grad or params):
        # evaluation: per-token losses, summed per row in float32 and over rows in float64, so
        # the total does not depend on how rows were batched or split over processes
        pieces = zip(h.split(chunk), y.split(chunk), strict=True)
        each = [_chunk_loss(hc, yc, head, cap, "none") for hc, yc in pieces]
        return torch.cat(each).view(labels.shape).reshape(-1, labels.shape[-1]).sum(-1).double().sum()
    if upstream is None:
        upstream = torch.ones((), dtype=torch.float32, device=h.device)
    return _ChunkedLinearCE.apply(h, y, upstream.float().reshape(()), chunk, head, cap, *params)


def _chunk_logps(h: torch.Tensor, y: torch.Tensor, head: nn.Module, cap: float | None) -> torch.Tensor:
    return -_chunk_loss(h, y, head, cap, "none")


def chunked_token_logps(
    hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module, cap: float | None, chunk: int
) -> torch.Tensor:
    """log softmax(head(h_t))[y_t] per position (0 where ``y_t`` is ignored), float32, shaped like
    ``labels``; C positions of logits at a time.

    A preference loss is not linear in these (DPO's gradient of a row's log-prob depends on the
    whole pair), so the upstream gradient is unknown in forward and :class:`_ChunkedLinearCE`'s
    trick does not apply. Each chunk is checkpointed instead: forward keeps only the (positions,)
    result, backward recomputes that chunk's logits (one more head matmul per chunk, about a
    third of the head's step cost) and frees them before the next."""
    from torch.utils.checkpoint import checkpoint

    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1).to(h.device)
    train = torch.is_grad_enabled() and (h.requires_grad or any(p.requires_grad for p in head.parameters()))
    pieces = []
    for hc, yc in zip(h.split(chunk), y.split(chunk), strict=True):
        if train:
            pieces.append(checkpoint(_chunk_logps, hc, yc, head, cap, use_reentrant=False))
        else:
            pieces.append(_chunk_logps(hc, yc, head, cap))
    return torch.cat(pieces).view(labels.shape)
