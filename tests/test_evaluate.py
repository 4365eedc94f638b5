"""``relreg evaluate`` and :mod:`relreg.evaluation`: the report equals the metrics computed
directly, does not depend on the batch size, handles images without masks, and the command writes
the report and its figures or fails clearly before doing any work; the library takes typed
arguments (:class:`ModelSources`, :class:`EvaluationSettings`), never an argparse namespace."""

from __future__ import annotations

import json

import pytest
import timm
import torch

from relreg.cli import main
from relreg.data import SpuriousShapes, load_split, write_shapes_folder
from relreg.evaluation import evaluate_models
from relreg.explain import explain, to_pixels
from relreg.metrics import PerturbationAUC, relevance_mass, report_keys, segmentation_agreement
from relreg.models import lightning_model_args

TINY = dict(img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=2)


# the smallest evaluation: two OOD images, one explainer, one perturbation step, no heatmaps
_QUICK = [
    "--data",
    "shapes:ood:2",
    "--methods",
    "raw_attention",
    "--steps",
    "1",
    "--num-heatmaps",
    "0",
]


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=4, **TINY).eval()


def test_report_equals_the_metrics_on_the_whole_set_and_not_the_batch_size():
    model = _model()
    data = SpuriousShapes("test", n=10, masked_fraction=0.6)
    kw = dict(methods=["chefer", "rollout"], steps=4, progress=False)
    small = evaluate_models({"m": model}, data, batch_size=3, **kw)
    whole = evaluate_models({"m": model}, data, batch_size=10, **kw)
    for method in kw["methods"]:
        a = small["models"]["m"]["explainers"][method]
        b = whole["models"]["m"]["explainers"][method]
        for key in report_keys():
            assert a[key] == pytest.approx(b[key], abs=2e-4), (method, key)
    # naive reference: all images at once, straight from the metric functions
    images = torch.stack([data[i]["image"] for i in range(10)])
    labels = torch.stack([data[i]["label"] for i in range(10)])
    masks = torch.stack([data[i]["mask"] for i in range(10)])
    has = data.has_mask[:10]
    maps = explain(model, images, "chefer")
    pixels = to_pixels(maps, size=(32, 32))
    entry = small["models"]["m"]
    ref = segmentation_agreement(pixels[has], masks[has])
    for key in ("pixel_accuracy", "miou", "map"):
        assert entry["explainers"]["chefer"][key] == pytest.approx(float(ref[key]), abs=1e-4)
    for key, convention in (("relevance_mass", "positive"), ("relevance_mass_minmax", "minmax")):
        mass = relevance_mass(maps[has], masks[has], convention=convention)
        assert entry["explainers"]["chefer"][key] == pytest.approx(float(mass), abs=1e-4)
    auc = PerturbationAUC(model, mode="negative")
    auc.update(images, maps, None)
    assert entry["explainers"]["chefer"]["perturbation_negative"] == pytest.approx(
        float(auc.compute()), abs=1e-3
    )
    assert entry["accuracy"]["data"] == pytest.approx(
        float((model(images).argmax(1) == labels).float().mean()), abs=1e-4
    )
    assert entry["n_images"] == 10 and entry["n_masked"] == int(has.sum())
    assert len(entry["explainers"]["chefer"]["curves"]["positive"]) == len(small["fractions"])


def test_without_masks_the_localization_metrics_are_null_and_the_report_is_json():
    report = evaluate_models(
        {"m": _model()},
        SpuriousShapes("ood", n=4, masked_fraction=0.0),
        methods=["raw_attention"],
        ood={"shifted": SpuriousShapes("ood", n=5)},
        steps=2,
        progress=False,
    )
    entry = report["models"]["m"]
    assert entry["explainers"]["raw_attention"]["miou"] is None
    assert entry["explainers"]["raw_attention"]["perturbation_positive"] is not None
    assert set(entry["accuracy"]) == {"data", "shifted"}
    assert entry["ood_mean"] == entry["accuracy"]["shifted"]
    json.dumps(report)


