r"""Contrast inside the libraries users already have: Captum, pytorch-grad-cam and Quantus.

None of these needs to know about contrast: a contrast is a seed ``v`` on the logits (see
:mod:`backprop_hooks.targets`), and each library only needs a scalar per sample.

* **Captum.** :class:`Contrast` is an ``nn.Module`` whose ``forward(x, seed)`` returns ``Σ_c seed_c · y_c(x)``
  per sample, with ``seed = contrast.seed(x, classes)`` computed once at the explained ``x`` and frozen, passed
  through ``additional_forward_args``. Every Captum method then explains the contrast, and the per-class
  identities are exact: for gradient, path (IG), DeepLift/DeepLiftShap, GradientShap, layer, neuron and
  NoiseTunnel methods because their output is linear in the seed; for perturbation methods (FeatureAblation,
  Occlusion, ShapleyValueSampling, Lime...) because ``Σ_s seed_s · Δy_s`` is the same combination
  ``Σ_s seed_s · attribution_s`` of the per-class attributions. Captum's convergence deltas (IG, DeepLift) are
  measured against this linearised contrast. The contrast is computed by a leaf module, ``contrast.head``,
  that carries Captum's LRP rule (the ε/z-rule: relevance ``seed_c · y_c`` at the logits), so Captum's LRP
  works through :class:`Contrast` too and gives the same contrastive relevance as ``bh.explain(...,
  method="lrp")`` with ε rules.

* **Potentials.** :class:`Potentials` is an ``nn.Module`` returning, for every class ``c``, the target's
  potential of ``c`` (``Target.potentials``): for ``weighted`` the log-odds ``log(p_c / (1 − p_c))``. Give it to
  anything that reads a model's output at the explained class (Captum's perturbation methods with
  ``target=t``, Quantus' faithfulness metrics) to measure the contrast itself rather than its linearisation.

* **pytorch-grad-cam.** :func:`grad_cam_target` returns a target callable (like the library's
  ``ClassifierOutputTarget``) whose value is the contrast's potential and whose gradient is the contrast's
  seed, so gradient CAMs (GradCAM, GradCAM++, HiResCAM, XGradCAM, LayerCAM...) back-propagate the contrast
  and score CAMs (ScoreCAM, AblationCAM) score it.

* **Quantus.** :func:`quantus_explain` returns a function with Quantus' ``explain_func`` contract
  ``(model, inputs, targets, **kwargs) -> np.ndarray``.

Captum, pytorch-grad-cam and Quantus are optional (the ``interop`` extra): nothing here imports them until
it needs them, and a missing one raises :class:`~backprop_hooks.errors.MissingExtraError`.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from . import targets as _targets
from .errors import InputError, OptionError, require
from .validate import Classes, check_classes, check_input, check_model, select_logits

EXTRA = "interop"
LogitsFn = Optional[Callable[[Any], torch.Tensor]]


def _mirror_mode(wrapper: nn.Module, model: nn.Module) -> None:
    """The wrapper reports the model's train/eval flag (set on the wrapper alone: ``train()`` would recurse
    into the model and overwrite its submodules' own flags)."""
    wrapper.training = model.training
    for child in wrapper.children():
        if child is not model:
            child.training = model.training


class SeedHead(nn.Module):
    """``f = Σ_c seed_c · y_c`` per sample, as a layer of its own (the seed is a keyword argument, so that
    forward hooks see the logits as its only input).

    For Captum's LRP it carries a rule, ``rule`` (default Captum's ``EpsilonRule``: the z-rule, which puts the
    relevance ``seed_c · y_c · f / f`` on logit ``c``); assign another ``PropagationRule`` to change it.
    Captum deletes the rules of a model after each explanation: this one comes back as the default.
    """

    def __init__(self):
        super().__init__()
        self._rule = None

    @property
    def rule(self):
        if self._rule is None:
            self._rule = require("captum.attr._utils.lrp_rules", EXTRA).EpsilonRule()
        return self._rule

    @rule.setter
    def rule(self, value) -> None:
        self._rule = value

    @rule.deleter
    def rule(self) -> None:
        self._rule = None

    def forward(self, logits: torch.Tensor, *, seed: torch.Tensor) -> torch.Tensor:
        if seed.shape != logits.shape:
            raise InputError(
                f"seed of shape {tuple(seed.shape)} does not match the logits' {tuple(logits.shape)}; compute it "
                "with contrast.seed(x, classes) for the same batch (Captum expands additional_forward_args with "
                "the inputs)"
            )
        return (logits * seed.to(logits.dtype)).sum(dim=1)


