"""Deep Feature Reweighting: retrain only the last layer on a group-balanced held-out set.

Kirichenko, Izmailov & Wilson, *Last Layer Re-Training is Sufficient for Robustness to Spurious
Correlations*, ICLR 2023 ("DFR"). relreg implements **DFR^Val**, the paper's main variant, as
``dfr_evaluate_spurious.py`` of PolinaKirichenko/deep_feature_reweighting (commit 46666e6) runs
it for Waterbirds:

1. features: the frozen model's penultimate embeddings (timm's ``forward_head(...,
   pre_logits=True)``) of the held-out set (the paper: the validation split), eval transforms;
2. tuning: the held-out set is shuffled and halved; the second half is balanced by cutting every
   group to its smallest group's size and standardised (a ``StandardScaler`` fitted on it); for
   each ``C`` of ``C_GRID`` an L1 logistic regression (``liblinear``) is fitted there and scored by
   its worst-group accuracy on the first half (left unbalanced); the best ``C`` wins (ties: the
   larger ``C``, the grid's order);
3. the final head: ``num_retrains`` (20) logistic regressions with that ``C``, each on the whole
   held-out set balanced by a fresh subsample of every group to the smallest group's size; their
   coefficients and intercepts are averaged.

Where relreg differs: DFR's script fits the final standardiser on the *training* set's
embeddings; relreg fits it on the held-out set, which is all a user of this stage is asked to
provide (the scaler only rescales the features before an L1 penalty). The averaged classifier and
the standardiser are folded into the model's own linear head (``w / s``, ``b - w . m / s``), so
the result is the model itself with a new head. The class weights stay 1, as in DFR^Val's default
(``--balance_dfr_val``, no training data added).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from relreg.validate import check_positive_int

__all__ = ["C_GRID", "DFRResult", "deep_feature_reweighting", "embed"]

C_GRID = (1.0, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01)


@dataclass
class DFRResult:
    """What :func:`deep_feature_reweighting` chose and found.

    Attributes:
        c: the chosen inverse regularisation strength.
        tuning: ``{C: worst-group accuracy on the tuning half}``.
        weight, bias: the new head, ``(K, D)`` and ``(K,)``, in the model's feature space.
    """

    c: float
    tuning: dict[float, float]
    weight: Tensor
    bias: Tensor


@torch.no_grad()
def embed(
    model: nn.Module, dataset: Dataset, batch_size: int = 64
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Penultimate embeddings ``(N, D)``, labels ``(N,)`` and groups ``(N,)`` of a dataset whose
    samples carry ``group`` (the model in eval mode, as it is)."""
    device = next(model.parameters()).device
    feats, labels, groups = [], [], []
    for batch in DataLoader(dataset, batch_size=batch_size):
        if "group" not in batch:
            raise ValueError(
                "Expected a held-out set whose samples carry 'group' for DFR, but got one with "
                f"{sorted(batch)}."
            )
        x = batch["image"].to(device)
        feats.append(model.forward_head(model.forward_features(x), pre_logits=True).cpu())
        labels.append(batch["label"])
        groups.append(batch["group"])
    return (
        torch.cat(feats).double().numpy(),
        torch.cat(labels).numpy(),
        torch.cat(groups).numpy(),
    )


