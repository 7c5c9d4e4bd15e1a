"""Serving export from the DCP checkpoint of a 2-rank Lightning run (no training job, no process
group): the served model (kept rows in FBGEMM's inference TBE) predicts like the trained model on
every id of every table, scripts, survives a save/load round trip and predicts in a process that
imports neither Lightning nor this package."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from torchrec import KeyedJaggedTensor

from tests.envs import DIST_ENV
from torchrec_ext.models import DLRMLite
from torchrec_ext.serving import export_serving, load_serving, save_serving

from .test_lightning import run_job, tables

VOCAB = [500] * 4
#: documented tolerances of the served model on predictions (sigmoid outputs); measured here:
#: fp32 0.0, fp16 1.8e-5, int8 1.2e-4, int4 2.0e-3 (row-wise quantisation, fp16 scale and bias)
TOLERANCE = {"fp32": 1e-6, "fp16": 2e-4, "int8": 1e-3, "int4": 1e-2}


def _batch() -> KeyedJaggedTensor:
    """Every id of every table once (one-id bags), then multi-hot bags of random ids (1..5) and
    empty bags, in every feature."""
    g = torch.Generator().manual_seed(5)
    n = VOCAB[0]
    extra = 200
    lengths, values = [], []
    for _ in VOCAB:
        multi = torch.randint(0, 6, (extra,), generator=g)  # 0 = an empty bag
        lengths.append(torch.cat([torch.ones(n, dtype=torch.long), multi]))
        values.append(torch.cat([torch.arange(n), torch.randint(0, n, (int(multi.sum()),),
                                                                generator=g)]))
    return KeyedJaggedTensor.from_lengths_sync(keys=[f"f{f}" for f in range(len(VOCAB))],
                                               values=torch.cat(values),
                                               lengths=torch.cat(lengths))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    cfg = {"epochs": 1, "target": None, "group": {"lr": 0.02, "lambda21": 3e-3},
           "ckpt_dir": str(out / "ckpt")}
    run_job("tests.lightning.fit_job", out, cfg)
    state = tables(out)
    model = DLRMLite(VOCAB, dim=8, device="cpu")
    model.load_state_dict({k.removeprefix("net."): v for k, v in state.items()
                           if k.startswith("net.")})
    seen = {f"t{f}": state[f"fused/t{f}.seen"] for f in range(len(VOCAB))}
    return out, model, seen


def _as_served(model: DLRMLite, seen: dict) -> DLRMLite:
    """The trained model with never-seen rows zeroed (the export's documented definition)."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, bag in ref.ebc.embedding_bags.items():
            bag.weight[seen[name] == 0] = 0
    return ref


@pytest.mark.parametrize("data_type", ["fp32", "fp16", "int8", "int4"])
def test_served_model_predicts_like_the_trained_model(trained, tmp_path, data_type):
    out, model, seen = trained
    serving = copy.deepcopy(model)
    serving.ebc = export_serving(model.ebc, checkpoint=out / "ckpt" / "last.ckpt",
                                 data_type=data_type)
    kjt = _batch()
    with torch.no_grad():
        want = torch.sigmoid(_as_served(model, seen)(kjt))
        raw = torch.sigmoid(model(kjt))
        got = torch.sigmoid(serving(kjt))
    diff = (want - got).abs().max().item()
    weights = {n: b.weight for n, b in model.ebc.embedding_bags.items()}
    nonzero = sum(int(w.ne(0).any(1).sum()) for w in weights.values())
    kept = sum(serving.ebc.kept.values())
    unseen_nonzero = sum(int((w.ne(0).any(1) & (seen[n] == 0)).sum()) for n, w in weights.items())
    print(f"{data_type}: max prediction diff {diff:.2e} (tolerance {TOLERANCE[data_type]}); "
          f"kept {kept} of {nonzero} non-zero rows ({unseen_nonzero} never seen), "
          f"{sum(VOCAB)} rows; served bytes {serving.ebc.nbytes} vs full fp32 "
          f"{sum(VOCAB) * 8 * 4}")
    assert diff <= TOLERANCE[data_type]
    # kept rows = non-zero AND seen, counted independently from the trained tables
    assert kept == sum(int((w.ne(0).any(1) & (seen[n] != 0)).sum()) for n, w in weights.items())
    assert 0 < kept < sum(VOCAB)
    # the never-seen rows are really there in the trained tables (so dropping them is tested) and
    # they are the only difference from the raw trained model: bags of seen ids agree with it
    assert unseen_nonzero > 0 and (raw - want).abs().max().item() > 10 * TOLERANCE["fp32"]

    # scripted, saved, loaded: the same predictions
    path = tmp_path / f"serving-{data_type}.pt"
    save_serving(serving, path)
    loaded = load_serving(path)
    assert (torch.sigmoid(loaded(kjt)) - got).abs().max().item() == 0.0


def test_served_model_runs_without_lightning_or_this_package(trained, tmp_path):
    out, model, seen = trained
    serving = copy.deepcopy(model)
    serving.ebc = export_serving(model.ebc, checkpoint=out / "ckpt" / "last.ckpt",
                                 data_type="int8")
    kjt = _batch()
    path = tmp_path / "serving.pt"
    save_serving(serving, path)
    with torch.no_grad():
        torch.save({"values": kjt.values(), "lengths": kjt.lengths(), "keys": kjt.keys(),
                    "want": serving(kjt)}, tmp_path / "batch.pt")
    script = f"""
import json, sys, torch, fbgemm_gpu
from torchrec import KeyedJaggedTensor
b = torch.load({str(tmp_path / "batch.pt")!r})
model = torch.jit.load({str(path)!r})
kjt = KeyedJaggedTensor.from_lengths_sync(keys=b["keys"], values=b["values"], lengths=b["lengths"])
diff = (model(kjt) - b["want"]).abs().max().item()
loaded = sorted({{m.split(".")[0] for m in sys.modules}} & {{"lightning", "lightning_sgl",
                                                              "torchrec_ext", "pytorch_lightning"}})
print(json.dumps({{"diff": diff, "loaded": loaded}}))
"""
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV and k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"serving process: {result}")
    assert result == {"diff": 0.0, "loaded": []}


