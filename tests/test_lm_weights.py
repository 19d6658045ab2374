"""Weights elsewhere: every text method on a model offloaded with accelerate (CPU and disk offload, one layer on
disk) gives the attributions of the plain model; on quantised weights (optimum-quanto, bitsandbytes) those
of the model with the dequantised weights."""

import copy
import itertools
import warnings

import pytest
import torch
from torch import nn

import _hf
import _lm
import backprop_hooks as bh
from backprop_hooks import testing

TIGHT = dict(rtol=1e-10, atol=1e-13)
WITH_EPSILON = "attnlrp_epsilon"  # AttnLRP with the ε-rule on every linear layer: rules that read the weights
METHODS = list(_lm.TEXT_METHODS) + [WITH_EPSILON]


def _explain(model, ids, mask, method):
    if method == WITH_EPSILON:
        return _lm.explain(model, ids, "attnlrp", mask, epsilon=1e-6)
    return _lm.explain(model, ids, method, mask)


def _offload(model, name: str, how: str, folder):
    accelerate = pytest.importorskip("accelerate")
    if how == "cpu":
        return accelerate.cpu_offload(model, execution_device="cpu")
    if how == "disk":
        return accelerate.disk_offload(model, str(folder), execution_device="cpu")
    layers = "transformer.h" if name == "gpt2" else "model.layers"
    base = layers.split(".")[0]
    device_map = {f"{base}.{n}": "cpu" for n, _ in getattr(model, base).named_children() if n != layers.split(".")[1]}
    device_map.update({f"{layers}.0": "disk", f"{layers}.1": "cpu", "lm_head": "cpu"})  # one layer on disk
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return accelerate.dispatch_model(model, device_map=device_map, main_device="cpu", offload_dir=str(folder))


FAST_OFFLOAD = {("llama", "attnlrp", "one_layer_on_disk"), ("llama", WITH_EPSILON, "disk")}
FAST_OFFLOAD |= {("gpt2", "transformer_attribution", "cpu")}


@pytest.mark.parametrize(
    "name, method, how",
    [
        pytest.param(*case, marks=() if case in FAST_OFFLOAD else pytest.mark.slow)
        for case in itertools.product(_lm.LMS, METHODS, ["cpu", "disk", "one_layer_on_disk"])
    ],
)
def test_offloaded_model_gives_the_plain_attributions(name, method, how, tmp_path):
    plain = _lm.build(name)
    ids, mask = _lm.inputs(name)
    model = _offload(copy.deepcopy(plain), name, how, tmp_path)
    assert any(p.is_meta for p in model.parameters())  # the weights live elsewhere between calls
    torch.testing.assert_close(_explain(model, ids, mask, method), _explain(plain, ids, mask, method), **TIGHT)
    testing.assert_no_hooks_left(model)


def test_offloaded_and_checkpointed_model_gives_the_plain_attributions(tmp_path):
    plain = _lm.build("llama")
    ids, mask = _lm.inputs("llama")
    model = _lm.enable_checkpointing(_offload(copy.deepcopy(plain), "llama", "disk", tmp_path))
    for method in ("attnlrp", "grad_rollout"):
        torch.testing.assert_close(
            _lm.explain(model, ids, method, mask), _lm.explain(plain, ids, method, mask), **TIGHT
        )


def test_a_meta_weight_without_an_offload_hook_is_refused():
    from backprop_hooks.module_weights import module_tensor

    with torch.device("meta"):
        norm = nn.LayerNorm(4)
    with pytest.raises(bh.errors.ModelError, match="meta device.*load the weights"):
        module_tensor(norm)
    assert module_tensor(nn.Linear(2, 2, bias=False), "bias") is None


# ---------------------------------------------------------------------------------------- quantised
def _dequantize(module):
    """A quantised linear layer's real-valued weight, from the quantisation libraries themselves (the oracle), or
    None for a layer that is not quantised."""
    weight = module.weight
    if type(weight).__module__.startswith("optimum.quanto"):
        return weight.dequantize()
    if type(weight).__name__ == "Params4bit":
        import bitsandbytes

        return bitsandbytes.functional.dequantize_4bit(weight.data, weight.quant_state)
    if type(weight).__name__ == "Int8Params":
        scales = weight.SCB if weight.SCB is not None else module.state.SCB
        return weight.data.float() * scales.view(-1, 1) / 127
    return None


def _dequantized_copy(model, quantized):
    """``model`` (the float original) with every quantised linear layer's weight replaced by its dequantised value."""
    reference = copy.deepcopy(model)
    layers = dict(reference.named_modules())
    for name, module in quantized.named_modules():
        weight = _dequantize(module) if isinstance(module, nn.Linear) else None
        if weight is not None:  # a parameter of its own: GPT-2 ties lm_head to wte
            layers[name].weight = nn.Parameter(weight.to(layers[name].weight.dtype))
    return reference


def _quanto(model, weights):
    quanto = pytest.importorskip("optimum.quanto")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quanto.quantize(model, weights=getattr(quanto, weights))
        quanto.freeze(model)
    return model


@pytest.mark.parametrize("weights", ["qint8", "qint4"])
@pytest.mark.parametrize(
    "name, method", _lm.cases({("llama", "attnlrp"), ("llama", WITH_EPSILON), ("llama", "gradient")}, methods=METHODS)
)
def test_quanto_weights_give_the_attributions_of_the_dequantized_model(name, method, weights):
    float_model = _lm.build(name).float()
    model = _quanto(copy.deepcopy(float_model), weights)
    assert any(type(m).__name__ == "QLinear" for m in model.modules())
    ids, mask = _lm.inputs(name)
    expected = _explain(_dequantized_copy(float_model, model), ids, mask, method)
    torch.testing.assert_close(_explain(model, ids, mask, method), expected, rtol=1e-5, atol=1e-6)


def _bitsandbytes(model, bits: int):
    """``model``'s decoder linear layers as bitsandbytes 8-bit or 4-bit layers (quantised on ``.to("cpu")``)."""
    bnb = pytest.importorskip("bitsandbytes")
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.out_features != _hf.VOCAB:
                if bits == 8:
                    layer = bnb.nn.Linear8bitLt(
                        child.in_features, child.out_features, child.bias is not None, has_fp16_weights=False
                    )
                    layer.weight = bnb.nn.Int8Params(child.weight.data, requires_grad=False, has_fp16_weights=False)
                else:
                    layer = bnb.nn.Linear4bit(child.in_features, child.out_features, child.bias is not None)
                    layer.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False)
                    layer.compute_dtype = torch.float32
                if child.bias is not None:
                    layer.bias = nn.Parameter(child.bias.data)
                setattr(parent, child_name, layer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.to("cpu")


@pytest.mark.parametrize(
    "method, bits",
    [
        pytest.param(m, b, marks=() if (m, b) in {(WITH_EPSILON, 8), ("attnlrp", 4)} else pytest.mark.slow)
        for m in ["gradient", "input_x_gradient", "attnlrp", WITH_EPSILON, "grad_rollout"]
        for b in (8, 4)
    ],
)
def test_bitsandbytes_weights_give_the_attributions_of_the_dequantized_model(method, bits):
    float_model = _lm.build("llama").float()
    model = _bitsandbytes(copy.deepcopy(float_model), bits)
    ids, mask = _lm.inputs("llama")
    expected = _explain(_dequantized_copy(float_model, model), ids, mask, method)
    torch.testing.assert_close(_explain(model, ids, mask, method), expected, rtol=1e-4, atol=1e-5)