def test_evaluate_models_errors():
    data = SpuriousShapes("ood", n=2)
    with pytest.raises(ValueError, match="Unknown explainer 'nope'"):
        evaluate_models({"m": _model()}, data, methods=["nope"], progress=False)
    with pytest.raises(
        ValueError, match=r"Expected target one of \('predicted', 'label'\), but got 'foil'"
    ):
        evaluate_models({"m": _model()}, data, target="foil", progress=False)
    with pytest.raises(ValueError, match="limit an int >= 1"):
        evaluate_models({"m": _model()}, data, limit=0, progress=False)
    with pytest.raises(ValueError, match="at least one model"):
        evaluate_models({}, data, progress=False)


def test_load_split_specs_and_folders(tmp_path):
    model = _model()
    shapes = load_split("shapes:val:5", model)
    assert len(shapes) == 5 and shapes[0]["image"].shape == (3, 32, 32)
    root = write_shapes_folder(tmp_path / "split", "ood", n=6, size=32, num_classes=4)
    masked = load_split(str(root), model)
    assert len(masked) == 6 and bool(masked[0]["has_mask"])
    ood = load_split(str(root / "images"), model, masks=False)
    assert len(ood) == 6 and not bool(ood[0]["has_mask"])
    for spec, match in [
        ("shapes:nope", "shapes:SPLIT"),
        ("shapes:ood:0", "shapes:SPLIT"),
        (str(tmp_path / "missing"), "data folder or a 'shapes:SPLIT'"),
        (str(root / "images"), "no images/ folder"),
    ]:
        with pytest.raises((ValueError, FileNotFoundError), match=match):
            load_split(spec, model)


def _lightning_checkpoint(path, seed: int) -> None:
    """A file laid out like a ``relreg fit`` checkpoint: prefixed weights, hyper-parameters."""
    state = {f"model.{k}": v for k, v in _model(seed).state_dict().items()}
    hparams = {"model": "vit_tiny_patch16_224", "num_classes": 4, "model_kwargs": TINY}
    torch.save({"state_dict": state, "hyper_parameters": hparams, "global_step": 1}, path)


def test_lightning_model_args(tmp_path):
    _lightning_checkpoint(tmp_path / "a.ckpt", 0)
    assert lightning_model_args(tmp_path / "a.ckpt") == {
        "name": "vit_tiny_patch16_224",
        "num_classes": 4,
        **TINY,
    }
    torch.save(_model().state_dict(), tmp_path / "plain.pt")
    assert lightning_model_args(tmp_path / "plain.pt") is None
    (tmp_path / "junk.ckpt").write_text("not a checkpoint")
    assert lightning_model_args(tmp_path / "junk.ckpt") is None
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        lightning_model_args(tmp_path / "missing.ckpt")


