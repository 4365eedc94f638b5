"""``connect``: the one place where the fine-tuning module and the data module meet.

Each needs one fact from the other: the data module's ``preprocessing="model"`` datasets need the
model (its input size, mean and std), and the module needs the evaluation loaders' names and
scoring. ``connect`` hands both over explicitly, before the Trainer runs, so that neither reads
the other back through ``trainer.datamodule`` / ``trainer.lightning_module``. ``relreg
fit|validate|test|predict`` calls it after instantiating the classes; call it yourself when you
drive a ``Trainer`` from Python.

Example:
    >>> import pytorch_lightning as pl
    >>> from relreg.data import RelRegDataModule, SpuriousShapes
    >>> from relreg.lightning import RelRegModule, connect
    >>> module = RelRegModule("vit_tiny_patch16_224", num_classes=2,
    ...                       model_kwargs={"img_size": 32, "patch_size": 8})
    >>> data = RelRegDataModule(
    ...     val=SpuriousShapes("val", n=4), ood={"shifted": SpuriousShapes("ood", n=4)}
    ... )
    >>> connect(module, data)
    >>> [s.name for s in module.eval_splits]
    ['id', 'shifted']
"""

from __future__ import annotations

from relreg.data.datamodule import RelRegDataModule
from relreg.lightning.module import RelRegModule

__all__ = ["connect"]


def connect(module: RelRegModule, datamodule: RelRegDataModule) -> None:
    """Let ``datamodule``'s datasets follow ``module.model`` and tell ``module`` the evaluation
    splits of ``datamodule``.

    Args:
        module: the fine-tuning module.
        datamodule: its data.

    Raises:
        TypeError: either argument is of another type.
    """
    if not isinstance(module, RelRegModule):
        raise TypeError(f"Expected module a RelRegModule, but got {type(module).__name__}.")
    if not isinstance(datamodule, RelRegDataModule):
        raise TypeError(
            f"Expected datamodule a RelRegDataModule, but got {type(datamodule).__name__}."
        )
    datamodule.follow_model(module.model)
    module.set_eval_splits(datamodule.eval_splits())
