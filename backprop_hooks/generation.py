r"""A language model's answer explained: ``bh.explain_generation``.

The answer ``a_1 … a_n`` to a prompt of ``P`` tokens is read in one teacher-forced forward pass over prompt +
answer (no KV cache: relevance must reach the prompt). The logits ``y_j`` at column ``P + j − 1`` predict
answer token ``a_j``, and step ``j``'s target is any target of the framework with ``t = a_j``: its seed ``v_j``
sits on ``y_j`` (``log_softmax``: ``e_{a_j} − p_j``; ``weighted``: "``a_j`` and not the rest of the
vocabulary"). The model is causal and the methods here are linear in the seed, so

* ``total`` (B, P + n), the whole answer's target ``Σ_j f_j`` (for ``log_softmax``: ``log p(answer)``), is one
  backward pass of the summed seeds ``Σ_j v_j``;
* ``matrix`` (B, n, P + n), row ``j`` = step ``j``'s target over every token before it (exactly zero from
  column ``P + j`` on), is ``n`` further backward passes through the same graph (``retain_graph``), or one
  with ``batch_steps=True`` (``is_grads_batched``); for linear methods and ``reduce="sum"``,
  ``total == matrix.sum(1)``.

Row ``j`` equals :func:`backprop_hooks.explain_text` on the prefix ``prompt + a_1 … a_{j−1}`` with class
``a_j``: the same numbers, without ``n`` forward passes of growing prefixes.

A foil answer ``f_1 … f_m`` (``foil_ids``) is teacher-forced in its own context, as a second sequence of the same
batch: ``total`` is then the attribution of ``Σ_j f(a_j) − Σ_k f(f_k)`` (``log p(answer) − log p(foil)``)
over the shared prompt (and of the answer's own part over the answer's tokens), ``foil_total`` the foil's
negated part over its own sequence, ``foil_matrix`` its steps. See :mod:`backprop_hooks.generation_inputs`
for the layout, padding and tokenisation.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Dict, Optional

import torch
from torch import nn

from . import causal, runtime
from . import methods as _methods
from . import targets as _targets
from .answer import AnswerExplanation
from .attach import attach
from .errors import InputError, ModelError, NonFiniteLogitsError, NonLinearContrastWarning, OptionError, choices
from .generation_inputs import (
    Layout,
    as_batch,
    encode_continuations,
    encode_prompts,
    eos_ids,
    generate,
    layout,
    pad_id,
    tensor_rows,
)
from .methods.base import grad, several_seeds
from .module_weights import input_device, is_quantized_linear
from .methods.gradient import _chunks, _ManyPoints
from .precision import accumulation_dtype, widen
from .token_checks import check_length, check_rows_vocabulary, check_token_count
from .text import TextModel, default_reduce, embeddings, ig_baseline, reduce_hidden, warn_norm
from .validate import check_classes, check_model

GENERATION_METHODS = ("gradient", "input_x_gradient", "smoothgrad", "integrated_gradients", "attnlrp")
GENERATION_KEYWORDS = ("answer_ids", "target", "foil_ids", "attention_mask", "per_step", "tokenizer", "reduce")


def explain_generation(
    model: nn.Module,
    input_ids: Any,
    answer_ids: Any = None,
    *,
    method: str = "input_x_gradient",
    target: Any = "log_softmax",
    foil_ids: Any = None,
    attention_mask: Optional[torch.Tensor] = None,
    per_step: bool = True,
    tokenizer: Any = None,
    chat: bool = False,
    max_new_tokens: int = 20,
    reduce: Optional[str] = None,
    batch_steps: bool = False,
    model_kwargs: Optional[Dict[str, Any]] = None,
    generate_kwargs: Optional[Dict[str, Any]] = None,
    **options: Any,
) -> AnswerExplanation:
    """Explain a causal language model's answer to a prompt (see the module docstring).

    ``input_ids``: the prompts, (B, P) token ids (``attention_mask`` marks their padding, left or right), or a
    string / list of strings with ``tokenizer=`` (a Hugging Face tokenizer; ``chat=True`` applies its chat
    template). ``answer_ids``: the answer to explain, (B, n) / (n,) ids, a list of id lists, or strings; None
    generates it first (greedy, ``max_new_tokens``, the KV cache on; ``generate_kwargs`` go to ``generate``),
    then explains it without the cache. ``foil_ids``: another answer of any length, scored in its own context.
    ``target``: any target per step (default ``log_softmax``: the answer's log-probability); a per-step foil token
    is ``bh.targets.Versus(ids)`` with ids (B, n). ``per_step=False`` computes ``total`` alone (one backward).
    ``reduce``: over the hidden size, as in :func:`backprop_hooks.explain_text`. ``options`` go to the method.
    """
    if method not in GENERATION_METHODS:
        raise OptionError(f"explain_generation has no method {method!r}; accepted: {choices(GENERATION_METHODS)}")
    check_model(model)
    _check_decoder_only(model)
    _methods.get(method).check_options(options, GENERATION_KEYWORDS, "bh.explain_generation")
    reduce = default_reduce(method, reduce)
    target = _targets.get(target)
    prompts, answers, foils = _rows(model, input_ids, answer_ids, foil_ids, attention_mask, tokenizer, chat)
    emb = embeddings(model)
    for rows, what in ((prompts, "input_ids"), (answers, "answer_ids"), (foils, "foil_ids")):
        check_rows_vocabulary(rows or [], emb, what)  # before generate, which would fail on them untyped
    if answers is None:
        check_token_count(max(len(p) for p in prompts), model)  # the prompts, before generate
        answers = generate(
            model,
            prompts,
            pad_id(model, tokenizer),
            eos_ids(model, tokenizer),
            max_new_tokens,
            **(generate_kwargs or {}),
        )
        check_rows_vocabulary(answers, emb, "the generated answer")  # a head wider than the embedding
    lay = layout(prompts, answers + (foils or []), pad_id(model, tokenizer), input_device(emb))
    check_length(lay.ids, model)
    with runtime.explaining(model):
        with causal.nan_from_padding(lay.mask, "explain these prompts one at a time (prompts are padded on the left)"):
            parts = _explain(model, emb, lay, method, target, per_step, reduce, batch_steps, model_kwargs, options)
    total, matrix, logits_parts, linear = parts
    if target.contrastive and not linear:
        if reduce != "sum":
            warn_norm(reduce, target, stacklevel=3)
        else:
            warnings.warn(
                f"method {method!r} is not linear in the seed here: the {target.name!r} explanation is the "
                "back-propagated contrast seed, and total is not matrix.sum(1)",
                NonLinearContrastWarning,
                stacklevel=2,
            )
    return AnswerExplanation.assemble(
        lay,
        total,
        matrix,
        *logits_parts,
        method=method,
        target=target,
        linear=linear,
        reduce=reduce,
        tokenizer=tokenizer,
    )


def _rows(model, input_ids, answer_ids, foil_ids, attention_mask, tokenizer, chat):
    """(prompt rows, answer rows or None, foil rows or None) from tensors, id lists or strings."""
    if tokenizer is not None and _is_text(input_ids):
        prompts, texts, special = encode_prompts(tokenizer, input_ids, chat)

        def continuation(value, what):
            if value is None:
                return None
            if _is_text(value):
                return encode_continuations(tokenizer, texts, prompts, value, special, what)
            return as_batch(tensor_rows(value, None, what), len(prompts), what)

        return prompts, continuation(answer_ids, "answer"), continuation(foil_ids, "foil")
    if _is_text(input_ids):
        raise InputError("the prompt is a string: pass tokenizer= (a Hugging Face tokenizer) to encode it")
    if chat:
        raise OptionError("chat=True needs the prompt as a string and tokenizer=")
    prompts = tensor_rows(input_ids, attention_mask, "input_ids")
    answers = (
        None
        if answer_ids is None
        else as_batch(tensor_rows(answer_ids, None, "answer_ids"), len(prompts), "answer_ids")
    )
    foils = None if foil_ids is None else as_batch(tensor_rows(foil_ids, None, "foil_ids"), len(prompts), "foil_ids")
    return prompts, answers, foils


def _check_decoder_only(model: nn.Module) -> None:
    """A :class:`ModelError` for a Hugging Face model (one with a ``config``) that is no decoder-only causal language
    model; a model of your own is taken at its word."""
    name, config = type(model).__name__, getattr(model, "config", None)
    if config is None:
        return
    if getattr(config, "is_encoder_decoder", False):
        raise ModelError(
            f"explain_generation explains decoder-only causal language models; {name} is an encoder-decoder (its "
            "answer is read by a decoder from the encoder's output, not continued from the prompt)"
        )
    if not causal.is_causal(model):
        raise ModelError(
            f"explain_generation explains causal language models (decoder-only, e.g. GPT-2, Llama); {name} does not "
            "declare causal attention: for a classifier or an encoder use bh.explain_text"
        )


def _is_text(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, (list, tuple)) and bool(value) and isinstance(value[0], str))


def _model_kwargs(model: nn.Module, lay: Layout, given: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """Positions each row has alone, no KV cache, and only the logits the steps read (``logits_to_keep``)."""
    kwargs = dict(given or {})
    if causal.takes(model, "position_ids"):
        kwargs.setdefault("position_ids", lay.positions)
    if causal.takes(model, "use_cache"):
        kwargs.setdefault("use_cache", False)
    head = getattr(model, "get_output_embeddings", lambda: None)()
    if causal.takes(model, "logits_to_keep") and not (isinstance(head, nn.Module) and is_quantized_linear(head)):
        kwargs.setdefault("logits_to_keep", lay.continuation + 1)  # (a quantised head's backward wants all rows)
    return kwargs


def step_logits(output: Any, continuation: int) -> torch.Tensor:
    """(R, c, V): the logits at columns ``P − 1 … P + c − 2``, which predict the ``c`` continuation tokens (the last
    ``c + 1`` columns but the final one, whether the model kept every column or only those)."""
    logits = causal.sequence_logits(output)
    return logits[:, -(continuation + 1) : -1]


def step_seeds(target: _targets.Target, logits: torch.Tensor, steps: torch.Tensor, step_mask: torch.Tensor):
    """``(seeds (R, c, V), probabilities (R, c), potentials (R, c))`` of every step's target (``target`` already
    spread over the steps, see :func:`per_step_target`), zero at padded steps."""
    rows, c, vocab = logits.shape
    _check_finite(logits, step_mask)
    flat = widen(logits).reshape(rows * c, vocab)  # float32 for a half-precision model
    real = step_mask.reshape(-1).bool()
    classes = check_classes(steps.reshape(-1), flat, what="answer token")
    seeds = target.seed(flat, classes) * real[:, None].to(flat.dtype)
    probabilities = flat.log_softmax(dim=1).gather(1, classes[:, None]).squeeze(1).exp() * real
    try:
        potentials = target.potential(flat, classes) * real
    except NotImplementedError:
        potentials = torch.full_like(probabilities, float("nan"))
    return seeds.view(rows, c, vocab), probabilities.view(rows, c), potentials.view(rows, c)


def _check_finite(logits: torch.Tensor, step_mask: torch.Tensor) -> None:
    """A :class:`NonFiniteLogitsError` naming the sequences and steps whose logits hold NaN or Inf (one host sync)."""
    bad = ~torch.isfinite(logits).all(dim=2) & step_mask.bool()
    if bool(bad.any()):
        rows, steps = (sorted(set(v.tolist())) for v in bad.nonzero().unbind(1))
        raise NonFiniteLogitsError(
            f"the model's logits are NaN or Inf at answer steps {steps[:10]} of sequences {rows[:10]} (answers first, "
            "then foils): check the model's weights and the input's dtype (float16 overflows past 65504)"
        )


def per_step_target(target: _targets.Target, lay: Layout, vocab: int, copies: int = 1) -> _targets.Target:
    """``target`` for the (copies·R·c,) flattened steps: a ``Versus`` with one foil token per answer step, (B, n),
    spread over the steps (padded steps get a token other than the answer's); other targets as they are."""
    target.check(vocab)
    if not isinstance(target, _targets.Versus) or not isinstance(target.other, torch.Tensor):
        return target
    other = target.other.to(lay.steps.device)
    if other.dim() == 0:
        return target
    rows, c = lay.steps.shape
    if rows != lay.answers or other.dim() != 2 or other.shape[0] != rows or other.shape[1] > c:
        raise OptionError(
            f"a per-step Versus needs one foil token per answer step, shape ({lay.answers}, n) with n <= {c}, and no "
            f"foil_ids; got {tuple(other.shape)}"
        )
    full = (lay.steps + 1) % vocab
    n = other.shape[1]
    full[:, :n] = torch.where(lay.step_mask[:, :n].bool(), other, full[:, :n])
    return _targets.Versus(full.reshape(-1).repeat(copies))


def _explain(model, emb, lay, method, target, per_step, reduce, batch_steps, model_kwargs, options):
    with torch.no_grad():
        embeds = emb(lay.ids)
    if method == "integrated_gradients":
        options["baseline"] = ig_baseline(model, emb, embeds, options.get("baseline"))
    wrapped = TextModel(model, lay.mask, _model_kwargs(model, lay, model_kwargs))
    explainer = _methods.create(method, wrapped, **options)
    with explainer.session(None):
        x, target = explainer.prepare(embeds, target)
        spec = explainer.rules(x)
        explainer.run = explainer.runner(spec)
        with attach(explainer.model, spec) as handle:
            if isinstance(explainer, _ManyPoints):
                total, matrix, parts = _many_points(explainer, x, lay, target, per_step)
            else:
                total, matrix, parts = _one_point(explainer, x, lay, target, per_step, batch_steps)
            linear = explainer.linear and handle.linear
    mask = lay.mask.to(total.dtype)
    total = reduce_hidden(total, reduce) * mask
    matrix = None if matrix is None else reduce_hidden(matrix, reduce) * mask
    return total, matrix, parts, linear and reduce == "sum"


def _signs(lay: Layout, like: torch.Tensor) -> torch.Tensor:
    """(R, 1, 1): +1 for answer rows, −1 for foil rows (the contrast subtracts the foil's targets)."""
    sign = torch.ones(lay.ids.shape[0], 1, 1, dtype=like.dtype, device=like.device)
    sign[lay.answers :] = -1
    return sign


def _step(seeds: torch.Tensor, j: int) -> torch.Tensor:
    """The seeds of step ``j`` alone."""
    only = torch.zeros_like(seeds)
    only[:, j] = seeds[:, j]
    return only


def _one_point(explainer, x, lay, target, per_step, batch_steps):
    xg = x.detach().requires_grad_(True)
    logits = step_logits(explainer.model_output(xg), lay.continuation)
    step_target = per_step_target(target, lay, logits.shape[-1])
    seeds, probabilities, potentials = step_seeds(step_target, logits.detach(), lay.steps, lay.step_mask)
    retain = several_seeds(batched=False) if per_step else contextlib.nullcontext()
    with retain:
        total = explainer.attribute(xg, logits, seeds * _signs(lay, seeds))
    matrix = None
    if per_step and batch_steps:
        stacked = torch.stack([_step(seeds, j) for j in range(lay.continuation)])
        try:
            with several_seeds(batched=True):
                matrix = explainer.attribute(xg, logits, stacked)
        except RuntimeError as exc:
            raise OptionError(
                f"batch_steps=True: this model and method do not take batched seeds ({exc}); use batch_steps=False"
            ) from exc
    elif per_step:
        with several_seeds():
            matrix = torch.stack([explainer.attribute(xg, logits, _step(seeds, j)) for j in range(lay.continuation)])
    return total, matrix, (probabilities, potentials)


def _many_points(explainer, x, lay, target, per_step):
    """SmoothGrad / Integrated Gradients: the seeds at the explained input (or at each point, ``pointwise``), the
    points stacked in chunks as in the methods themselves, one forward per chunk and a backward per step."""
    rows = x.shape[0]
    with torch.no_grad():
        logits = step_logits(explainer.model_output(x), lay.continuation)
    step_target = per_step_target(target, lay, logits.shape[-1])
    seeds, probabilities, potentials = step_seeds(step_target, logits, lay.steps, lay.step_mask)
    explainer.begin(x)
    k_total = explainer.num_points()
    per_chunk = k_total if explainer.internal_batch_size is None else max(1, explainer.internal_batch_size // rows)
    dtype = accumulation_dtype(x.dtype)  # float32 for a half-precision model
    total = torch.zeros_like(x, dtype=dtype)
    matrix = torch.zeros(lay.continuation, *x.shape, dtype=dtype, device=x.device) if per_step else None
    signs = _signs(lay, seeds)
    for start, k in _chunks(k_total, per_chunk):
        xs = explainer.points(x, start, k).to(x.dtype).reshape(k * rows, *x.shape[1:]).detach().requires_grad_(True)
        logits = step_logits(explainer.model_output(xs), lay.continuation)
        if explainer.pointwise:  # the seeds at each point: SmoothGrad / IG of the steps' potentials
            each = per_step_target(target, lay, logits.shape[-1], copies=k)
            s = step_seeds(each, logits.detach(), lay.steps.repeat(k, 1), lay.step_mask.repeat(k, 1))[0]
        else:
            s = seeds.repeat(k, 1, 1)
        with several_seeds() if per_step else contextlib.nullcontext():
            g = grad(logits, xs, s * signs.repeat(k, 1, 1))
            total = total + explainer.combine(x, g.view(k, *x.shape), start)
            for j in range(lay.continuation if per_step else 0):
                g = grad(logits, xs, _step(s, j))
                matrix[j] += explainer.combine(x, g.view(k, *x.shape), start)
    return total, matrix, (probabilities, potentials)