def test_export_refuses_a_corrupt_checkpoint_naming_the_file(trained, tmp_path):
    out, model, _ = trained
    src = out / "ckpt" / "last.ckpt"
    bad = tmp_path / "bad.ckpt"
    bad.mkdir()
    for f in os.listdir(src):
        (bad / f).write_bytes((src / f).read_bytes())
    shard = bad / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"__1_0\.distcp is corrupt"):
        export_serving(model.ebc, checkpoint=bad)


BUDGETS = {  # 4 tables x 500 rows x dim 8; the id remap alone is 2,000 B per table
    "overall-fp32": ("fp32", 4 * 2_000 + 300 * 32),
    "per-table-int8": ("int8", {"t0": 2_000 + 40 * 12, "t1": 2_000 + 90 * 12,
                                "t2": 2_000 + 200 * 12, "t3": 2_000 + 120 * 12}),
}


@pytest.mark.parametrize("case", list(BUDGETS))
def test_target_bytes_budget_holds_in_the_export(tmp_path, case):
    """SparsityMonitor(target_bytes=...) on 2 ranks: the export of the final checkpoint is within
    the budget and uses at least 95% of it, overall and per table."""
    from torchrec_ext.serving import served_table_bytes

    dtype, budget = BUDGETS[case]
    cfg = {"epochs": 1, "target": None, "target_bytes": budget, "serve_dtype": dtype,
           "group": {"lr": 0.02, "lambda21": 1e-4}, "ckpt_dir": str(tmp_path / "ckpt")}
    run_job("tests.lightning.fit_job", tmp_path, cfg)
    model = DLRMLite(VOCAB, dim=8, device="cpu")
    served = export_serving(model.ebc, checkpoint=tmp_path / "ckpt" / "last.ckpt",
                            data_type=dtype)
    per = {t: served_table_bytes(k, 500, 8, 1, dtype) for t, k in served.kept.items()}
    assert sum(per.values()) == served.nbytes
    print(f"{case}: budget {budget}, served {served.nbytes} B ({per}), kept {served.kept}")
    pairs = budget.items() if isinstance(budget, dict) else [("all", budget)]
    for t, b in pairs:
        got = per[t] if t != "all" else served.nbytes
        assert 0.95 * b <= got <= b, (t, got, b)
