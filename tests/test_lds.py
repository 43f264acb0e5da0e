"""Linear datamodeling score: the metric's sign convention, and a tiny end-to-end run."""

import math

import torch

from msif.eval import lds


def test_lds_sign_convention_on_a_linear_datamodel():
    """Query losses that truly are linear in the subset (loss = c − Σ_{z∈S} w_z + noise, w_z > 0 = proponent):
    the true scores w give LDS ≈ 1, their negation ≈ −1, unrelated scores ≈ 0."""
    g = torch.Generator().manual_seed(0)
    K, N, Q = 60, 40, 3
    masks = (torch.rand(K, N, generator=g) < 0.5).double()
    w = torch.randn(Q, N, generator=g, dtype=torch.float64)
    losses = 5.0 - masks @ w.T + 0.01 * torch.randn(K, Q, generator=g, dtype=torch.float64)
    assert lds.lds(w, masks, losses)["mean"] > 0.95
    assert lds.lds(-w, masks, losses)["mean"] < -0.95
    other = torch.randn(Q, N, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert abs(lds.lds(other, masks, losses)["mean"]) < 0.5
    r = lds.lds(w, masks, losses)
    assert len(r["per_query"]) == Q and r["std"] >= 0


def test_lds_tiny_run():
    r = lds.run(lds.TINY)
    c = r["config"]
    assert set(r["methods"]) == {"exact", "ekfac", "ekfac_refined", "kfac", "gdp", "trak"}
    for name, m in r["methods"].items():
        assert -1.0 <= m["mean"] <= 1.0 and len(m["per_query"]) == c["n_queries"], name
        assert all(math.isfinite(x) for x in m["per_query"])
    assert r["query_loss_spread"] > 0  # the retrained models differ
    assert r["cost"]["subset_training_s"] > 0 and r["n_train"] == c["n_train"]
    table = lds.markdown_table(r)
    assert "EK-FAC" in table and "retrain" in table
