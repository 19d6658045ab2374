"""The deletion check of the bundled language model's answers against foil answers
(``python -m backprop_hooks.eval.deletion --model python_docs_lm``): the samples, the relevance per prompt token,
the curves (deletion = the token taken out of the sequence), the seeded random orders, the sign of the area
between the curves and its confidence interval, checked against each sequence run alone."""

import json
import math

import pytest
import torch

import backprop_hooks as bh
from backprop_hooks.eval import answer_deletion, deletion, report

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def task():
    return answer_deletion.PythonDocsLM(10, batch_size=4)  # 8 prompts, explained in batches of 4 (left padding)


@pytest.fixture(scope="module")
def relevance(task):
    """Every order's (B, K) relevance, computed once: ``{(method, target): tensor}``."""
    with pytest.warns(bh.errors.NonLinearContrastWarning):  # the gradient's L2 norm of a contrast
        return {order: task.relevance(*order) for order in task.orders}


def test_the_recency_order_takes_the_prompts_last_tokens_first(task, relevance):
    removed = deletion.removal_masks(relevance[answer_deletion.RECENCY], task.units, [1 / 4])[0]
    for b, prompt in enumerate(task.prompts):
        k = len(prompt) - 1
        assert removed[b].tolist() == [i >= k - round(k / 4) for i in range(k)] + [False] * (task.units.shape[1] - k)


def alone(task, prompt, answer, foil) -> float:
    """``log p(answer) − log p(foil)``, each sequence run alone: no padding, the model's own positions."""

    def log_p(continuation):
        with torch.no_grad():
            logp = task.model(torch.tensor([prompt + continuation])).logits[0].double().log_softmax(-1)
        return sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(continuation))

    return log_p(answer) - log_p(foil)


def test_the_samples_are_held_out_prompts_the_model_answers_with_the_true_next_word(task):
    tok = task.tokenizer
    assert task.samples == 8 and task.units.shape[0] == 8
    for prompt, answer, foil, text, units in zip(task.prompts, task.answers, task.foils, task.texts, task.units):
        assert prompt[0] == tok.bos_token_id and len(prompt) - 1 >= answer_deletion.MIN_PROMPT
        assert int(units.sum()) == len(prompt) - 1  # every token after BOS is a unit, BOS never
        assert text.startswith(tok.decode(prompt[1:] + answer))  # the answer is the sentence's next word
        assert tok.decode(answer)[0] == " " and tok.decode(foil)[0] == " " and foil[0] != answer[0]
        assert alone(task, prompt, answer, foil) >= answer_deletion.MARGIN


def test_curves_start_at_the_preference_explain_generation_reports(task):
    nothing = torch.zeros(1, *task.units.shape, dtype=torch.bool)
    start = task.curve(nothing)[0]
    e = bh.explain_generation(
        task.model, task.prompts, task.answers, foil_ids=task.foils, target="log_softmax", per_step=False
    )
    torch.testing.assert_close(start, e.potential, rtol=1e-4, atol=1e-4)
    expected = [alone(task, p, a, f) for p, a, f in zip(task.prompts, task.answers, task.foils)]
    torch.testing.assert_close(start.double(), torch.tensor(expected, dtype=torch.double), rtol=1e-4, atol=1e-4)


# the gradient's l2 norm warns on purpose
@pytest.mark.filterwarnings("ignore::backprop_hooks.errors.NonLinearContrastWarning")
@pytest.mark.parametrize("method", answer_deletion.METHODS)
def test_relevance_is_each_prompt_tokens_total_as_it_gets_alone(task, relevance, method):
    for target in answer_deletion.TARGETS:
        contrast = target == "contrast"
        for b in (0, 5):
            prompt, answer, foil = task.prompts[b], task.answers[b], task.foils[b]
            e = bh.explain_generation(
                task.model,
                [prompt],
                [answer],
                foil_ids=[foil] if contrast else None,
                method=method,
                target="log_softmax" if contrast else target,
                per_step=False,
                reduce=answer_deletion.REDUCE[method],
            )
            k = len(prompt) - 1
            scale = float(e.total.abs().max())  # float32: the batch's padding moves the last bits
            got = relevance[method, target][b]
            torch.testing.assert_close(got[:k], e.total[0, 1 : k + 1], rtol=1e-4, atol=1e-4 * scale)
            assert (got[k:] == 0).all()


def test_the_gradient_summed_over_the_hidden_size_is_zero_on_gpt2_so_the_check_ranks_its_norm(task):
    """The embeddings reach GPT-2 only through LayerNorms (shift-invariant along (1, …, 1)): Σ_d ∂f/∂e_d = 0."""
    kwargs = dict(method="gradient", target="logit", per_step=False)
    signed = bh.explain_generation(task.model, task.prompts[:4], task.answers[:4], reduce="sum", **kwargs).total
    norm = bh.explain_generation(task.model, task.prompts[:4], task.answers[:4], reduce="l2", **kwargs).total
    assert signed.abs().max() < 1e-5 * norm.abs().max()
    assert answer_deletion.REDUCE == {"gradient": "l2", "input_x_gradient": "sum", "attnlrp": "sum"}


