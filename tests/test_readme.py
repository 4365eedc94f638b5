"""The README's Python example runs (on a small random model instead of downloaded weights)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no Python example"
    code = blocks[0]
    for old, new in [
        ("pretrained=True", "pretrained=False"),
        ("vit_base_patch16_224", "vit_tiny_patch16_224"),
        ("torch.randn(8,", "torch.randn(2,"),
    ]:
        assert old in code
        code = code.replace(old, new)
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)
    assert scope["maps"].shape == (2, 14, 14)
    assert scope["pix"].shape == (2, 224, 224)
    assert scope["trainable"].requires_grad
    assert len(code.strip().splitlines()) <= 10
