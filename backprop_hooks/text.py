r"""Token attributions for text models: ``bh.explain_text``.

A text model is explained on its input embeddings ``E`` (B, L, D): the token ids are embedded once
(``model.get_input_embeddings()``), and the model runs on ``inputs_embeds=E`` with the attention mask, so any
method of the framework sees a differentiable float input. Token scores (B, L):

* gradient family (``gradient``, ``input_x_gradient``, ``smoothgrad``, ``integrated_gradients``): the method's
  attribution over ``E`` reduced over the hidden size, ``reduce="sum"`` (signed: for ``input_x_gradient``
  ``Σ_d E_d ∂f/∂E_d``, linear in the seed; the default but for ``gradient``/``smoothgrad``) or the
  ``"l1"``/``"l2"`` norm (unsigned, not linear; ``"l2"`` is the default of ``gradient``/``smoothgrad``:
  behind a LayerNorm on the embeddings, as in BERT, the signed sum ``Σ_d ∂f/∂E_d`` vanishes identically);
  Integrated Gradients' baseline is the padding token's embedding at every position (``baseline="pad"``,
  the default when the model's config has a ``pad_token_id``) or zero embeddings (``baseline="zero"``);
* ``attnlrp``: the relevance of each token, ``Σ_d E_d ĝ_d`` with AttnLRP's modified gradient ``ĝ`` (signed,
  linear in the seed; ``reduce="sum"``, its default);
* attention methods (``rollout``, ``grad_rollout``, ``transformer_attribution``, ``vit_gradcam``): over the
  sequence, read out at one token per sample (``readout="first"``, an encoder's class token, or
  ``"last"``, the last real token, the default for causal models).

Padded positions (``attention_mask == 0``) get exactly zero, and a padded batch gives each sequence the
scores it gets alone. A causal language model is explained at its next token by default: the logits at each
row's last real token (left or right padding alike), with the absolute positions each left-padded row has
alone (``position_ids``, see :mod:`backprop_hooks.causal`); a ``logits=`` function that reads a padding
position is refused. Every target works; on a language model's next token ``Versus(foil)`` is the
contrastive explanation of Yin & Neubig (2022), "why this token and not the foil", and ``weighted``/``max``
contrast against every other token of the vocabulary in the same single backward pass.
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, Optional

import torch
from torch import nn

from . import causal
from . import methods as _methods
from . import runtime
from . import targets as _targets
from .errors import (
    InputError,
    ModelError,
    NonLinearContrastWarning,
    OptionError,
    PaddingWarning,
    choices,
)
from .explanation import Explanation
from .api import model_class_names
from .methods.tokens import TextLayout
from .token_checks import check_length, check_vocabulary
from .validate import Classes, LogitsFn, check_logits_fn, check_model

GRADIENT_METHODS = ("gradient", "input_x_gradient", "smoothgrad", "integrated_gradients")
RELEVANCE_METHODS = ("attnlrp",)
EMBEDDING_METHODS = GRADIENT_METHODS + RELEVANCE_METHODS  # attributions on the embeddings, reduced over the hidden size
ATTENTION_METHODS = ("rollout", "grad_rollout", "transformer_attribution", "vit_gradcam")
TEXT_METHODS = EMBEDDING_METHODS + ATTENTION_METHODS
REDUCTIONS = ("sum", "l1", "l2")
TEXT_KEYWORDS = ("attention_mask", "target", "classes", "logits", "reduce", "readout", "model_kwargs")


class TextModel(nn.Module):
    """``model`` as a function of its input embeddings: ``forward(E) = model(inputs_embeds=E,
    attention_mask=mask, **model_kwargs)``. A batch of ``k·B`` embeddings (the stacked points of
    SmoothGrad or Integrated Gradients) gets the mask and keyword tensors repeated ``k`` times.

    It holds the user's model as a child and changes nothing on it (its ``training`` flag mirrors the model's).
    """

    def __init__(self, model: nn.Module, attention_mask: torch.Tensor, model_kwargs: Optional[Dict[str, Any]] = None):
        super().__init__()
        self.model = model
        self.attention_mask = attention_mask
        self.model_kwargs = dict(model_kwargs or {})
        self.training = model.training

    def forward(self, inputs_embeds: torch.Tensor):
        batch = self.attention_mask.shape[0]
        k = inputs_embeds.shape[0] // batch

        def repeat(t):
            return t.repeat(k, *([1] * (t.dim() - 1))) if isinstance(t, torch.Tensor) and k > 1 else t

        extra = {name: repeat(value) for name, value in self.model_kwargs.items()}
        return self.model(inputs_embeds=inputs_embeds, attention_mask=repeat(self.attention_mask), **extra)


def _check_ids(input_ids: Any, attention_mask: Any, model: nn.Module):
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise InputError(f"input_ids must be a (B, L) integer tensor of token ids, got {shape}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise InputError(f"input_ids is empty: shape {tuple(input_ids.shape)}")
    check_vocabulary(input_ids, embeddings(model))
    check_length(input_ids, model)
    if attention_mask is None:
        return torch.ones_like(input_ids)
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
        raise InputError(
            f"attention_mask must be a tensor of the shape of input_ids {tuple(input_ids.shape)}, got {shape}"
        )
    if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise InputError("attention_mask must hold 1 (token) and 0 (padding) only")
    empty = (attention_mask == 0).all(dim=1)
    if bool(empty.any()):
        raise InputError(
            f"attention_mask rows {empty.nonzero().flatten().tolist()[:10]} are all 0 (padding only): no token to "
            "explain; give every row at least one token, or leave the empty rows out"
        )
    return attention_mask


def embeddings(model: nn.Module) -> nn.Module:
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if not isinstance(emb, nn.Module):
        raise ModelError(
            f"{type(model).__name__} has no get_input_embeddings(): explain_text needs a model that accepts "
            "inputs_embeds= and says which module embeds its tokens (every Hugging Face model does)"
        )
    return emb


def ig_baseline(model: nn.Module, emb: nn.Module, embeds: torch.Tensor, baseline: Any) -> Any:
    if isinstance(baseline, torch.Tensor) or isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        return baseline
    pad = getattr(getattr(model, "config", None), "pad_token_id", None)
    if baseline is None:
        baseline = "pad" if pad is not None else "zero"
    if baseline == "zero":
        return 0.0
    if baseline == "pad":
        if pad is None:
            raise OptionError(
                f"baseline='pad' needs a pad_token_id in {type(model).__name__}'s config; use baseline='zero'"
            )
        with torch.no_grad():
            ids = torch.full((1, 1), int(pad), dtype=torch.long, device=embeds.device)
            return emb(ids).to(embeds.dtype)
    raise OptionError(f"unknown baseline {baseline!r}; accepted: 'pad', 'zero', a number or a tensor")


def default_reduce(method: str, reduce: Optional[str]) -> str:
    """The reduction over the hidden size: ``reduce`` checked, or the method's default (``"l2"`` for
    ``gradient``/``smoothgrad``, whose signed sum vanishes behind a LayerNorm on the embeddings; else ``"sum"``)."""
    if reduce is None:
        reduce = "l2" if method in ("gradient", "smoothgrad") else "sum"
    if reduce not in REDUCTIONS:
        raise OptionError(f"unknown reduce {reduce!r}; accepted: {choices(REDUCTIONS)}")
    return reduce


def reduce_hidden(attributions: torch.Tensor, reduce: str) -> torch.Tensor:
    """(..., D) -> (...): ``Σ_d`` (signed, linear in the seed), ``Σ_d |·|`` (``"l1"``) or ``‖·‖₂`` (``"l2"``)."""
    if reduce == "sum":
        return attributions.sum(dim=-1)
    return attributions.abs().sum(dim=-1) if reduce == "l1" else attributions.norm(dim=-1)


def warn_norm(reduce: str, target: _targets.Target, stacklevel: int = 3) -> None:
    """A norm over the hidden size is not linear: say so for a contrast target."""
    if target.contrastive:
        warnings.warn(
            f"reduce={reduce!r} takes a norm of the token attributions: the {target.name!r} scores are not "
            "the per-class composition of the logit scores",
            NonLinearContrastWarning,
            stacklevel=stacklevel,
        )


def explain_text(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    method: str = "input_x_gradient",
    target: Any = "logit",
    classes: Classes = None,
    logits: Optional[LogitsFn] = None,
    *,
    reduce: Optional[str] = None,
    readout: Any = None,
    model_kwargs: Optional[Dict[str, Any]] = None,
    **options: Any,
) -> Explanation:
    """Token scores (B, L) for a text model (see the module docstring).

    ``logits``: selects the (B, C) logits from the model's output (default: its ``.logits``; for a causal
    language model the logits at each row's last real token, i.e. its next token). ``reduce``: ``"sum"`` |
    ``"l1"`` | ``"l2"`` over the hidden size (gradient family; default ``"l2"`` for ``gradient``/``smoothgrad``,
    else ``"sum"``).
    ``readout``: the token an attention method reads out (``"first"``, ``"last"`` or an index; default by
    the model's kind). ``model_kwargs``: further model inputs
    (``token_type_ids=...``). ``options`` go to the method (``n_steps=``, ``baseline=``, ``layer=``, ...).
    ``Explanation.extras`` holds ``input_ids`` and ``attention_mask`` (and for a causal LM's default read-out
    ``positions``, the column each row is read at), and the model's class names when its config names them
    (``id2label``).
    """
    if method not in TEXT_METHODS:
        raise OptionError(f"explain_text has no method {method!r}; accepted: {choices(TEXT_METHODS)}")
    reduce = default_reduce(method, reduce)
    check_model(model)
    _methods.get(method).check_options(options, TEXT_KEYWORDS, "bh.explain_text")
    mask = _check_ids(input_ids, attention_mask, model)
    with runtime.explaining(model):  # also under no_grad/inference_mode: a graph for this call only
        input_ids, mask = runtime.usable(input_ids), runtime.usable(mask)
        if model_kwargs:
            model_kwargs = {k: runtime.usable(v) for k, v in model_kwargs.items()}
        return _explain(model, input_ids, mask, method, target, classes, logits, reduce, readout, model_kwargs, options)


def _readout(model: nn.Module, mask: torch.Tensor, logits: Optional[LogitsFn], model_kwargs: Optional[Dict[str, Any]]):
    """``(logits fn, model kwargs, extras)`` for a padded batch: a causal LM reads each row's next token (or the
    user's ``logits=``, refused where it reads padding) with the positions each left-padded row has alone; any
    other model keeps ``logits``, with a warning when it is left-padded."""
    check_logits_fn(logits)
    model_kwargs = dict(model_kwargs or {})
    if not causal.is_causal(model):
        if causal.left_padded(mask) and "position_ids" not in model_kwargs:
            warnings.warn(
                f"attention_mask pads on the left: {type(model).__name__} counts positions from column 0, so a "
                "left-padded row may be explained at other positions than alone; pad on the right "
                "(tokenizer.padding_side = 'right') or pass model_kwargs={'position_ids': ...}",
                PaddingWarning,
                stacklevel=4,
            )
        return logits, model_kwargs, {}
    if causal.left_padded(mask) and "position_ids" not in model_kwargs and causal.takes(model, "position_ids"):
        model_kwargs["position_ids"] = causal.position_ids(mask)
    if logits is not None:
        return (causal.CheckedReadout(logits, mask) if not bool(mask.all()) else logits), model_kwargs, {}
    positions = causal.last_real(mask)
    return causal.NextToken(positions), model_kwargs, {"positions": positions}


def _explain(model, input_ids, mask, method, target, classes, logits, reduce, readout, model_kwargs, options):
    emb = embeddings(model)
    with torch.no_grad():
        embeds = emb(input_ids)
    if not embeds.is_floating_point() or embeds.shape[:2] != input_ids.shape:
        raise ModelError(f"the input embeddings have shape {tuple(embeds.shape)}; expected (B, L, D) floats")
    logits, model_kwargs, readout_extras = _readout(model, mask, logits, model_kwargs)
    wrapped = TextModel(model, mask, model_kwargs)
    if method in ATTENTION_METHODS:
        if readout is None:
            readout = "last" if causal.is_causal(model) else "first"
        options["layout"] = TextLayout(mask, readout)
        if method == "vit_gradcam" and options.get("layer") is not None:
            options["layer"] = f"model.{options['layer']}"
    elif readout is not None:
        raise OptionError(f"readout= is an option of the attention methods, not of {method!r}")
    if method == "integrated_gradients":
        options["baseline"] = ig_baseline(model, emb, embeds, options.get("baseline"))
    explainer = _methods.create(method, wrapped, **options)
    with warnings.catch_warnings():
        if method in EMBEDDING_METHODS and reduce != "sum":
            warnings.simplefilter("ignore", NonLinearContrastWarning)  # said once below, for the reduced scores
        with causal.nan_from_padding(mask):
            e = explainer(embeds, classes=classes, target=target, logits=logits)
    scores, linear = e.attributions, e.linear
    if method in EMBEDDING_METHODS:
        scores = reduce_hidden(scores, reduce) * mask.to(scores.dtype)
        linear = linear and reduce == "sum"
        if reduce != "sum":
            warn_norm(reduce, _targets.get(target), stacklevel=4)
    extras = dict(e.extras, input_ids=input_ids, attention_mask=mask, **readout_extras)
    names = model_class_names(model)  # a Hugging Face config's id2label names the classes in plots
    if names is not None:
        extras.setdefault("class_names", names)
    return Explanation(
        attributions=scores,
        logits=e.logits,
        classes=e.classes,
        method=e.method,
        target=e.target,
        linear=linear,
        input_shape=tuple(input_ids.shape),
        layer=e.layer[len("model.") :] if isinstance(e.layer, str) and e.layer.startswith("model.") else e.layer,
        extras=extras,
    )
