"""The explainer registry is a ``relreg.registry.Registry``: its checks and its error wording."""

from __future__ import annotations

import pytest

from relreg.explain import (
    EXPLAINERS,
    ExplainerInfo,
    explainer_info,
    list_explainers,
    register_explainer,
)


def _toy(model, images, target=None, foil=None, differentiable=False, second_order=False, k=1):
    raise NotImplementedError


def test_registered_entries_are_their_explainer_info():
    assert list_explainers() == sorted(EXPLAINERS.list())
    for name in list_explainers():
        info = explainer_info(name)
        assert info is EXPLAINERS.get(name) and info.name == name


def test_register_explainer_adds_the_info_with_the_options_of_the_signature():
    try:
        assert register_explainer("toy", output="pixel", paper="none")(_toy) is _toy
        info = explainer_info("toy")
        assert info == ExplainerInfo("toy", _toy, "pixel", "none", ("k",), True)
        assert "toy" in list_explainers()
    finally:
        EXPLAINERS.unregister("toy")
    assert "toy" not in EXPLAINERS


def test_registry_refuses_bad_explainers():
    with pytest.raises(ValueError, match="Expected a new explainer name, but 'chefer' is already"):
        register_explainer("chefer", output="grid", paper="again")(_toy)
    with pytest.raises(TypeError, match=r"Expected explainer 'bad' to take \('model', 'images'"):
        register_explainer("bad", output="pixel", paper="none")(lambda model, images: None)
    with pytest.raises(ValueError, match="Expected output 'grid' or 'pixel', but got 'voxel'"):
        register_explainer("bad", output="voxel", paper="none")(_toy)
    with pytest.raises(TypeError, match="Expected explainer 'bad' an ExplainerInfo"):
        EXPLAINERS.register("bad", _toy)
    with pytest.raises(ValueError, match="Expected the ExplainerInfo of 'bad', but got that of"):
        EXPLAINERS.register("bad", ExplainerInfo("toy", _toy, "pixel", "none", ("k",)))
    assert "bad" not in EXPLAINERS and "chefer" in EXPLAINERS


def test_unknown_explainer_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"Unknown explainer 'nope'; expected one of: .*chefer"):
        explainer_info("nope")
    with pytest.raises(ValueError, match="Unknown explainer 3"):
        explainer_info(3)
