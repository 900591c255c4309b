"""The README example runs as written and gives what it promises."""

import re
from pathlib import Path

import torch

torch.set_num_threads(1)


def test_readme_example_runs():
    src = (Path(__file__).parents[1] / "README.md").read_text()
    code = re.search(r"## Example\n\n```python\n(.*?)```", src, re.S).group(1)
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    S, Kt, K, I, per_layer = ns["S"], ns["Kt"], ns["K"], ns["I"], ns["per_layer"]
    assert S.shape == (500, 500) and Kt.shape == (20, 500, 10, 10) and K.shape == (20, 30, 10, 10)
    assert I.shape == (5, 500, 10, 10) and ns["cos"].shape == (500, 500)
    assert torch.allclose(S, S.T, atol=1e-5) and torch.allclose(S.diagonal(), torch.ones(500), atol=1e-4)
    assert torch.allclose(sum(per_layer.values()), K[:10, :10], rtol=1e-4, atol=1e-4)
    assert torch.allclose(ns["counts"], S.sum(1), rtol=1e-4, atol=1e-3)
    assert torch.equal(ns["idx"][:, 0], torch.arange(3)) and ns["report"].factor.shape == (200,)


def test_readme_hugging_face_example_runs():
    import pytest

    pytest.importorskip("transformers")
    src = (Path(__file__).parents[1] / "README.md").read_text()
    code = re.search(r"## Hugging Face and other keyword-input models\n.*?```python\n(.*?)```", src, re.S).group(1)
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    S, rules = ns["S_text"], ns["rules"]
    assert S.shape == (8, 8) and torch.allclose(S.diagonal(), torch.ones(8, dtype=S.dtype), atol=1e-4)
    assert rules["bert.encoder.layer.0.attention.self.query"] == "linear"
    assert rules["bert.embeddings.word_embeddings"] == "embedding"
    assert ns["S_img"].shape == (6, 6)