def test_command_writes_report_and_figures_and_never_overwrites(tmp_path, capsys):
    _lightning_checkpoint(tmp_path / "before.ckpt", 0)
    _lightning_checkpoint(tmp_path / "after.ckpt", 1)
    ood_root = write_shapes_folder(tmp_path / "ood", "ood", n=5, size=32, num_classes=4)
    out = tmp_path / "out"
    args = [
        "evaluate",
        "--checkpoint",
        str(tmp_path / "before.ckpt"),
        str(tmp_path / "after.ckpt"),
        "--data",
        "shapes:ood:6",
        "--ood",
        f"folder={ood_root / 'images'}",
        "gen=shapes:ood:4",
        "--methods",
        "chefer",
        "rollout",
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--num-heatmaps",
        "2",
        "--sanity",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert list(report["models"]) == ["before", "after"]
    sanity = report["sanity"]["after"]["rollout"]
    assert sanity["steps"][0] == "head" and sanity["spearman"][0] == 1.0  # rollout ignores the head
    assert (out / "sanity_chefer.png").stat().st_size > 5000
    assert set(report["models"]["after"]["accuracy"]) == {"data", "folder", "gen"}
    assert report["checkpoints"]["after"] == str(tmp_path / "after.ckpt")
    assert report["preprocessing"]["folder"]["source"].startswith("model:vit_tiny")
    assert report["preprocessing"]["gen"] == "model's mean/std"
    # the two checkpoints are different models: their reports differ
    before, after = (report["models"][k]["explainers"]["chefer"] for k in ("before", "after"))
    assert before["curves"] != after["curves"]
    for name in ("perturbation_curves", "ood_accuracy", "before_after", "heatmaps"):
        assert (out / f"{name}.png").stat().st_size > 5000, name
    assert "evaluate before" in capsys.readouterr().err  # the progress bar
    written = (out / "report.json").read_bytes()
    assert main(args) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert (out / "report.json").read_bytes() == written


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--ood", "noequals"], "NAME=SPEC"),
        (["--ood", "data=shapes:ood"], "NAME=SPEC"),
        (["--labels", "one", "two"], "one label per model (--labels)"),
        (["--num-heatmaps", "-1"], "num_heatmaps >= 0 (--num-heatmaps)"),
    ],
)
def test_command_errors_name_the_argument(tmp_path, capsys, extra, message):
    _lightning_checkpoint(tmp_path / "a.ckpt", 0)
    args = [
        "evaluate",
        "--checkpoint",
        str(tmp_path / "a.ckpt"),
        "--data",
        "shapes:ood:2",
        "--out",
        str(tmp_path / "out"),
        *extra,
    ]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "report.json").exists()


def test_command_needs_model_for_plain_weights_and_a_writable_out(tmp_path, capsys):
    torch.save(_model().state_dict(), tmp_path / "plain.pt")
    base = ["evaluate", "--checkpoint", str(tmp_path / "plain.pt"), "--data", "shapes:ood:2"]
    assert main([*base, "--out", str(tmp_path / "out")]) == 2
    assert "Expected a model name (--model NAME)" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert main([*base, "--out", str(tmp_path / "file" / "sub")]) == 2
    assert "writable output directory" in capsys.readouterr().err
    arch = [
        "--model",
        "vit_tiny_patch16_224",
        "--num-classes",
        "4",
        "--model-kwargs",
        json.dumps(TINY),
    ]
    assert (
        main(
            [
                *base,
                *arch,
                "--methods",
                "rollout",
                "--steps",
                "1",
                "--num-heatmaps",
                "0",
                "--out",
                str(tmp_path / "ok"),
            ]
        )
        == 0
    )
    assert (tmp_path / "ok" / "report.json").is_file()
    assert not (tmp_path / "ok" / "heatmaps.png").exists()


def test_same_named_checkpoints_are_labelled_by_their_folders(tmp_path):
    for run, seed in (("bias", 0), ("relreg-seed0", 1)):
        (tmp_path / run).mkdir()
        _lightning_checkpoint(tmp_path / run / "final.ckpt", seed)
    out = tmp_path / "out"
    args = [
        "evaluate",
        "--checkpoint",
        str(tmp_path / "bias" / "final.ckpt"),
        str(tmp_path / "relreg-seed0" / "final.ckpt"),
        *_QUICK,
        "--out",
        str(out),
    ]
    assert main(args) == 0
    assert list(json.loads((out / "report.json").read_text())["models"]) == ["bias", "relreg-seed0"]