def _balanced(groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices with every present group cut to the smallest present group's size."""
    present = [np.flatnonzero(groups == g) for g in np.unique(groups)]
    smallest = min(len(p) for p in present)
    return np.concatenate([rng.permutation(p)[:smallest] for p in present])


def _worst_group(pred: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> float:
    return min(float((pred[groups == g] == labels[groups == g]).mean()) for g in np.unique(groups))


def _logreg(c: float):  # noqa: ANN202
    try:
        import sklearn
        from sklearn.linear_model import LogisticRegression
    except ImportError as err:  # pragma: no cover - scikit-learn ships with relreg[scenes]
        raise ImportError("DFR needs scikit-learn: pip install 'relreg[scenes]'.") from err
    # scikit-learn 1.8 spells the L1 penalty l1_ratio=1 (penalty= is deprecated there)
    major, minor = (int(p) for p in sklearn.__version__.split(".")[:2])
    l1 = {"l1_ratio": 1.0} if (major, minor) >= (1, 8) else {"penalty": "l1"}
    # liblinear visits the samples in a random order: a fixed state makes the fits reproducible
    return LogisticRegression(C=c, solver="liblinear", random_state=0, **l1)


def _fit(c: float, x: np.ndarray, y: np.ndarray):  # noqa: ANN202
    """DFR's L1 logistic regression; one-vs-rest for more than 2 classes (liblinear is binary in
    scikit-learn >= 1.8; its older multiclass mode was the same one-vs-rest)."""
    if len(np.unique(y)) <= 2:
        return _logreg(c).fit(x, y)
    from sklearn.multiclass import OneVsRestClassifier

    return OneVsRestClassifier(_logreg(c)).fit(x, y)


def _coefficients(clf) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001
    """``(1 or K, D)`` coefficients and intercepts of a fitted :func:`_fit`."""
    if hasattr(clf, "estimators_"):
        return (
            np.concatenate([e.coef_ for e in clf.estimators_]),
            np.concatenate([e.intercept_ for e in clf.estimators_]),
        )
    return clf.coef_, clf.intercept_


def _as_head(coef: np.ndarray, intercept: np.ndarray, classes: np.ndarray, num: int):  # noqa: ANN202
    """sklearn's ``(1 or K, D)`` coefficients as a ``(num, D)`` linear head's weight and bias."""
    weight = np.zeros((num, coef.shape[1]))
    bias = np.zeros(num)
    if coef.shape[0] == 1:  # binary: the logit of classes[1] against classes[0]
        weight[classes[1]], bias[classes[1]] = coef[0], intercept[0]
    else:
        weight[classes], bias[classes] = coef, intercept
    return weight, bias


def deep_feature_reweighting(
    model: nn.Module,
    held_out: Dataset,
    *,
    c_grid: Sequence[float] = C_GRID,
    num_retrains: int = 20,
    seed: int = 0,
    batch_size: int = 64,
) -> DFRResult:
    """Retrain ``model``'s linear head on a group-balanced held-out set, in place (DFR^Val; see
    the module docstring).

    Args:
        model: a timm classifier with ``forward_features``, ``forward_head(pre_logits=True)`` and
            a linear head (``get_classifier()``); only its head changes.
        held_out: samples with ``group`` (the paper: the validation split).
        c_grid: the inverse L1 strengths tried (DFR's).
        num_retrains: the final fits averaged (DFR's 20).
        seed: seed of the halving and the balanced subsamples.
        batch_size: images per forward pass of the embeddings.

    Returns:
        The chosen ``C``, the tuning scores and the new head; the model carries it.
    """
    check_positive_int("num_retrains", num_retrains)
    if not c_grid or any(not c > 0 for c in c_grid):
        raise ValueError(f"Expected a non-empty c_grid of positive values, but got {c_grid!r}.")
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, nn.Linear):
        raise TypeError(
            f"Expected a model with a linear head (timm's get_classifier()), but got {head!r}."
        )
    from sklearn.preprocessing import StandardScaler

    was_training = model.training
    model.eval()
    x, y, g = embed(model, held_out, batch_size)
    model.train(was_training)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    tune, fit = order[: len(x) // 2], order[len(x) // 2 :]
    fit = fit[_balanced(g[fit], rng)]
    scaler = StandardScaler().fit(x[fit])
    scores = {}
    for c in c_grid:
        clf = _fit(c, scaler.transform(x[fit]), y[fit])
        scores[float(c)] = _worst_group(clf.predict(scaler.transform(x[tune])), y[tune], g[tune])
    best = max(scores, key=lambda c: scores[c])  # the first of the best: the grid's order
    scaler = StandardScaler().fit(x)
    coefs, intercepts = [], []
    for _ in range(num_retrains):
        idx = _balanced(g, rng)
        clf = _fit(best, scaler.transform(x[idx]), y[idx])
        coef, intercept = _coefficients(clf)
        coefs.append(coef)
        intercepts.append(intercept)
    coef, intercept = np.mean(coefs, axis=0), np.mean(intercepts, axis=0)
    coef = coef / scaler.scale_  # fold the standardiser into the head
    intercept = intercept - coef @ scaler.mean_
    weight, bias = _as_head(coef, intercept, clf.classes_, head.out_features)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(weight).to(head.weight))
        if head.bias is not None:
            head.bias.copy_(torch.from_numpy(bias).to(head.bias))
    return DFRResult(best, scores, head.weight.detach().clone(), head.bias.detach().clone())
