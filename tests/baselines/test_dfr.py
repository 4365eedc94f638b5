"""DFR^Val: the retrained head fixes a head that reads a spurious feature, equals the steps of
``dfr_evaluate_spurious.py`` (PolinaKirichenko/deep_feature_reweighting) run by hand with
scikit-learn on the same embeddings, and refuses what it cannot use."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

pytest.importorskip("sklearn")

from relreg.baselines import deep_feature_reweighting, embed  # noqa: E402
from relreg.baselines.dfr import _balanced  # noqa: E402


class FeatureModel(nn.Module):
    """A 'timm' classifier whose features are its input: forward_features / forward_head."""

    def __init__(self, dim: int = 2, classes: int = 2) -> None:
        super().__init__()
        self.head = nn.Linear(dim, classes)

    def forward_features(self, x):
        return x

    def forward_head(self, x, pre_logits=False):
        return x if pre_logits else self.head(x)

    def get_classifier(self):
        return self.head

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


class Points(Dataset):
    """y in {0, 1}; a core feature (y with noise) and a spurious one (agrees with y in the
    majority groups); group = 2 y + spurious side."""

    def __init__(self, n: int, agree: float, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, 2, (n,), generator=g)
        side = torch.where(torch.rand(n, generator=g) < agree, self.y, 1 - self.y)
        core = (2.0 * self.y - 1) + 0.7 * torch.randn(n, generator=g)
        spurious = 3.0 * (2.0 * side - 1) + 0.3 * torch.randn(n, generator=g)
        self.x = torch.stack([core, spurious], 1)
        self.group = 2 * self.y + side

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"image": self.x[i], "label": self.y[i], "group": self.group[i]}


def worst_group(model, data):
    with torch.no_grad():
        pred = model(data.x).argmax(1)
    return min(
        (pred[data.group == k] == data.y[data.group == k]).float().mean().item() for k in range(4)
    )


def test_dfr_repairs_a_head_that_reads_the_spurious_feature():
    model = FeatureModel()
    with torch.no_grad():  # the biased model: it reads the spurious feature only
        model.head.weight.copy_(torch.tensor([[0.0, -1.0], [0.0, 1.0]]))
        model.head.bias.zero_()
    test = Points(2000, agree=0.5, seed=2)
    before = worst_group(model, test)
    result = deep_feature_reweighting(model, Points(400, agree=0.8, seed=1), num_retrains=5)
    after = worst_group(model, test)
    assert before < 0.2 and after > 0.75
    assert result.c in (1.0, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01) and len(result.tuning) == 7
    assert abs(model.head.weight[1, 0] - model.head.weight[0, 0]) > abs(
        model.head.weight[1, 1] - model.head.weight[0, 1]
    )  # the core feature now weighs more than the spurious one


def test_the_head_equals_dfrs_steps_run_by_hand():
    from sklearn.preprocessing import StandardScaler

    from relreg.baselines.dfr import _logreg as LogisticRegression  # DFR's l1 / liblinear fit

    data = Points(300, agree=0.8, seed=4)
    model = FeatureModel()
    result = deep_feature_reweighting(model, data, c_grid=(0.3, 0.1), num_retrains=3, seed=7)
    # by hand, with the same random stream: halve, balance, tune C, then 3 balanced refits
    x, y, g = embed(FeatureModel(), data)
    rng = np.random.default_rng(7)
    order = rng.permutation(len(x))
    tune, fit = order[: len(x) // 2], order[len(x) // 2 :]
    fit = fit[_balanced(g[fit], rng)]
    scaler = StandardScaler().fit(x[fit])
    scores = {}
    for c in (0.3, 0.1):
        clf = LogisticRegression(c).fit(scaler.transform(x[fit]), y[fit])
        pred = clf.predict(scaler.transform(x[tune]))
        scores[c] = min((pred[g[tune] == k] == y[tune][g[tune] == k]).mean() for k in range(4))
    assert result.tuning == pytest.approx(scores)
    best = max(scores, key=scores.get)
    scaler = StandardScaler().fit(x)
    fits = []
    for _ in range(3):
        idx = _balanced(g, rng)
        fits.append(LogisticRegression(best).fit(scaler.transform(x[idx]), y[idx]))
    decision = np.mean([f.decision_function(scaler.transform(x)) for f in fits], axis=0)
    with torch.no_grad():
        logits = model(data.x).double()
    np.testing.assert_allclose(
        (logits[:, 1] - logits[:, 0]).numpy(), decision, rtol=1e-6, atol=1e-9
    )


def test_bad_input_is_named():
    model = FeatureModel()
    data = Points(40, agree=0.8, seed=0)
    with pytest.raises(ValueError, match="Expected a non-empty c_grid"):
        deep_feature_reweighting(model, data, c_grid=())
    with pytest.raises(ValueError, match="Expected num_retrains"):
        deep_feature_reweighting(model, data, num_retrains=0)

    class NoGroups(Points):
        def __getitem__(self, i):
            return {"image": self.x[i], "label": self.y[i]}

    with pytest.raises(ValueError, match="carry 'group'"):
        deep_feature_reweighting(model, NoGroups(40, 0.8, 0))
    model.head = nn.Sequential()
    with pytest.raises(TypeError, match="linear head"):
        deep_feature_reweighting(model, data)


def test_more_than_two_classes_get_a_one_vs_rest_head():
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.preprocessing import StandardScaler

    from relreg.baselines.dfr import _logreg

    g = torch.Generator().manual_seed(0)
    y = torch.arange(90) % 3
    x = torch.nn.functional.one_hot(y, 3).float() * 2 + 0.5 * torch.randn(90, 3, generator=g)

    class Three(Points):
        def __init__(self):
            self.x, self.y, self.group = x, y, y

    model = FeatureModel(dim=3, classes=3)
    deep_feature_reweighting(model, Three(), c_grid=(0.3,), num_retrains=1)
    with torch.no_grad():
        pred = model(x).argmax(1)
    assert (pred == y).float().mean() > 0.9
    scaler = StandardScaler().fit(x.numpy())
    ovr = OneVsRestClassifier(_logreg(0.3)).fit(scaler.transform(x.numpy()), y.numpy())
    assert (ovr.predict(scaler.transform(x.numpy())) == pred.numpy()).mean() > 0.95