class Contrast(nn.Module):
    """``forward(x, seed) -> (B,)``: ``Σ_c seed_c · logits_c``, the contrast as a model Captum can explain.

    ``f = Contrast(model, "weighted")``; ``seed = f.seed(x, classes)`` (frozen at ``x``; ``classes=None`` is the
    prediction); then ``captum.attr.IntegratedGradients(f).attribute(x, additional_forward_args=(seed,))``.
    ``target`` is any target of :mod:`backprop_hooks.targets` (name or instance); ``logits`` maps the model's
    output to (B, C) logits when it is not a tensor, a ``.logits`` attribute or a ``"logits"`` key.
    """

    def __init__(self, model: nn.Module, target: Any = "weighted", logits: LogitsFn = None):
        super().__init__()
        self.model = check_model(model)
        self.target = _targets.get(target)
        self.logits_fn = logits
        self.head = SeedHead()
        _mirror_mode(self, self.model)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The model's (B, C) logits at ``x`` (with autograd, as the model computes them)."""
        return select_logits(self.model(x), x.shape[0], self.logits_fn)

    @torch.no_grad()
    def seed(self, x: torch.Tensor, classes: Classes = None) -> torch.Tensor:
        """The target's seed (B, C) at ``x`` for ``classes`` (``None``: the predicted class), detached."""
        logits = self.logits(check_input(x))
        self.target.check(logits.shape[1])
        return self.target.seed(logits, check_classes(classes, logits)).detach()

    @torch.no_grad()
    def potential(self, x: torch.Tensor, classes: Classes = None) -> torch.Tensor:
        """(B,) the target's potential at ``x`` (the true scalar the seed is the gradient of)."""
        logits = self.logits(check_input(x))
        self.target.check(logits.shape[1])
        return self.target.potential(logits, check_classes(classes, logits))

    def forward(self, x: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
        return self.head(self.logits(x), seed=seed)

    def extra_repr(self) -> str:
        return f"target={self.target!r}"


class Potentials(nn.Module):
    """``forward(x) -> (B, C)``: column ``c`` is the target's potential for class ``c`` (``Target.potentials``).

    For ``weighted``, the log-odds of every class; for ``logit``, the logits themselves. A drop-in "model" for
    metrics and perturbation methods that read the output at the explained class.
    """

    def __init__(self, model: nn.Module, target: Any = "weighted", logits: LogitsFn = None):
        super().__init__()
        self.model = check_model(model)
        self.target = _targets.get(target)
        self.logits_fn = logits
        _mirror_mode(self, self.model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = select_logits(self.model(x), x.shape[0], self.logits_fn)
        self.target.check(logits.shape[1])
        return self.target.potentials(logits)

    def extra_repr(self) -> str:
        return f"target={self.target!r}"


class GradCamTarget:
    """A pytorch-grad-cam target: ``target(model_output) -> the potential of class ``category```.

    Its gradient with respect to the output is the target's seed, so gradient CAMs explain the contrast;
    score CAMs rank channels by the contrast's potential. Accepts one sample's (C,) output or a (B, C) batch.
    """

    def __init__(self, target: Any, category: Union[int, torch.Tensor]):
        self.target = _targets.get(target)
        self.category = category

    def __call__(self, model_output: torch.Tensor) -> torch.Tensor:
        single = model_output.dim() == 1
        logits = model_output[None] if single else model_output
        classes = check_classes(self.category, logits)
        if classes.numel() == 1 and logits.shape[0] > 1:
            classes = classes.expand(logits.shape[0])
        value = self.target.potential(logits, classes)
        return value[0] if single else value

    def __repr__(self) -> str:
        return f"GradCamTarget({self.target!r}, {self.category!r})"


def grad_cam_target(target: Any, category: Union[int, torch.Tensor]) -> GradCamTarget:
    """``GradCAM(model, layers)(x, targets=[grad_cam_target("weighted", t) for t in classes])``."""
    require("pytorch_grad_cam", EXTRA)
    return GradCamTarget(target, category)


def _unwrap(model: nn.Module) -> nn.Module:
    while isinstance(model, (Potentials, Contrast)):
        model = model.model
    return model


def quantus_explain(method: str = "gradient", target: Any = "weighted", channels: str = "keep", **options: Any):
    """A Quantus ``explain_func``: ``(model, inputs, targets, **kwargs) -> np.ndarray`` of attributions.

    ``method``/``target``/``options`` go to :func:`backprop_hooks.explain`, with ``classes=targets``. The model
    Quantus passes may be a :class:`Potentials` or :class:`Contrast` head: the model inside it is explained.
    Input-space attributions come back as they are (``channels="keep"``) or channel-summed to (B, 1, H, W)
    (``channels="sum"``); layer and token methods come back as their upsampled (B, 1, H, W) maps. Quantus'
    ``explain_func_kwargs`` are passed on as method options (its ``device`` key is ignored: the model's is used).
    """
    require("quantus", EXTRA)
    from . import methods
    from .api import explain as explain_with

    if channels not in ("keep", "sum"):
        raise OptionError(f"channels must be 'keep' or 'sum', got {channels!r}")
    methods.get(method).check_options(options)
    _targets.get(target)

    def explain(model: nn.Module, inputs: Any, targets: Any, **kwargs: Any):
        kwargs.pop("device", None)
        net = _unwrap(check_model(model))
        reference = next(iter(net.parameters()), None)
        device = reference.device if reference is not None else torch.device("cpu")
        dtype = reference.dtype if reference is not None and reference.is_floating_point() else torch.float32
        x = torch.as_tensor(inputs).to(device=device, dtype=dtype)
        classes = torch.as_tensor(targets, dtype=torch.long, device=device).reshape(-1)
        if classes.numel() == 1 and x.shape[0] > 1:
            classes = classes.expand(x.shape[0])
        e = explain_with(net, x, method=method, target=target, classes=classes, **{**options, **kwargs})
        if e.attributions.shape == x.shape and channels == "keep":
            out = e.attributions
        else:
            out = e.maps[:, None]
        return out.detach().float().cpu().numpy()

    explain.__name__ = explain.__qualname__ = f"bh_{method}_{_targets.get(target).key}"
    return explain


__all__ = ["Contrast", "Potentials", "SeedHead", "GradCamTarget", "grad_cam_target", "quantus_explain"]
