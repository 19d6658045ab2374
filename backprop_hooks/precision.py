r"""Attributions of half-precision models (``bfloat16``, ``float16``).

Such a model runs its forward and backward passes in its own dtype (its own kernels, its own rounding). What
the framework computes around them is accumulated in ``float32``:

* the seed, from the logits in ``float32`` (the backward pass receives it rounded to the model's dtype);
* the read-outs: ``x ⊙ g`` (exact in ``float32`` for half-precision factors) and their sums, e.g. over the
  hidden size of a token's embedding;
* the sums over points: Integrated Gradients' quadrature (path fractions and weights in ``float32``),
  SmoothGrad's mean (noise drawn in ``float32``);
* the attention methods' mean over heads and the rollout's products over layers; GradCAM's weights.

Element-wise products of two half-precision tensors that stay per element (``G ⊙ A`` before the mean over
heads) keep the model's dtype. Attributions of a half-precision model come back in ``float32``; those of
``float32`` and ``float64`` models in their own dtype, computed as before.
"""

from __future__ import annotations

import torch

#: The half-precision dtypes whose attributions are accumulated in ``float32``.
HALF_DTYPES = (torch.float16, torch.bfloat16)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """``float32`` for ``float16``/``bfloat16``, ``dtype`` itself otherwise."""
    return torch.float32 if dtype in HALF_DTYPES else dtype


def widen(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in its accumulation dtype (a half-precision tensor in ``float32``; any other: itself)."""
    return tensor.float() if tensor.dtype in HALF_DTYPES else tensor


__all__ = ["accumulation_dtype", "widen", "HALF_DTYPES"]
