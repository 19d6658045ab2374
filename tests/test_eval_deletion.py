"""The deletion check (python -m backprop_hooks.eval.deletion): which units each fraction removes, the area
between curves, and a small run on both bundled transformers (every order starts and ends at the same
log-odds: nothing removed, everything removed)."""

import json

import pytest
import torch

from backprop_hooks.eval import deletion


def test_removal_masks_take_the_most_relevant_removable_units_first():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7], [3.0, -1.0, 2.0, 0.0]])
    units = torch.tensor([[True, True, True, True], [False, True, True, True]])  # sample 1: unit 0 stays
    removed = deletion.removal_masks(scores, units, [0.0, 0.5, 1.0])
    assert not removed[0].any()
    assert removed[1].tolist() == [[False, True, False, True], [False, False, True, True]]  # round(1.5) = 2
    assert removed[2].tolist() == units.tolist()


def test_area_between_is_the_trapezoid_of_the_difference():
    fractions = [0.0, 0.5, 1.0]
    reference = torch.tensor([[2.0], [2.0], [2.0]])
    curve = torch.tensor([[2.0], [0.0], [-2.0]])
    # ∫ (2 − c) df with c = 2, 0, −2 at 0, 0.5, 1: 0.5·(0 + 2)/2 + 0.5·(2 + 4)/2 = 2
    assert deletion.area_between(curve, reference, fractions).tolist() == [2.0]


@pytest.mark.parametrize("model", ["digits_vit", "text_topics"])  # python_docs_lm: tests/test_eval_answer_deletion.py
def test_a_small_run_on_the_bundled_model(model, tmp_path, capsys):
    argv = ["--model", model, "--n", "6", "--fractions", "3", "--random-orders", "2", "--out", str(tmp_path)]
    assert deletion.main(argv) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "results.md").is_file() and (tmp_path / "curves.png").is_file()
    assert result["samples"] == 6 and result["command"].endswith(" ".join(argv))
    curves = result["curves"]
    assert set(curves) == {"attnlrp (weighted)", "attnlrp (logit)", "input_x_gradient (logit)", "random"}
    for curve in curves.values():
        assert curve[0] == pytest.approx(curves["random"][0]) and curve[-1] == pytest.approx(curves["random"][-1])
    rows = {r["order"]: r for r in result["rows"]}
    assert rows["random"]["area_between"] == 0 and "area between" in capsys.readouterr().out