def test_model_flag_keeps_the_checkpoints_architecture_and_mismatches_are_refused(tmp_path, capsys):
    _lightning_checkpoint(tmp_path / "a.ckpt", 0)
    base = ["evaluate", *_QUICK]
    # --model with a fit checkpoint: its stored num_classes and model_kwargs still apply
    assert (
        main(
            [
                *base,
                "--checkpoint",
                str(tmp_path / "a.ckpt"),
                "--model",
                "vit_tiny_patch16_224",
                "--out",
                str(tmp_path / "o1"),
            ]
        )
        == 0
    )
    assert main([*base, "--pretrained", "--out", str(tmp_path / "o2")]) == 2
    assert "(--model NAME) with pretrained weights" in capsys.readouterr().err
    other = {**TINY, "img_size": 48}
    torch.manual_seed(0)
    wide = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=4, **other)
    state = {f"model.{k}": v for k, v in wide.state_dict().items()}
    hparams = {"model": "vit_tiny_patch16_224", "num_classes": 4, "model_kwargs": other}
    torch.save({"state_dict": state, "hyper_parameters": hparams}, tmp_path / "wide.ckpt")
    args = [
        *base,
        "--checkpoint",
        str(tmp_path / "a.ckpt"),
        str(tmp_path / "wide.ckpt"),
        "--out",
        str(tmp_path / "o3"),
    ]
    assert main(args) == 2
    assert "same input size, mean and std" in capsys.readouterr().err


def test_shapes_specs_follow_the_models_per_channel_normalisation():
    model = timm.create_model(
        "deit_tiny_patch16_224", pretrained=False, num_classes=4, **TINY
    ).eval()  # ImageNet mean and std
    data = load_split("shapes:ood:3", model)
    raw = SpuriousShapes("ood", n=3, mean=0.0, std=1.0)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    torch.testing.assert_close(data[0]["image"], (raw[0]["image"] - mean) / std)
    with pytest.raises(ValueError, match="Expected std a number or 3 numbers > 0"):
        SpuriousShapes("ood", n=2, std=(0.5, 0.0, 0.5))


def test_folder_specs_take_the_models_preprocessing_or_robustvits(tmp_path):
    from relreg.data import Preprocessing

    model = timm.create_model(
        "deit_tiny_patch16_224", pretrained=False, num_classes=4, **TINY
    ).eval()
    root = write_shapes_folder(tmp_path / "ood", "ood", n=3, size=32, num_classes=4) / "images"
    assert load_split(str(root), model, masks=False).preprocessing == Preprocessing.from_model(
        model
    )
    fixed = load_split(str(root), model, masks=False, preprocessing="robustvit")
    assert fixed.preprocessing == Preprocessing.robustvit(32)
    with pytest.raises(ValueError, match="preprocessing"):
        load_split(str(root), model, masks=False, preprocessing="imagenet")


def test_model_from_checkpoint_builds_the_stored_architecture(tmp_path):
    from relreg.models import model_from_checkpoint

    _lightning_checkpoint(tmp_path / "a.ckpt", 0)
    model = model_from_checkpoint(tmp_path / "a.ckpt")
    stored = torch.load(tmp_path / "a.ckpt", weights_only=True)["state_dict"]
    assert not model.training and model.num_classes == 4
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, stored[f"model.{name}"])
    torch.save(_model().state_dict(), tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="relreg fit checkpoint.*build_model"):
        model_from_checkpoint(tmp_path / "plain.pt")


def test_model_sources_label_the_models_and_refuse_bad_combinations(tmp_path):
    from relreg.evaluation import ModelSources

    a = tmp_path / "bias" / "final.ckpt"
    b = tmp_path / "relreg" / "final.ckpt"
    assert ModelSources([tmp_path / "x.ckpt"]).sources() == {"x": tmp_path / "x.ckpt"}
    assert ModelSources([a, b]).sources() == {"bias": a, "relreg": b}  # stems clash: folders
    both = ModelSources([a], pretrained=True, model="vit_tiny_patch16_224", labels=("m", "t"))
    assert both.sources() == {"m": a, "t": None}
    with pytest.raises(ValueError, match="with pretrained weights"):
        ModelSources(pretrained=True).sources()
    with pytest.raises(ValueError, match="but got neither"):
        ModelSources().sources()
    with pytest.raises(ValueError, match="one label per model"):
        ModelSources([a, b], labels=("one",)).sources()
    with pytest.raises(ValueError, match="distinct model labels"):
        ModelSources([a, b], labels=("same", "same")).sources()