def test_deletion_takes_the_most_relevant_tokens_out_of_the_sequence_first(task, relevance):
    relevance = relevance["attnlrp", "contrast"]
    fractions = [0.0, 0.25, 0.5, 1.0]
    curves = task.curve(deletion.removal_masks(relevance, task.units, fractions))
    for b, (prompt, answer, foil) in enumerate(zip(task.prompts, task.answers, task.foils)):
        tokens = prompt[1:]
        ranked = sorted(range(len(tokens)), key=lambda i: -float(relevance[b, i]))
        for f, value in zip(fractions, curves[:, b].tolist()):
            gone = set(ranked[: round(f * len(tokens))])
            shorter = prompt[:1] + [t for i, t in enumerate(tokens) if i not in gone]
            assert value == pytest.approx(alone(task, shorter, answer, foil), abs=1e-4)


def leave_one_out(task) -> torch.Tensor:
    """(B, K) how much ``log p(answer) − log p(foil)`` falls when each prompt token alone is taken out."""
    k = task.units.shape[1]
    one = torch.eye(k, dtype=torch.bool)[:, None, :].expand(k, task.samples, k) & task.units[None]
    drop = task.curve(torch.zeros(1, *task.units.shape, dtype=torch.bool)) - task.curve(one)
    return drop.T.masked_fill(~task.units, 0.0)


def test_the_area_is_positive_when_the_order_beats_random_and_has_its_t_interval(task, monkeypatch):
    oracle = leave_one_out(task)
    monkeypatch.setattr(task, "orders", (("oracle", "leave one out"), ("oracle", "reversed")))
    monkeypatch.setattr(task, "relevance", lambda method, target: oracle if target == "leave one out" else -oracle)
    fractions = [0.0, 0.25, 0.5, 0.75, 1.0]
    curves, rows = deletion.run(task, fractions, random_orders=3, seed=0)
    rows = {r["order"]: r for r in rows}
    assert rows["oracle (leave one out)"]["area_between"] > 0 > rows["oracle (reversed)"]["area_between"]
    assert rows["random"]["area_between"] == 0
    for name in ("oracle (leave one out)", "oracle (reversed)"):
        areas = deletion.area_between(curves[name], curves["random"], fractions).double()
        assert areas.shape == (task.samples,)
        half = report.t_quantile(task.samples) * float(areas.std()) / math.sqrt(task.samples)
        assert rows[name]["area_between"] == pytest.approx(float(areas.mean()))
        assert rows[name]["area_between_ci"] == pytest.approx(half) and half > 0


def test_random_orders_are_seeded(task, monkeypatch):
    monkeypatch.setattr(task, "orders", ())
    fractions = [0.0, 0.5, 1.0]
    first = deletion.run(task, fractions, random_orders=2, seed=0)[0]["random"]
    again = deletion.run(task, fractions, random_orders=2, seed=0)[0]["random"]
    other = deletion.run(task, fractions, random_orders=2, seed=1)[0]["random"]
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_a_small_run_writes_the_method_by_target_report(task, relevance, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(deletion.TASKS, "python_docs_lm", lambda n, batch_size: task)  # the same 8 prompts
    monkeypatch.setattr(task, "relevance", lambda method, target: relevance[method, target])
    argv = ["--model", "python_docs_lm", "--n", "10", "--fractions", "3", "--random-orders", "2"]
    argv += ["--batch-size", "4", "--out", str(tmp_path)]
    assert deletion.main(argv) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "curves.png").is_file() and "contrast − logit, paired" in (tmp_path / "results.md").read_text()
    assert result["samples"] == result["data"]["samples"] == 8
    curves = result["curves"]
    names = {f"{m} ({t})" for m in answer_deletion.METHODS for t in answer_deletion.TARGETS}
    assert set(curves) == names | {"recency (last first)", "random"}
    for curve in curves.values():  # nothing removed, and every prompt token removed: the same for every order
        assert curve[0] == pytest.approx(curves["random"][0]) and curve[-1] == pytest.approx(curves["random"][-1])
    assert [r["method"] for r in result["table"]] == list(answer_deletion.METHODS)
    for row in result["table"]:
        assert all(math.isfinite(row[t]["ci"]) for t in answer_deletion.TARGETS)
        assert math.isfinite(row["contrast_minus_logit"]["ci"])
    assert "log p(answer) − log p(foil)" in capsys.readouterr().out


@pytest.mark.slow
def test_a_real_run_deleting_by_relevance_beats_random_deletion(tmp_path):
    """60 held-out sentences: attnlrp and input×gradient of the contrast lower log p(answer) − log p(foil) faster
    than random deletion (the lower end of the 95 % interval above 0)."""
    argv = ["--model", "python_docs_lm", "--n", "60", "--fractions", "11", "--random-orders", "3"]
    assert deletion.main([*argv, "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["samples"] >= 30
    table = {row["method"]: row for row in result["table"]}
    for method in ("input_x_gradient", "attnlrp"):
        area = table[method]["contrast"]
        assert area["mean"] - area["ci"] > 0, (method, area)
