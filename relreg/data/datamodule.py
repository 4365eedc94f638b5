"""``RelRegDataModule``: train (masked), validation, test and any number of named OOD splits.

Any ``torch.utils.data.Dataset`` that yields :class:`relreg.data.Sample` dicts can be plugged in,
from Python or from a LightningCLI config (``class_path`` / ``init_args``). The validation and test
loaders are the in-distribution split followed by the OOD splits, in the order of
:meth:`~RelRegDataModule.eval_splits`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from relreg.data.eval_split import EvalSplit, num_groups_of
from relreg.data.sample import Sample
from relreg.metrics import scoring_classes
from relreg.validate import check_choice, check_positive_int

__all__ = ["EpochShuffleSampler", "RelRegDataModule"]

log = logging.getLogger(__name__)

REQUIRED_KEYS = tuple(k for k in Sample.__annotations__ if k in Sample.__required_keys__)


def _check_sample(name: str, dataset: Dataset) -> None:
    sample = dataset[0]
    missing = [k for k in REQUIRED_KEYS if not isinstance(sample, dict) or k not in sample]
    if missing:
        got = sorted(sample) if isinstance(sample, dict) else type(sample).__name__
        raise ValueError(
            f"Expected {name} samples as dicts with keys {REQUIRED_KEYS}, but got {got} "
            f"(missing {missing})."
        )


class EpochShuffleSampler(RandomSampler):
    """A shuffle that is a function of ``(seed, epoch)`` only, not of what ran before.

    Lightning calls ``set_epoch`` at the start of every epoch, so a run resumed from a checkpoint
    (``relreg fit --ckpt_path last``) sees the same order of batches as an uninterrupted run.
    Under DDP Lightning replaces it (a ``RandomSampler``) with its ``DistributedSampler``, which is
    seeded and epoch-driven in the same way.

    Args:
        data_source: the dataset.
        seed: base seed.
    """

    def __init__(self, data_source: Dataset, seed: int = 0) -> None:
        super().__init__(data_source)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        yield from torch.randperm(len(self.data_source), generator=g).tolist()


BALANCE = ("group", "class")


class BalancedSampler(EpochShuffleSampler):
    """Draws ``len(dataset)`` indices per epoch with replacement, each group (or class) equally
    often in expectation: weight ``1 / count`` of the sample's group (``dataset.groups``) or
    class (``dataset.labels``). A function of ``(seed, epoch)`` only, like
    :class:`EpochShuffleSampler`; under DDP Lightning shards its indices.

    Args:
        data_source: a dataset with ``groups`` (``by="group"``) or ``labels`` (``by="class"``).
        by: ``"group"`` or ``"class"``.
        seed: base seed.
    """

    def __init__(self, data_source: Dataset, by: str = "group", seed: int = 0) -> None:
        check_choice("balance", by, BALANCE)
        super().__init__(data_source, seed)
        inner = getattr(data_source, "dataset", data_source)
        attribute = "groups" if by == "group" else "labels"
        keys = getattr(inner, attribute, None)
        if keys is None:
            raise ValueError(
                f"Expected a train dataset with {attribute!r} for balance={by!r}, but "
                f"{type(inner).__name__} has none."
            )
        keys = torch.as_tensor(keys)
        if hasattr(data_source, "indices"):  # torch.utils.data.Subset
            keys = keys[torch.as_tensor(data_source.indices)]
        counts = torch.bincount(keys)
        self.weights = 1.0 / counts[keys].double()

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        n = len(self.weights)
        yield from torch.multinomial(self.weights, n, replacement=True, generator=g).tolist()


class RelRegDataModule(pl.LightningDataModule):
    """Wire datasets into loaders.

    Args:
        train: training set (samples with or without masks).
        val: in-distribution validation set (the paper: 414 masked images); None skips validation.
        test: in-distribution test set; None uses ``val``.
        ood: named OOD splits, e.g. ``{"imagenet_r": OODImageFolder(...)}``; evaluated with ``val``
            and ``test``, logged as ``ood/<name>/...``.
        batch_size: per-device batch size (the paper: 8).
        eval_batch_size: batch size of the evaluation loaders (default: ``batch_size``).
        num_workers: loader workers.
        seed: seed of the training shuffle (:class:`EpochShuffleSampler`: the order of each epoch
            depends on ``seed`` and the epoch only, so resumed runs repeat it).
        balance: None (shuffle), ``"group"`` or ``"class"``: sample the training set so that each
            group or class comes equally often (:class:`BalancedSampler`; GroupDRO's and DFR's
            setting on Waterbirds).

    Every dataset built with ``preprocessing="model"`` takes the preprocessing of the model it is
    given by :meth:`follow_model` (:func:`relreg.lightning.connect` gives it the module's
    ``model``; ``setup`` refuses to run before); what each split uses is kept in
    :attr:`preprocessing`, logged at INFO level and sent to the loggers in ``setup`` as the
    ``data/preprocessing`` hyperparameter. The module learns the evaluation loaders' names and
    scoring from :meth:`eval_splits`, through the same :func:`relreg.lightning.connect`.
    """

    def __init__(
        self,
        train: Dataset | None = None,
        val: Dataset | None = None,
        test: Dataset | None = None,
        ood: dict[str, Dataset] | None = None,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        balance: str | None = None,
    ) -> None:
        super().__init__()
        check_positive_int("batch_size", batch_size)
        if balance is not None:
            check_choice("balance", balance, BALANCE)
            if train is not None:
                BalancedSampler(train, balance, seed)  # refuse a dataset without groups now
        self.balance = balance
        self.train_set = train
        self.val_set = val
        self.test_set = test if test is not None else val
        self.ood = dict(ood or {})
        for name, ds in {"train": train, "val": val, "test": self.test_set, **self.ood}.items():
            if ds is not None:
                if len(ds) == 0:
                    raise ValueError(f"Expected a non-empty {name} dataset, but it has no samples.")
                _check_sample(name, ds)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.preprocessing: dict[str, dict] = {}

    def _named_sets(self) -> dict[str, Dataset]:
        sets = {"train": self.train_set, "val": self.val_set, "test": self.test_set, **self.ood}
        return {name: ds for name, ds in sets.items() if ds is not None}

    def setup(self, stage: str) -> None:
        """Check that every ``preprocessing="model"`` dataset has followed a model, and send
        what each split uses to the loggers.

        Raises:
            ValueError: a dataset still awaits a model (:func:`relreg.lightning.connect` or
                :meth:`follow_model` was not called).
        """
        awaiting = [
            name
            for name, ds in self._named_sets().items()
            if getattr(getattr(ds, "dataset", ds), "awaiting_model", False)
        ]
        if awaiting:
            raise ValueError(
                f"Expected every preprocessing='model' dataset to have followed a model, but "
                f"{awaiting} have not; call relreg.lightning.connect(module, datamodule) (the "
                "CLI does) or datamodule.follow_model(model) before the Trainer runs."
            )
        trainer = getattr(self, "trainer", None)
        if trainer is not None and self.preprocessing:
            for logger in trainer.loggers:
                logger.log_hyperparams({"data/preprocessing": self.preprocessing})

    def follow_model(self, model: torch.nn.Module) -> dict[str, dict]:
        """Let every dataset that can (:class:`relreg.data.FollowsModel`, also inside a
        ``Subset``) follow ``model``; returns and stores ``{split: preprocessing info}``."""
        for name, ds in self._named_sets().items():
            inner = getattr(ds, "dataset", ds)  # torch.utils.data.Subset
            if hasattr(inner, "follow_model"):
                inner.follow_model(model)
                self.preprocessing[name] = inner.preprocessing_info()
        for name, info in self.preprocessing.items():
            log.info("preprocessing of %s: %s", name, info)
        return self.preprocessing

    def eval_splits(self) -> list[EvalSplit]:
        """The evaluation loaders, in order: ``"id"`` (val or test) then the OOD splits, each
        with the classes its predictions are scored on and the number of its groups (the id
        split's from the validation set, else the test set)."""
        ood = [
            EvalSplit(name, scoring_classes(ds), num_groups_of(ds)) for name, ds in self.ood.items()
        ]
        id_set = self.val_set if self.val_set is not None else self.test_set
        return [EvalSplit("id", None, num_groups_of(id_set)), *ood]

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        sampler = None
        if shuffle:
            sampler = (
                EpochShuffleSampler(dataset, self.seed)
                if self.balance is None
                else BalancedSampler(dataset, self.balance, self.seed)
            )
        return DataLoader(
            dataset,
            batch_size=self.batch_size if shuffle else self.eval_batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            raise ValueError(
                "Expected a train dataset for fitting, but RelRegDataModule(train=None)."
            )
        return self._loader(self.train_set, shuffle=True)

    def _eval_loaders(self, main: Dataset | None) -> list[DataLoader]:
        sets = ([main] if main is not None else []) + list(self.ood.values())
        return [self._loader(ds, shuffle=False) for ds in sets]

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders(self.val_set)

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders(self.test_set)

    def predict_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders(self.test_set)
