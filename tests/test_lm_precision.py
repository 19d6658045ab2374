"""Half precision: every text method on a bfloat16 or float16 language model gives finite float32 attributions
within a measured bound of those of the same weights in float64 (``python -m bench.precision``: the README's
table; the bounds here are about 3x its largest errors, so a lost float32 accumulation, e.g. the rollout's
products over layers in bfloat16, fails)."""

import copy
import itertools

import pytest
import torch

import _lm
import backprop_hooks as bh

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
BOUNDS = {  # method -> (bf16, fp16): relative error ‖φ − φ64‖ / ‖φ64‖, about 3x the README's table
    "gradient": (1.2e-2, 1.5e-3),
    "input_x_gradient": (1.5e-1, 1e-2),  # Llama: Σ_d E_d ∂f/∂E_d cancels (the RMSNorm makes f nearly scale-free)
    "smoothgrad": (6e-3, 6e-4),  # against float32: the noise is drawn in float32
    "integrated_gradients": (4e-2, 6e-3),
    "attnlrp": (2.5e-2, 3e-3),
    "rollout": (2e-3, 2.5e-4),
    "grad_rollout": (1.5e-3, 1.7e-4),
    "transformer_attribution": (1.5e-4, 2e-5),
    "vit_gradcam": (4.5e-2, 6e-3),
}


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.double() - expected).norm() / expected.norm())


FAST = {("llama", m, "bf16") for m in ("input_x_gradient", "attnlrp", "rollout", "grad_rollout")}
FAST |= {("gpt2", "transformer_attribution", "fp16"), ("gpt2", "integrated_gradients", "bf16")}


@pytest.mark.parametrize(
    "name, method, dtype",
    [
        pytest.param(*case, marks=() if case in FAST else pytest.mark.slow)
        for case in itertools.product(_lm.LMS, _lm.TEXT_METHODS, DTYPES)
    ],
)
def test_half_precision_stays_within_the_measured_bound(name, method, dtype):
    model = _lm.build(name).to(DTYPES[dtype])
    reference = copy.deepcopy(model).to(torch.float32 if method == "smoothgrad" else torch.float64)
    ids, mask = _lm.inputs(name)
    with torch.no_grad():  # the float64 model's next token: a near tie of random logits may flip in half precision
        classes = reference(ids, attention_mask=mask).logits[:, -1].argmax(-1)
    got = _lm.explain(model, ids, method, mask, classes=classes)
    expected = _lm.explain(reference, ids, method, mask, classes=classes)
    assert got.dtype == torch.float32 and bool(torch.isfinite(got).all())  # accumulated in float32
    assert _relative_error(got, expected) <= BOUNDS[method][list(DTYPES).index(dtype)]
    assert not any(p.dtype == torch.float32 for p in model.parameters())  # the model is left in its dtype


@pytest.mark.parametrize("method", ["input_x_gradient", "smoothgrad", "integrated_gradients"])
def test_reads_out_and_sums_in_float32_on_a_bfloat16_linear_model(method):
    """On ``y = W x`` the gradient is the row ``W_t`` (exact in bfloat16), so every read-out is known exactly:
    ``x ⊙ W_t``, the mean of ``W_t`` over noisy copies, ``(x − 0) ⊙ W_t Σ_k w_k``. In float32 they hold to
    float32 rounding; products, quadrature weights or sums in bfloat16 miss by about 1e-3."""
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 3, bias=False).to(torch.bfloat16)
    x = torch.randn(2, 64).to(torch.bfloat16)
    options = {"smoothgrad": dict(n_samples=50, seed=0), "integrated_gradients": dict(n_steps=50)}.get(method, {})
    e = bh.explain(model, x, method, target="logit", classes=0, **options)
    row = model.weight[0].float().expand(2, -1)
    expected = row if method == "smoothgrad" else x.float() * row
    assert e.attributions.dtype == torch.float32
    torch.testing.assert_close(e.attributions, expected, rtol=1e-5, atol=1e-6)
