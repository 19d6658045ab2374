"""Masking experiment: the equal-count rule, baselines, the relative probability, the batched job."""

import pytest
import torch
from torch import nn

from backprop_hooks.eval import mask


def test_equal_count_rule_by_hand():
    original = torch.tensor([[1.0, 2.0, 3.0, -1.0]])
    weighted = torch.tensor([[5.0, -1.0, -2.0, -3.0]])
    keep_o, keep_w, k = mask.equal_count_keep(original, weighted, "positive")
    assert k.tolist() == [1]  # min(3 positive, 1 positive)
    assert keep_o.tolist() == [[False, False, True, False]] and keep_w.tolist() == [[True, False, False, False]]
    keep_o, keep_w, k = mask.equal_count_keep(original, weighted, "negative")
    assert k.tolist() == [1]  # min(1 negative, 3 negative)
    assert keep_o.tolist() == [[False, False, False, True]] and keep_w.tolist() == [[False, False, False, True]]


@pytest.mark.parametrize("features", ["positive", "negative"])
def test_equal_count_rule_on_random_maps(features):
    torch.manual_seed(0)
    original = torch.randn(6, 9, 7) + torch.linspace(-1, 1, 6).view(6, 1, 1)
    weighted = torch.randn(6, 9, 7) - torch.linspace(-1, 1, 6).view(6, 1, 1)
    original[0] = weighted[0].abs() * -1  # a map without positive pixels: k = 0 for "positive"
    keep_o, keep_w, k = mask.equal_count_keep(original, weighted, features)
    sign = 1 if features == "positive" else -1
    counts = lambda m: (sign * m > 0).flatten(1).sum(1)  # noqa: E731
    assert torch.equal(k, torch.minimum(counts(original), counts(weighted)))
    # both maps change exactly the same number of pixels, per sample
    assert torch.equal(keep_o.flatten(1).sum(1), k) and torch.equal(keep_w.flatten(1).sum(1), k)
    # kept pixels carry the requested sign only, and they are the top-ranked ones
    assert bool((sign * original[keep_o] > 0).all()) and bool((sign * weighted[keep_w] > 0).all())
    for m, keep in ((original, keep_o), (weighted, keep_w)):
        for b in range(6):
            if 0 < k[b] < m[b].numel():
                assert (sign * m[b][keep[b]]).min() >= (sign * m[b][~keep[b]]).max()


def test_blur_parameters_scale_with_the_image():
    assert mask.blur_parameters(224) == (101, 15.0)
    kernel, sigma = mask.blur_parameters(32)
    assert kernel == 15 and sigma == pytest.approx(15 * 32 / 224)
    assert mask.blur_parameters(8)[0] % 2 == 1


def test_baselines():
    x = torch.rand(2, 3, 16, 16)
    assert torch.equal(mask.baseline(x, "zeros"), torch.zeros_like(x))
    mean = mask.baseline(x, "mean")
    torch.testing.assert_close(mean[:, :, 3, 5], x.mean(dim=(2, 3)))
    blurred = mask.baseline(x, "blur")
    assert blurred.shape == x.shape and blurred.std() < x.std()
    flat = torch.full((1, 3, 16, 16), 0.25)
    torch.testing.assert_close(mask.baseline(flat, "blur"), flat)
    with pytest.raises(ValueError, match="unknown baseline"):
        mask.baseline(x, "noise")


def test_relative_probability():
    logits = torch.tensor([[1.0, 0.0, 3.0]])
    value = mask.relative_probability(logits, torch.tensor([2]), torch.tensor([0]))
    assert float(value) == pytest.approx(torch.e**3 / (torch.e**3 + torch.e))


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.act = nn.Tanh()
        self.head = nn.Linear(6 * 8 * 8, 4)

    def forward(self, x):
        return self.head(self.act(self.conv(x)).flatten(1))


def test_masking_process_keeps_only_samples_above_threshold():
    torch.manual_seed(0)
    model = Tiny().eval()
    x = torch.rand(5, 3, 8, 8)
    with torch.no_grad():
        p2 = model(x).softmax(1).topk(2).values[:, 1]
    threshold = float(p2.median())
    methods = {"gradcam": {"layer": "conv"}, "gradient": {}}
    out = mask.masking_process(model, methods, ["zeros", "blur"], ["positive", "negative"], threshold)(
        x, torch.zeros(5, dtype=torch.long), torch.arange(5)
    )
    kept = out["kept"].bool()
    assert torch.equal(kept, p2 > threshold)
    assert out["value"].shape == (2, 2, 2, 2, 2, 5) and out["k"].shape == (2, 2, 2, 5)
    assert out["value"][..., kept].isfinite().all() and out["value"][..., ~kept].isnan().all()
    assert (out["k"][..., kept] >= 0).all() and (out["k"][..., ~kept] == -1).all()
    torch.testing.assert_close(out["before"][0] + out["before"][1], torch.ones(5))