def test_evaluation_models_rebuild_checkpoints_with_typed_overrides(tmp_path):
    from relreg.evaluation import ModelSources, evaluation_models

    _lightning_checkpoint(tmp_path / "a.ckpt", 0)
    _lightning_checkpoint(tmp_path / "b.ckpt", 1)
    models = evaluation_models(ModelSources(checkpoints=[tmp_path / "a.ckpt", tmp_path / "b.ckpt"]))
    assert list(models) == ["a", "b"]
    stored = torch.load(tmp_path / "b.ckpt", weights_only=True)["state_dict"]
    for name, value in models["b"].state_dict().items():
        torch.testing.assert_close(value, stored[f"model.{name}"])
    assert models["a"].patch_embed.img_size == (32, 32)  # the stored model_kwargs
    # a given num_classes overrides the stored one: the 4-class head no longer fits
    with pytest.raises((ValueError, RuntimeError), match="head"):
        evaluation_models(ModelSources(checkpoints=[tmp_path / "a.ckpt"], num_classes=7))
    torch.save(_model().state_dict(), tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="does not name its architecture"):
        evaluation_models(ModelSources(checkpoints=[tmp_path / "plain.pt"]))
    plain = ModelSources(
        [tmp_path / "plain.pt"], model="vit_tiny_patch16_224", num_classes=4, model_kwargs=TINY
    )
    assert evaluation_models(plain)["plain"].num_classes == 4


def test_run_evaluation_takes_typed_arguments_and_writes_the_report(tmp_path):
    from relreg.evaluation import EvaluationSettings, ModelSources, report_lines, run_evaluation

    _lightning_checkpoint(tmp_path / "a.ckpt", 0)
    sources = ModelSources(checkpoints=(tmp_path / "a.ckpt",), labels=("tuned",))
    settings = EvaluationSettings(
        data="shapes:ood:3",
        out=tmp_path / "out",
        ood={"gen": "shapes:ood:2"},
        methods=("raw_attention",),
        steps=1,
        num_heatmaps=2,
    )
    report = run_evaluation(sources, settings)
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == report
    assert report["checkpoints"] == {"tuned": str(tmp_path / "a.ckpt")}
    assert report["ood"] == {"gen": "shapes:ood:2"} and "sanity" not in report
    assert set(report["models"]["tuned"]["accuracy"]) == {"data", "gen"}
    assert (tmp_path / "out" / "heatmaps.png").is_file()
    lines = report_lines(report)
    assert lines[1].split()[:2] == ["tuned", "raw_attention"]
    assert lines[-1].startswith("tuned") and "gen" in lines[-1]
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        run_evaluation(sources, settings)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"num_heatmaps": -1}, ValueError, "num_heatmaps >= 0"),
        ({"ood": {"data": "shapes:ood"}}, ValueError, "other than 'data'"),
    ],
)
def test_evaluation_settings_fail_before_any_work(tmp_path, change, error, match):
    from relreg.evaluation import EvaluationSettings, ModelSources, run_evaluation

    settings = EvaluationSettings(data="shapes:ood:2", out=tmp_path / "out", **change)
    with pytest.raises(error, match=match):  # the missing checkpoint is never reached
        run_evaluation(ModelSources([tmp_path / "missing.ckpt"]), settings)
    assert not (tmp_path / "out").exists()


def test_the_evaluation_package_never_reads_an_argparse_namespace():
    import ast
    from pathlib import Path

    import relreg.evaluation

    package = Path(relreg.evaluation.__file__).parent
    found = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            found += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "argparse"]
    assert len(list(package.glob("*.py"))) >= 5  # models, report, figures, sanity, __init__
    assert not found, found
