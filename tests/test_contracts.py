"""Structural contracts: the import layers (see ``tests/layers.py``), no import cycles, the core
running on a bare torch, and every public class documenting every argument."""

from __future__ import annotations

import importlib
import inspect
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from .layers import PACKAGES, ROOT, eager_cycles, violations


def test_the_layer_contract_holds():
    assert violations() == []


def test_no_cycle_among_module_level_imports():
    assert eager_cycles() == []


def _copy_tree(tmp_path: Path) -> Path:
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns(
            "*.so", "__pycache__", "csrc", "*.yaml"))
    return tmp_path


def test_the_contract_fails_on_a_planted_upward_import(tmp_path):
    """Negative control: the checker sees an upward import (the math core importing the
    Lightning strategy), a kernel import of a private core module, and a cycle."""
    root = _copy_tree(tmp_path)
    prox = root / "lightning_sgl/optim/_prox.py"
    prox.write_text(prox.read_text() + "\n\ndef _planted():\n"
                    "    from lightning_sgl.strategy import TorchRecStrategy  # noqa\n")
    update = root / "torchrec_ext/kernel/update.py"
    update.write_text(update.read_text() + "\nfrom lightning_sgl.optim._moments import get_rule\n")
    bad = violations(root)
    assert any("lightning_sgl.optim._prox" in b and "upward (math core -> Lightning" in b
               for b in bad), bad
    assert any("torchrec_ext.kernel.update" in b and "private module lightning_sgl.optim._moments"
               in b for b in bad), bad
    dual = root / "lightning_sgl/optim/_dual.py"
    dual.write_text("from . import _prox\n" + dual.read_text())
    prox.write_text("from . import _dual\n" + prox.read_text())
    assert any({"lightning_sgl.optim._dual", "lightning_sgl.optim._prox"} <= set(c)
               for c in eager_cycles(root))


def _bare_torch_site(tmp: Path) -> Path:
    """A site directory holding torch and what torch itself requires -- nothing else (no
    TorchRec, FBGEMM, Lightning, NumPy): symlinks into this venv's site-packages."""
    import importlib.metadata as md
    import re

    names, todo = set(), ["torch"]
    while todo:
        name = todo.pop()
        if name.lower() in names:
            continue
        names.add(name.lower())
        todo += [re.split(r"[<>=!;~ \[]", r)[0] for r in md.requires(name) or []
                 if "extra ==" not in r]
    site = tmp / "site"
    site.mkdir()
    for name in names:
        dist = md.distribution(name)
        base = Path(dist.locate_file(""))
        for top in {Path(str(f)).parts[0] for f in dist.files or []}:
            if top == ".." or top.endswith(".pth"):
                continue
            if not (site / top).exists() and (base / top).exists():
                (site / top).symlink_to(base / top)
    return site


_RUN_CORE = textwrap.dedent("""
    import importlib.util, json, torch
    import lightning_sgl.optim as optim
    import torchrec_ext.kernel as kernel
    from lightning_sgl.optim import GroupAdam, mark_embedding
    from torchrec_ext import GroupTBE, TableSpec
    table = torch.nn.Parameter(torch.randn(6, 4)); mark_embedding(table)
    opt = GroupAdam([table], lr=0.1, lambda21=0.5)
    table.grad = torch.randn(6, 4); opt.step()
    tbe = GroupTBE([TableSpec("t", 7, 4)], [0], optimizer="adagrad",
                   hyperparameters=dict(lr=0.1, lambda21=0.3), rowwise=True)
    out = tbe(torch.tensor([0, 3, 3, 6]), torch.tensor([0, 2, 4]))
    out.sum().backward()
    try:
        import torchrec_ext
        torchrec_ext.apply_group_optimizer
        message = None
    except ImportError as err:
        message = str(err)
    heavy = sorted({"torchrec", "fbgemm_gpu", "lightning", "pytorch_lightning", "numpy",
                    "torchmetrics", "scipy"} & {m.split(".")[0] for m in __import__("sys").modules})
    print(json.dumps(dict(engine=tbe.engine(), step=int(tbe.step), message=message,
                          heavy=heavy, numpy=importlib.util.find_spec("numpy") is not None)))
""")