# ---- values, not shapes: each number recomputed sample by sample, independently of the batched job ----


def _rel(logits, t, other):
    """e^{y_t} / (e^{y_t} + e^{y_other}) for one sample, written as a two-class softmax."""
    return float(torch.stack([logits[t], logits[other]]).double().softmax(0)[0])


def _keep(values, k, features):
    """The k top-ranked pixels of a flat map (bottom-ranked for negative features), by a full sort."""
    order = torch.sort(values if features == "positive" else -values, descending=True, stable=True).indices
    keep = torch.zeros(values.numel(), dtype=torch.bool)
    keep[order[:k]] = True
    return keep


def test_masking_process_values_equal_a_per_sample_recomputation():
    """Every value of the job: the right map (O = logit, W = weighted) for the right class (t1, t2), the
    equal-count mask, the right baseline, and the relative probability of t against the *other* class."""
    import backprop_hooks as bh

    torch.manual_seed(1)
    model = Tiny().eval()
    x = torch.rand(6, 3, 8, 8)
    methods = {"gradcam": {"layer": "conv"}, "gradient": {}}
    baselines, features = ["zeros", "blur", "mean"], ["positive", "negative"]
    out = mask.masking_process(model, methods, baselines, features, 0.0)(
        x, torch.zeros(6, dtype=torch.long), torch.arange(6)
    )
    assert out["kept"].all()
    checked = 0
    for s in range(6):
        with torch.no_grad():
            y = model(x[s : s + 1])[0]
        t1, t2 = torch.sort(y.softmax(0), descending=True).indices[:2].tolist()
        assert (int(out["t1"][s]), int(out["t2"][s])) == (t1, t2)
        assert float(out["before"][0, s]) == pytest.approx(_rel(y, t1, t2), abs=1e-6)
        assert float(out["before"][1, s]) == pytest.approx(_rel(y, t2, t1), abs=1e-6)
        for m, (method, options) in enumerate(methods.items()):
            for c, (t, other) in enumerate(((t1, t2), (t2, t1))):
                maps = [
                    bh.explain(model, x[s : s + 1], method, target, classes=t, **options).maps[0].flatten()
                    for target in ("logit", "weighted")
                ]
                for f, feature in enumerate(features):
                    sign = 1 if feature == "positive" else -1
                    k = min(int((sign * maps[0] > 0).sum()), int((sign * maps[1] > 0).sum()))
                    assert int(out["k"][m, f, c, s]) == k
                    for j, kind in enumerate(baselines):
                        for a in range(2):  # 0: original, 1: weighted
                            keep = _keep(maps[a], k, feature).view(1, 1, 8, 8)
                            masked = torch.where(keep, x[s : s + 1], mask.baseline(x[s : s + 1], kind))
                            with torch.no_grad():
                                want = _rel(model(masked)[0], t, other)
                            got = float(out["value"][m, j, f, a, c, s])
                            assert got == pytest.approx(want, abs=1e-5), (method, kind, feature, a, c, s)
                            checked += 1
    assert checked == 6 * 2 * 2 * 2 * 3 * 2


def _results(value, kept, before, k):
    return {"value": value, "kept": kept, "before": before, "k": k}


