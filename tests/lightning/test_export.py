"""Compact export: from a DCP checkpoint (no training job, no process group) to a serving model
whose predictions equal the trained model's, with tables smaller in proportion to the rate."""

import copy

import torch

from torchrec_ext.export import export_from_checkpoint, load_compact
from torchrec_ext.models import DLRMLite, kjt_from_ids

from .test_lightning import run_job, tables


def test_compact_model_predicts_like_the_trained_model(tmp_path):
    cfg = {"epochs": 1, "target": None, "group": {"lr": 0.02, "lambda21": 3e-3},
           "ckpt_dir": str(tmp_path / "ckpt")}
    run_job("tests.lightning.fit_job", tmp_path, cfg)
    trained = tables(tmp_path)
    vocab = [500] * 4
    full = DLRMLite(vocab, dim=8, device="cpu")
    state = {k.removeprefix("net."): v for k, v in trained.items() if k.startswith("net.")}
    full.load_state_dict(state)
    out = tmp_path / "compact.pt"
    sizes = export_from_checkpoint(str(tmp_path / "ckpt" / "last.ckpt"), full.ebc, str(out))
    serving = copy.deepcopy(full)
    serving.ebc = load_compact(str(out))
    # held-out batch: every id of every table, so unseen and deleted ids are included
    ids = torch.stack([torch.arange(500) for _ in vocab], dim=1)
    ids = torch.cat([ids, torch.randint(0, 500, (300, 4), generator=torch.Generator().manual_seed(5))])
    with torch.no_grad():
        a = torch.sigmoid(full(kjt_from_ids(ids)))
        b = torch.sigmoid(serving(kjt_from_ids(ids)))
    diff = (a - b).abs().max().item()
    kept = sum(int(w.ne(0).any(1).sum()) for k, w in trained.items() if "embedding_bags" in k)
    total = sum(w.shape[0] for k, w in trained.items() if "embedding_bags" in k)
    print(f"compact export: max prediction diff {diff:.2e}; {kept}/{total} rows kept; "
          f"{sizes['compact_bytes']} bytes vs {sizes['full_bytes']} "
          f"({sizes['compact_bytes'] / sizes['full_bytes']:.1%})")
    assert diff <= 1e-6
    assert 0 < kept < total
    # rows of dim 8 fp32 (32 B) + an 8-byte id each: 40 B per kept row instead of 32 B per row
    assert sizes["compact_bytes"] == kept * (8 * 4 + 8)
    assert sizes["full_bytes"] == total * 8 * 4