def test_core_and_table_kernel_run_with_torch_alone(tmp_path):
    """``import lightning_sgl.optim, torchrec_ext.kernel`` and a step of each, in a process where
    only torch (and its own requirements) can be imported: no TorchRec, FBGEMM, Lightning or
    NumPy. The TorchRec glue then fails with an error that says what to install."""
    site = _bare_torch_site(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "PYTHON"))}
    env["PYTHONPATH"] = f"{site}{os.pathsep}{ROOT}"
    # the base interpreter without its site packages: only PYTHONPATH is importable
    python = getattr(sys, "_base_executable", sys.executable)
    proc = subprocess.run([python, "-S", "-c", _RUN_CORE], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["heavy"] == [] and not result["numpy"]
    assert result["step"] == 1
    assert "needs torchrec and fbgemm_gpu" in result["message"]
    assert "install them with scripts/install.sh" in result["message"]


PUBLIC_CLASSES = [
    ("lightning_sgl.optim", ["GroupOptimizer", "GroupSGD", "GroupMomentum", "GroupAdagrad",
                             "GroupAdam", "GroupAMSGrad", "GroupAdaHessian"]),
    ("lightning_sgl", ["GroupLasso", "SparsityMonitor", "MagnitudePruning", "TorchRecStrategy",
                       "ModelOptimizer"]),
    ("torchrec_ext", ["GroupTBE"]),
]


@pytest.mark.parametrize("module,name", [(m, n) for m, names in PUBLIC_CLASSES for n in names])
def test_public_classes_document_every_argument(module, name):
    cls = getattr(importlib.import_module(module), name)
    doc = inspect.getdoc(cls) or ""
    assert "Args:" in doc, f"{name}: no Args section"
    params = [p for p in inspect.signature(cls.__init__).parameters
              if p not in ("self", "args", "kwargs")]
    args_section = doc.split("Args:", 1)[1]
    documented = set()
    for line in args_section.splitlines():
        head = line.strip().split(":", 1)[0]
        if ":" in line.strip() and all(n.strip().lstrip("*").isidentifier()
                                       for n in head.split(",")):
            documented |= {n.strip().lstrip("*") for n in head.split(",")}  # "a, b: ..."
    missing = [p for p in params if p not in documented]
    assert not missing, f"{name}: Args lacks {missing}"


def test_gpu_check_dry_run_passes_on_cpu():
    """``scripts/gpu_check.sh --dry-run``: every check of the CUDA script, on CPU at small size."""
    proc = subprocess.run([str(ROOT / "scripts/gpu_check.sh"), "--dry-run"], cwd=ROOT,
                          capture_output=True, text=True, timeout=480,
                          env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    checks = {r["check"]: r for r in lines if "check" in r}
    assert lines[-1]["failed"] == []
    assert sum(c.startswith("theorem2/") for c in checks) == 8
    assert sum(c.startswith("kernel/") for c in checks) == 8
    assert all(r["rows_zeroed"] > 0 for c, r in checks.items() if "-vs-cpu/" in c)
    assert set(checks["timing"]["ms_per_step"]) == {
        "GroupAdagrad rowwise", "GroupAdam rowwise", "GroupAdam", "EmbeddingBag+SparseAdam"}


def test_bench_tuning_runs_at_small_size():
    """``benchmarks/bench_tuning.py`` at 20k rows per table, 1 and 2 ranks: the monitor's own
    tuning on target (after it, at most ``tolerance / 2`` = 0.25% of the kept rows fewer: the
    monitor's documented dead band, so 0.1995-0.2000), searching at every tuning (the norms move
    at this size), the forced searches in at most 4 collectives (a small constant), and a
    default-settings run that ends on target -- the benchmark keeps working as the monitor
    changes (no timing is asserted)."""
    proc = subprocess.run([sys.executable, "benchmarks/bench_tuning.py", "--sizes", "20000",
                           "--ranks", "1", "2", "--tunings", "3", "--run-steps", "300"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in proc.stdout.splitlines()
            if line.startswith("| 20,000")]
    assert [r[1] for r in rows] == ["1", "2"]
    for r in rows:
        assert r[4] == "3/3" and 2 <= int(r[10]) <= 4, r
        assert 0.2 * (1 - 0.005 / 2) - 5e-5 <= float(r[11]) <= 0.2, r  # (printed to 4 places)
        assert r[12].startswith("24 (") and abs(float(r[13]) - 0.2) <= 0.01, r


@pytest.mark.parametrize("flag", [["--refit-relax", "1"], ["--refit-share", "0.2"]])
def test_paper_tables_refuses_refit_flags_with_paper(flag, capsys, monkeypatch):
    """``--paper`` (no schedule, no refit) with a refit flag is refused before any run, with a
    message naming the flags to drop."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    paper_tables = importlib.import_module("paper_tables")
    with pytest.raises(SystemExit) as exc:
        paper_tables.main(["--paper", *flag])
    assert exc.value.code == 2
    assert "--paper means no schedule and no refit: drop --schedule-share/--refit-share/" \
        "--refit-relax" in capsys.readouterr().err
