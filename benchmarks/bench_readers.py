"""Peak memory of the streaming readers: every format, a generated file of 50k and of 5M rows.

Each (format, rows) pair runs in a fresh process that builds the line index and the vocabulary
(``min_count=2``) and reads every sample once through a ``DataLoader``; its peak RSS
(``ru_maxrss``) is printed with the ratio to the 50k-row run. The generated values have a fixed
cardinality per field (Zipf-like), so the vocabulary is the same size at both scales and the
ratio measures the reader, not the data.

    python benchmarks/bench_readers.py [--rows 50000 5000000] [--formats criteo ...] [--dir /tmp/x]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORMATS = ("criteo", "avazu", "libsvm", "libffm", "criteo_binary")
CARDINALITY = 1000


def write(fmt: str, path: str, rows: int, seed: int = 0, tag: bool = False) -> str:
    """A file (a folder for ``criteo_binary``) of ``rows`` samples in ``fmt``; returns its path.
    With ``tag``, row ``i`` carries ``i`` in a field of its own (the first categorical, or the
    first id), so a test can tell the samples apart (the benchmark leaves it out: a value per
    row would make the vocabulary pass grow with the file)."""
    rng = np.random.default_rng(seed)
    chunk = 100_000
    if fmt == "criteo_binary":
        os.makedirs(path, exist_ok=True)
        per_day = [rows // 2, rows - rows // 2]
        for day, n in enumerate(per_day):
            sparse = rng.zipf(1.5, (n, 26)) % CARDINALITY
            if tag:
                sparse[:, 0] = np.arange(n) + day * per_day[0]
            np.save(os.path.join(path, f"day_{day}_sparse.npy"), sparse.astype(np.int64))
            dense = np.log(rng.integers(0, 100, (n, 13)) + 2).astype(np.float32)
            np.save(os.path.join(path, f"day_{day}_dense.npy"), dense)
            np.save(os.path.join(path, f"day_{day}_labels.npy"),
                    rng.integers(0, 2, (n, 1)).astype(np.int32))
        return path
    with open(path, "w") as f:
        if fmt == "avazu":
            f.write("id,click,hour," + ",".join(f"C{j}" for j in range(20)) + "\n")
        for start in range(0, rows, chunk):
            n = min(chunk, rows - start)
            labels = rng.integers(0, 2, n)
            cats = rng.zipf(1.5, (n, 26)) % CARDINALITY
            ints = rng.integers(-1, 200, (n, 13))
            out = []
            for r in range(n):
                i = start + r if tag else int(cats[r, 0])
                if fmt == "criteo":
                    out.append("\t".join([str(labels[r]), *("" if v < 0 else str(v)
                                                              for v in ints[r]),
                                          f"{i:08x}", *(f"{v:08x}" for v in cats[r, 1:])]))
                elif fmt == "avazu":
                    out.append(",".join([str(i), str(labels[r]), f"141021{(start + r) % 24:02d}", str(i),
                                         *(str(v) for v in cats[r, 1:20])]))
                elif fmt == "libsvm":
                    k = 1 + int(cats[r, 1]) % 5
                    feats = [f"{CARDINALITY + i}:1"] + [f"{v}:1" for v in cats[r, 2:2 + k]]
                    out.append(" ".join([str(labels[r]), *feats]))
                else:  # libffm
                    k = 1 + int(cats[r, 1]) % 6
                    feats = [f"0:{CARDINALITY + i}:1"] + [
                        f"{1 + j % 4}:{v}:{0.5 if j % 3 == 0 else 1}"
                        for j, v in enumerate(cats[r, 2:2 + k])]
                    out.append(" ".join([str(labels[r]), *feats]))
            f.write("\n".join(out) + "\n")
    return path


def measure(fmt: str, path: str, cache: str) -> dict:
    """Run in a fresh process: index + vocabulary + one full read; peak RSS in MiB."""
    import torch
    from torch.utils.data import DataLoader

    from lightning_sgl.data.streaming import StreamingCTRDataset, collate_bags

    t0 = time.perf_counter()
    ds = StreamingCTRDataset(path, fmt, min_count=2, cache_dir=cache)
    t1 = time.perf_counter()
    collate = collate_bags if fmt in ("libsvm", "libffm") else None
    n = 0
    for batch in DataLoader(ds, batch_size=512, collate_fn=collate):
        n += len(batch[1])
    t2 = time.perf_counter()
    del torch
    return {"fmt": fmt, "samples": n, "vocab_s": t1 - t0, "read_s": t2 - t1,
            "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, nargs="+", default=[50_000, 5_000_000])
    ap.add_argument("--formats", nargs="+", default=list(FORMATS))
    ap.add_argument("--dir", default="/tmp/bench_readers")
    ap.add_argument("--measure", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return
    os.makedirs(args.dir, exist_ok=True)
    results = []
    for fmt in args.formats:
        for rows in args.rows:
            path = os.path.join(args.dir, f"{fmt}-{rows}" + ("" if fmt == "criteo_binary"
                                                             else ".txt"))
            if not os.path.exists(path):
                write(fmt, path, rows)
            cache = os.path.join(args.dir, f"cache-{fmt}-{rows}")
            env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--measure", fmt,
                                  path, cache], check=True, env=env, capture_output=True,
                                 text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            r["rows"] = rows
            results.append(r)
            print(f"{fmt:14s} {rows:>9,} rows: peak RSS {r['rss_mib']:7.1f} MiB, vocabulary "
                  f"{r['vocab_s']:6.1f} s, read {r['read_s']:6.1f} s "
                  f"({rows / max(r['read_s'], 1e-9):,.0f} rows/s)", flush=True)
    print("\n| format | " + " | ".join(f"peak RSS at {r:,} rows" for r in args.rows)
          + " | ratio |")
    print("|---|" + "---|" * (len(args.rows) + 1))
    for fmt in args.formats:
        rs = [r for r in results if r["fmt"] == fmt]
        print(f"| {fmt} | " + " | ".join(f"{r['rss_mib']:.0f} MiB" for r in rs)
              + f" | {rs[-1]['rss_mib'] / rs[0]['rss_mib']:.2f}x |")
    random.seed(0)


if __name__ == "__main__":
    main()