def test_summarize_means_differences_winners_and_pixel_fractions_by_hand():
    # one method, two baselines, both feature kinds, 2 maps, 2 classes, 4 samples (the last one not kept)
    value = torch.full((1, 2, 2, 2, 2, 4), float("nan"), dtype=torch.float64)
    # blur, positive, t1: original .2 .4 .6, weighted .5 .5 .5 -> W better on 2 of 3 (higher is better)
    value[0, 0, 0, 0, 0, :3] = torch.tensor([0.2, 0.4, 0.6])
    value[0, 0, 0, 1, 0, :3] = torch.tensor([0.5, 0.5, 0.5])
    # blur, negative, t1: the same numbers -> W better on 1 of 3 (lower is better)
    value[0, 0, 1, 0, 0, :3] = torch.tensor([0.2, 0.4, 0.6])
    value[0, 0, 1, 1, 0, :3] = torch.tensor([0.5, 0.5, 0.5])
    # every other cell: original 0.3, weighted 0.1
    rest = value[..., :3].isnan()
    value[..., :3][rest & (torch.arange(2).view(1, 1, 1, 2, 1, 1) == 0)] = 0.3
    value[..., :3][value[..., :3].isnan()] = 0.1
    value[..., 3] = 9.0  # a sample that is not kept must not count, whatever it holds
    kept = torch.tensor([1, 1, 1, 0])
    before = torch.tensor([[0.7, 0.8, 0.9, 0.0], [0.3, 0.2, 0.1, 1.0]], dtype=torch.float64)
    k = torch.full((1, 2, 2, 4), 8, dtype=torch.long)
    k[0, 0, 0, :3] = torch.tensor([4, 8, 12])
    rows = mask.summarize(_results(value, kept, before, k), ["gradcam"], ["blur", "zeros"], mask.FEATURES, 16)
    assert [(r["baseline"], r["features"], r["class"]) for r in rows] == [
        (b, f, c) for b in ("blur", "zeros") for f in mask.FEATURES for c in mask.CLASSES
    ]
    by = {(r["baseline"], r["features"], r["class"]): r for r in rows}
    r = by[("blur", "positive", "t1")]
    assert r["n"] == 3 and r["method"] == "gradcam"
    assert r["original"] == pytest.approx(0.4) and r["weighted"] == pytest.approx(0.5)
    assert r["weighted_minus_original"] == pytest.approx(0.1)
    assert r["weighted_better_fraction"] == pytest.approx(2 / 3)
    assert r["before"] == pytest.approx(0.8) and by[("blur", "positive", "t2")]["before"] == pytest.approx(0.2)
    assert r["kept_pixel_fraction"] == pytest.approx(8 / 16)
    # Student-t interval of the mean of .2 .4 .6: t_{0.975, 2} · 0.2 / √3
    assert r["original_ci95"] == pytest.approx(4.302652729749464 * 0.2 / 3**0.5)
    r = by[("blur", "negative", "t1")]
    assert r["weighted_better_fraction"] == pytest.approx(1 / 3)
    for key in [key for key in by if key[0] == "zeros" or key[2] == "t2"]:
        r = by[key]
        assert (r["original"], r["weighted"]) == (pytest.approx(0.3), pytest.approx(0.1)), key
        want = 0.0 if key[1] == "positive" else 1.0  # weighted lower: loses on positive, wins on negative
        assert r["weighted_better_fraction"] == want, key
    assert by[("zeros", "negative", "t2")]["kept_pixel_fraction"] == pytest.approx(0.5)


def test_summarize_with_no_kept_sample_is_nan_not_an_error():
    value = torch.zeros(1, 1, 2, 2, 2, 2)
    rows = mask.summarize(
        _results(value, torch.zeros(2, dtype=torch.long), torch.zeros(2, 2), torch.zeros(1, 2, 2, 2)),
        ["gradcam"],
        ["blur"],
        mask.FEATURES,
        4,
    )
    assert all(r["n"] == 0 for r in rows)
    assert all(
        r["original"] != r["original"] and r["weighted_better_fraction"] != r["weighted_better_fraction"] for r in rows
    )


def _row(features, cls, kind, original, weighted, n=5, method="la"):
    return dict(
        method=method, baseline=kind, features=features, cls=cls, n=n, before=0.5, original=original, weighted=weighted
    )


def _table_cells(text):
    """{(method, features, class): [cells]} from a review table."""
    lines = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    out = {}
    for line in lines:
        cells = [c.strip() for c in line.strip("|").split("|")]
        out[tuple(cells[:3])] = cells[3:]
    return out


def test_review_table_columns_and_bold_winner():
    rows = []
    for r in [
        _row("positive", "t1", "blur", 0.25, 0.75),  # W higher: W wins
        _row("positive", "t1", "zeros", 0.75, 0.25),  # O higher: O wins
        _row("negative", "t1", "blur", 0.25, 0.75),  # W higher: O wins (lower is better)
        _row("negative", "t1", "zeros", 0.75, 0.25),  # W lower: W wins
        _row("positive", "t2", "blur", 0.5, 0.5),  # tie: nothing bold
        _row("positive", "t2", "zeros", 0.125, 0.875),
    ]:
        r["class"] = r.pop("cls")
        rows.append(r)
    cells = _table_cells(mask.review_table(rows, ["blur", "zeros"]))
    assert mask.review_table(rows, ["blur", "zeros"]).splitlines()[0] == (
        "| method | features | class | n | before | blur: O / W | zeros: O / W |"
    )
    assert cells[("la", "positive", "t1")] == ["5", "0.500", "0.250 / **0.750**", "**0.750** / 0.250"]
    assert cells[("la", "negative", "t1")] == ["5", "0.500", "**0.250** / 0.750", "0.750 / **0.250**"]
    assert cells[("la", "positive", "t2")] == ["5", "0.500", "0.500 / 0.500", "0.125 / **0.875**"]


def _weighted_wins(cells):
    """Cells of a review table where W (the right number) is bold."""
    return sum(cell.split(" / ")[1].startswith("**") for row in cells.values() for cell in row[2:])


