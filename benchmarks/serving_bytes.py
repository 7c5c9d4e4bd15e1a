"""Bytes and AUC of the served tables at feature rates 0.5 / 0.2 / 0.05 (synthetic set).

For each target rate: a 2-rank Lightning fit (``TorchRecStrategy``, fused GroupAdam,
``SparsityMonitor(target_feature_rate=rate)``) writes a DCP checkpoint; the tables are exported
from it (:func:`torchrec_ext.serving.export_serving`) in fp32 / fp16 / int8 / int4, and each
served model is scored on the validation split. Prints a markdown table: full fp32 tables vs the
served tables (kept rows in FBGEMM's inference TBE + the id remap), with validation AUC.

    python benchmarks/serving_bytes.py [--rates 0.5 0.2 0.05] [--out outputs/serving_bytes]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys

import lightning.pytorch as pl
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DATA = {"num_samples": 60_000, "num_fields": 8, "vocab_size": 2_000, "batch_size": 256}
DTYPES = ("fp32", "fp16", "int8", "int4")


def fit(rate: float, out: str) -> None:
    """One fit at ``rate``; Lightning starts the second rank by running this script again."""
    from lightning_sgl import GroupAdam, GroupLasso, SparsityMonitor, TorchRecStrategy
    from lightning_sgl.ctr import CTRDataModule, CTRModule

    pl.seed_everything(0, workers=True)
    torch.set_num_threads(1)
    dm = CTRDataModule(**DATA)
    module = CTRModule(dm.vocab_sizes, model="dlrm", dim=8, lr=1e-2)
    callbacks = [GroupLasso(GroupAdam, lr=0.01, lambda21=1e-4),
                 SparsityMonitor(target_feature_rate=rate),
                 pl.callbacks.ModelCheckpoint(dirpath=os.path.join(out, "ckpt"), save_last=True)]
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=TorchRecStrategy(),
                         max_epochs=2, callbacks=callbacks, logger=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, default_root_dir=out)
    trainer.fit(module, datamodule=dm)


def score(rate: float, out: str) -> list[dict]:
    """Export the checkpoint of ``rate`` in every data type; bytes and validation AUC."""
    from lightning_sgl.ctr import CTRDataModule
    from lightning_sgl.metrics import roc_auc
    from torchrec_ext.models import DLRMLite
    from torchrec_ext.serving import export_serving, read_checkpoint_tables

    dm = CTRDataModule(**DATA)
    dm.setup()
    model = DLRMLite(dm.vocab_sizes, dim=8, device="cpu")
    ckpt = os.path.join(out, "ckpt", "last.ckpt")
    names = [c.name for c in model.ebc.embedding_bag_configs()]
    tables = read_checkpoint_tables(ckpt, names)
    dense = _dense_state(ckpt)
    model.load_state_dict({**dense, **{f"ebc.embedding_bags.{n}.weight": w
                                       for n, (w, _) in tables.items()}})
    full = sum(w.numel() * 4 for w, _ in tables.values())
    seen = sum(int(s.ne(0).sum()) for _, s in tables.values())
    rows = []
    for dtype in DTYPES:
        served = copy.deepcopy(model)
        served.ebc = export_serving(model.ebc, checkpoint=ckpt, data_type=dtype)
        preds, labels = [], []
        with torch.no_grad():
            for kjt, y in dm.val_dataloader():
                preds.append(torch.sigmoid(served(kjt)))
                labels.append(y)
        kept = sum(served.ebc.kept.values())
        remap = sum(t.index_remappings_array.numel() * 4 for t in served.ebc.tbes)
        rows.append({"rate": rate, "dtype": dtype, "kept": kept, "seen": seen,
                     "full_bytes": full, "served_bytes": served.ebc.nbytes,
                     "remap_bytes": remap,
                     "auc": roc_auc(torch.cat(preds), torch.cat(labels))})
    return rows


def _dense_state(ckpt: str) -> dict:
    """The MLP weights of the checkpoint: ``TorchRecStrategy`` keeps the unsharded state in
    ``lightning_meta.pt`` (the tables are in the DCP shards)."""
    meta = torch.load(os.path.join(ckpt, "lightning_meta.pt"), weights_only=False)
    return {k.removeprefix("net."): v for k, v in meta["state_dict"].items()
            if k.startswith("net.") and ".ebc." not in k and torch.is_tensor(v)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rates", type=float, nargs="+", default=[0.5, 0.2, 0.05])
    ap.add_argument("--out", default=os.path.join(ROOT, "outputs", "serving_bytes"))
    ap.add_argument("--fit", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.fit is not None:  # a child run: one fit (both ranks run this branch)
        fit(args.fit, os.path.join(args.out, f"rate{args.fit}"))
        return
    import subprocess

    results = []
    for rate in args.rates:
        out = os.path.join(args.out, f"rate{rate}")
        env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, os.path.abspath(__file__), "--fit", str(rate),
                        "--out", args.out], check=True, env=env, cwd=ROOT)
        results += score(rate, out)
    print("\n| rate (kept / seen) | full fp32 tables | " + " | ".join(
        f"served {d} (AUC)" for d in DTYPES) + " |")
    print("|---|---|" + "---|" * len(DTYPES))
    for rate in args.rates:
        rs = [r for r in results if r["rate"] == rate]
        r0 = rs[0]
        cells = [f"{r['served_bytes']:,} B = {r['served_bytes'] / r['full_bytes']:.1%} "
                 f"({r['auc']:.4f})" for r in rs]
        print(f"| {rate} ({r0['kept']:,} / {r0['seen']:,} = {r0['kept'] / r0['seen']:.3f}) | "
              f"{r0['full_bytes']:,} B | " + " | ".join(cells) + " |")
    print(f"\nremap arrays (4 B per row, in every served size): {results[0]['remap_bytes']:,} B")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
