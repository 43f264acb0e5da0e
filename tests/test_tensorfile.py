"""The streaming safetensors writer against the reference reader."""

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from msif.tensorfile import save_tensors


def test_every_dtype_shape_and_metadata_round_trips(tmp_path):
    g = torch.Generator().manual_seed(0)
    t = {"a/x": torch.randn(3, 4, dtype=torch.float64, generator=g), "b": torch.randn(5, generator=g).bfloat16(),
         "c": torch.arange(7), "d": torch.randn(2, 3, generator=g)[:, 1:],  # not contiguous
         "e": torch.zeros(0, 3), "f": torch.randn(2, 2, generator=g).half(), "g": torch.tensor([True, False]),
         "h": torch.tensor(2.5)}
    save_tensors(t, tmp_path / "x.safetensors", {"k": "v"})
    back = load_file(str(tmp_path / "x.safetensors"))
    assert set(back) == set(t)
    for k in t:
        assert back[k].dtype == t[k].dtype and back[k].shape == t[k].shape and torch.equal(back[k], t[k]), k
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        assert f.metadata() == {"k": "v"}