# The README's masking result (gradcam, digits_cnn, the 36 test digits with p_2 > 0.1, layer features.relu3):
# (features, class) -> (original, weighted) for blur, zeros, mean; weighted wins 10 of 12 cells.
README_GRADCAM = {
    ("positive", "t1"): [(0.764, 0.773), (0.738, 0.694), (0.661, 0.712)],
    ("positive", "t2"): [(0.391, 0.474), (0.586, 0.645), (0.546, 0.625)],
    ("negative", "t1"): [(0.579, 0.541), (0.486, 0.428), (0.432, 0.420)],
    ("negative", "t2"): [(0.326, 0.289), (0.542, 0.458), (0.416, 0.425)],
}


def test_mask_command_end_to_end_reproduces_the_readme_numbers(tmp_path, capsys):
    """`backprop-hooks mask` on the bundled digits: the reported table, CSV, JSON and per-sample file agree
    with each other, with the masking rule, and with the numbers the README states."""
    import csv
    import json

    from backprop_hooks import cli

    out = tmp_path / "mask"
    args = ["mask", "--model", "digits_cnn", "--data", "digits", "--methods", "gradcam", "--examples", "0"]
    assert cli.main([*args, "--quiet", "--out", str(out)]) == 0
    assert {"results.md", "results.csv", "results.json", "samples.csv", "figure_masking.png"} <= {
        p.name for p in out.iterdir()
    }
    rows = list(csv.DictReader((out / "results.csv").open()))
    samples = list(csv.DictReader((out / "samples.csv").open()))
    doc = json.loads((out / "results.json").read_text())
    assert doc["config"]["methods"] == {"gradcam": {"layer": "model.features.relu3"}}
    assert len(samples) == 450 and len(rows) == 3 * 2 * 2

    # the reference numbers
    kinds = ["blur", "zeros", "mean"]
    by = {(r["baseline"], r["features"], r["class"]): r for r in rows}
    for (feature, cls), cells in README_GRADCAM.items():
        for kind, (o, w) in zip(kinds, cells):
            r = by[(kind, feature, cls)]
            assert r["n"] == "36"
            assert (float(r["original"]), float(r["weighted"])) == (
                pytest.approx(o, abs=6e-4),
                pytest.approx(w, abs=6e-4),
            ), (kind, feature, cls)
    table = _table_cells((out / "results.md").read_text())
    assert _weighted_wins(table) == 10 and len(table) == 4

    # the table shows the CSV's numbers, the better map bold
    for (method, feature, cls), cells in table.items():
        assert cells[0] == "36"
        for kind, cell in zip(kinds, cells[2:]):
            r = by[(kind, feature, cls)]
            o, w = float(r["original"]), float(r["weighted"])
            assert cell.replace("**", "") == f"{o:.3f} / {w:.3f}"
            assert cell.split(" / ")[1].startswith("**") == ((w > o) == (feature == "positive"))

    # the JSON rows are the CSV rows
    assert [(r["baseline"], r["features"], r["class"]) for r in doc["rows"]] == list(by)
    for r in doc["rows"]:
        assert float(by[(r["baseline"], r["features"], r["class"])]["weighted"]) == pytest.approx(
            r["weighted"], rel=1e-5
        )

    # each summary row is the per-sample mean over the kept samples of samples.csv
    kept = [s for s in samples if s["kept"] == "1"]
    assert len(kept) == 36 and all(float(s["p2"]) > 0.1 for s in kept)
    assert all(float(s["p2"]) <= 0.1 for s in samples if s["kept"] == "0")
    for (kind, feature, cls), r in by.items():
        for name in ("original", "weighted"):
            per_sample = [float(s[f"gradcam_{kind}_{feature}_{cls}_{name}"]) for s in kept]
            assert float(r[name]) == pytest.approx(sum(per_sample) / 36, abs=2e-6)
        # samples.csv holds 6 significant digits: a win is certain where the two values differ by more
        pairs = [
            (float(s[f"gradcam_{kind}_{feature}_{cls}_weighted"]), float(s[f"gradcam_{kind}_{feature}_{cls}_original"]))
            for s in kept
        ]
        sure = sum(abs(w - o) > 1e-5 and (w > o) == (feature == "positive") for w, o in pairs)
        unsure = sum(abs(w - o) <= 1e-5 for w, o in pairs)
        assert sure / 36 - 1e-5 <= float(r["weighted_better_fraction"]) <= (sure + unsure) / 36 + 1e-5
        before = [float(s[f"before_{cls}"]) for s in kept]
        assert float(r["before"]) == pytest.approx(sum(before) / 36, abs=2e-6)
    for s in kept:  # t1 and t2 are the two top predicted classes, the relative probabilities sum to one
        assert s["t1"] != s["t2"]
        assert float(s["before_t1"]) + float(s["before_t2"]) == pytest.approx(1, abs=2e-6)
        assert float(s["before_t1"]) >= 0.5
