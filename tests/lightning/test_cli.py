"""``examples/train_ctr.py`` (LightningCLI, the config of ``make demo``) runs on 2 ranks and prints
no warning that this project's code causes; the only warnings left come from TorchRec's and
torch's own internals (listed here, so a new one fails the test)."""

import os
import re
import subprocess
import sys

from ..envs import DIST_ENV

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
#: warnings raised inside TorchRec/torch on their own (DMP's DDP arguments, deprecated c10d names)
FOREIGN = ("`broadcast_buffers` is deprecated", "reduce_scatter_tensor` is deprecated",
           "all_gather_into_tensor` is deprecated")


def test_demo_config_runs_quietly(tmp_path):
    env = {**{k: v for k, v in os.environ.items() if k not in DIST_ENV}, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": ROOT}
    proc = subprocess.run(
        [sys.executable, "examples/train_ctr.py", "fit", "--config",
         "examples/configs/synthetic_dlrm.yaml", "--trainer.max_steps", "30",
         "--trainer.default_root_dir", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "feature_rate" in out
    warnings = [line for line in out.splitlines()
                if re.search(r"warning|It is recommended", line, re.IGNORECASE)]
    ours = [w for w in warnings if not any(f in w for f in FOREIGN)]
    assert ours == [], "\n".join(ours)


def _run_config(config: str, tmp_path, data: str, *extra: str):
    env = {**{k: v for k, v in os.environ.items() if k not in DIST_ENV}, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": ROOT, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, "examples/train_ctr.py", "fit", "--config", config,
         "--data.path", data, "--trainer.max_epochs", "1",
         "--trainer.default_root_dir", str(tmp_path), *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


def test_criteo_config_streams_the_kaggle_layout(tmp_path):
    """The Criteo config as shipped (streamed, no max_rows, 2 ranks x 2 workers) on a generated
    file of Kaggle's layout (label, 13 integer, 26 hexadecimal categorical columns)."""
    from benchmarks.bench_readers import write

    path = write("criteo", str(tmp_path / "train.txt"), 6_000)
    out = _run_config("examples/configs/criteo_dcn.yaml", tmp_path, path,
                      "--data.min_count", "2", "--data.batch_size", "256")
    assert "validation AUC" in out and "feature rate" in out


def test_libffm_config_trains_multi_hot_bags(tmp_path):
    from benchmarks.bench_readers import write

    path = write("libffm", str(tmp_path / "train.ffm"), 6_000)
    out = _run_config("examples/configs/libffm_dlrm.yaml", tmp_path, path)
    assert "validation AUC" in out and "feature rate" in out
