"""Bad input across the project: one table of cases (optimizers, fused kernel, callbacks,
strategy, TorchRec glue, readers, export, checkpoint loading). Each raises a clear error whose
message names the argument, file or line, and leaves state, files and tags as they were.

A case is ``make(tmp_path) -> (action, unchanged)``: ``action`` must raise, ``unchanged`` then
asserts that nothing was modified (parameters, optimizer state, kernel buffers, files, tags).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from lightning_sgl.optim import (
    GroupAdagrad,
    GroupAdaHessian,
    GroupAdam,
    GroupSGD,
    NonFiniteGradientError,
    mark_embedding,
)


@dataclass
class Case:
    id: str
    error: type
    match: str
    make: Callable


def _nothing():
    pass


# ------------------------------------------------------------------ optimizers
def _table_opt(cls=GroupAdam, **kw):
    table = mark_embedding(torch.nn.Parameter(torch.linspace(-1, 1, 12).reshape(4, 3)))
    opt = cls([table], lr=0.1, lambda21=0.1, **kw)
    table.grad = torch.ones(4, 3)
    opt.step()
    return table, opt


def _opt_unchanged(table, opt):
    x, sd = table.detach().clone(), copy.deepcopy(opt.state_dict())

    def check():
        assert torch.equal(table, x)
        now = opt.state_dict()
        assert now["param_groups"] == sd["param_groups"]
        for k, st in now["state"].items():
            for name, v in st.items():
                assert torch.equal(v, sd["state"][k][name]), name
    return check


def _construct(cls, **kw):
    def make(tmp):
        p = torch.nn.Parameter(torch.zeros(2, 2))
        return (lambda: cls([p], **kw)), _nothing
    return make


def _set_between_steps(key, value):
    def make(tmp):
        table, opt = _table_opt()
        check = _opt_unchanged(table, opt)

        def act():
            old = opt.param_groups[0][key]
            opt.param_groups[0][key] = value
            table.grad = torch.ones(4, 3)
            try:
                opt.step()
            finally:
                opt.param_groups[0][key] = old  # the user's edit undone; the rest must be intact
        return act, check
    return make


def _nan_gradient(tmp):
    table, opt = _table_opt()
    check = _opt_unchanged(table, opt)

    def act():
        table.grad = torch.full((4, 3), float("nan"))
        opt.step()
    return act, check


def _load_other_optimizer(tmp):
    table, opt = _table_opt()
    other_table, other = _table_opt(GroupAdagrad)
    check = _opt_unchanged(table, opt)
    return (lambda: opt.load_state_dict(other.state_dict())), check


def _load_wrong_shape(tmp):
    table, opt = _table_opt()
    big = mark_embedding(torch.nn.Parameter(torch.zeros(5, 3)))
    src = GroupAdam([big], lr=0.1)
    big.grad = torch.ones(5, 3)
    src.step()
    check = _opt_unchanged(table, opt)
    return (lambda: opt.load_state_dict(src.state_dict())), check


# ------------------------------------------------------------------ fused kernel
def _kernel(**kw):
    from torchrec_ext import GroupTBE, TableSpec

    kw = {"optimizer": "adam", "hyperparameters": dict(lr=0.1, lambda21=0.1), **kw}
    return GroupTBE([TableSpec("a", 6, 4), TableSpec("b", 5, 4)], [0, 1], **kw)


def _kernel_unchanged(k):
    w = k.weights.detach().clone()
    states = [{n: v.clone() for n, v in s.items()} for s in k.get_optimizer_state()]
    step, over = int(k.step), copy.deepcopy(k.table_overrides)

    def check():
        assert torch.equal(k.weights, w) and int(k.step) == step
        assert k.table_overrides == over
        for a, b in zip(k.get_optimizer_state(), states):
            assert all(torch.equal(a[n], b[n]) for n in a)
    return check


def _kernel_construct(**kw):
    def make(tmp):
        return (lambda: _kernel(**kw)), _nothing
    return make


def _kernel_forward(indices, offsets, grad=None):
    def make(tmp):
        k = _kernel()
        check = _kernel_unchanged(k)

        def act():
            out = k(torch.tensor(indices), torch.tensor(offsets))
            out.backward(torch.ones_like(out) if grad is None else grad(out))
        return act, check
    return make


def _kernel_overrides(values):
    def make(tmp):
        k = _kernel()
        k.set_table_hyperparameters({"a": {"lambda21": 0.5}})
        check = _kernel_unchanged(k)
        return (lambda: k.set_table_hyperparameters(values)), check
    return make


# ------------------------------------------------------------------ TorchRec glue, strategy
def _ebc():
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig

    return EmbeddingBagCollection(tables=[
        EmbeddingBagConfig(name=n, embedding_dim=4, num_embeddings=10, feature_names=[f"f_{n}"])
        for n in ("t0", "t1")], device=torch.device("meta"))


def _tags_unchanged(ebc):
    def check():
        from torchrec_ext import is_group_tagged

        assert not any(is_group_tagged(p) for p in ebc.parameters())
    return check


def _apply(cls, **kw):
    def make(tmp):
        from torchrec_ext import apply_group_optimizer

        ebc = _ebc()
        return (lambda: apply_group_optimizer(ebc, cls, **kw)), _tags_unchanged(ebc)
    return make


def _planner_enumerator(tmp):
    from torchrec.distributed.planner import Topology

    from torchrec_ext import group_planner

    return (lambda: group_planner(Topology(world_size=1, compute_device="cpu"),
                                  enumerator=object())), _nothing


def _strategy(**kw):
    def make(tmp):
        from lightning_sgl import TorchRecStrategy

        return (lambda: TorchRecStrategy(**kw)), _nothing
    return make


def _callback(name, *args, **kw):
    def make(tmp):
        import lightning_sgl

        return (lambda: getattr(lightning_sgl, name)(*args, **kw)), _nothing
    return make


class _FakeTables:
    """Two TorchRec-like tables (500 and 100 rows, dim 8, one feature) for the budget check."""

    names = ["t0", "t1"]

    def layouts(self):
        return {"t0": (500, 8, 1), "t1": (100, 8, 1)}


def _budget(target_bytes, **kw):
    """SparsityMonitor's train-start check of a budget (the first thing on_train_start does
    with the tables, before any lambda21 is set)."""
    def make(tmp):
        import lightning_sgl

        monitor = lightning_sgl.SparsityMonitor(target_bytes=target_bytes, **kw)
        monitor._tables = _FakeTables()
        return monitor._check_budget, _nothing
    return make


def _model_optimizer_missing_part(tmp):
    from lightning_sgl.factory import ModelOptimizer

    table, opt = _table_opt()
    mo = ModelOptimizer([("tables", opt), ("dense", torch.optim.SGD([torch.nn.Parameter(
        torch.zeros(1))], lr=0.1))])
    check = _opt_unchanged(table, opt)
    return (lambda: mo.load_state_dict({"tables": opt.state_dict()})), check


# ------------------------------------------------------------------ readers
def _file_unchanged(path):
    data = path.read_bytes()

    def check():
        assert path.read_bytes() == data
    return check


CRITEO_OK = "\t".join(["1", *["3"] * 13, *["ab"] * 26])


def _reader(source, name, content: bytes):
    def make(tmp):
        from lightning_sgl.data import readers

        path = tmp / name
        path.write_bytes(content)
        return (lambda: readers.read(source, str(path))), _file_unchanged(path)
    return make


def _stream(fmt, name, content: bytes | None, **kw):
    """Build a streaming reader of ``content`` (None: no file) and read it whole."""
    def make(tmp):
        from lightning_sgl.data.streaming import StreamingCTRDataset

        path = tmp / name
        if content is not None:
            path.write_bytes(content)

        def action():
            return list(StreamingCTRDataset(str(path), fmt, cache_dir=str(tmp / "cache"), **kw))
        return action, (_file_unchanged(path) if content is not None else (lambda: None))
    return make


# ------------------------------------------------------------------ export, checkpoints
def _serving_file(mutate):
    def make(tmp):
        path = tmp / "serving.pt"
        mutate(path)
        return (lambda: _serving().load_serving(str(path))), _file_unchanged(path)
    return make


def _serving():
    from torchrec_ext import serving

    return serving


def _garbage(path):
    path.write_bytes(b"not a checkpoint at all" * 10)


def _truncated_serving(path):
    table = _serving().ServingTable("t", ["f"], "sum", 8, torch.tensor([0, 3]), torch.ones(2, 4))
    _serving().save_serving(_serving().ServingEmbeddingBagCollection([table]), path)
    path.write_bytes(path.read_bytes()[:2000])


def _other_torchscript(path):
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))


def _serving_call(build):
    """A serving-export call that must be refused (no file or state to change)."""
    def make(tmp):
        return (lambda: build(_serving())), (lambda: None)
    return make


def _configs():
    from torchrec import EmbeddingBagConfig

    return [EmbeddingBagConfig(name="t0", embedding_dim=4, num_embeddings=8, feature_names=["f0"])]


def _table(ids, weights, rows=8):
    return lambda s: s.ServingTable("t", ["f"], "sum", rows, torch.tensor(ids), weights)


def _checkpoint(mutate):
    def make(tmp):
        from lightning_sgl import checkpoint

        folder = tmp / "ckpt"
        folder.mkdir()
        for name, payload in (("shard_0.distcp", os.urandom(4096)), (".metadata", b"m" * 64)):
            (folder / name).write_bytes(payload)
        checkpoint.write_manifest(str(folder), {n: checkpoint.file_digest(str(folder / n))
                                                for n in ("shard_0.distcp", ".metadata")})
        mutate(folder)
        files = {p.name: p.read_bytes() for p in folder.iterdir()}

        def check():
            assert {p.name: p.read_bytes() for p in folder.iterdir()} == files
        return (lambda: checkpoint.verify(str(folder))), check
    return make


def _flip(folder):
    p = folder / "shard_0.distcp"
    data = bytearray(p.read_bytes())
    data[1000] ^= 0xFF
    p.write_bytes(bytes(data))


def _truncate_shard(folder):
    p = folder / "shard_0.distcp"
    p.write_bytes(p.read_bytes()[:2000])


def _truncate_metadata(folder):
    (folder / ".metadata").write_bytes(b"m" * 10)


def _no_manifest(folder):
    (folder / "manifest.json").unlink()


CASES = [
    # optimizers (torch.optim front end)
    Case("opt-lr", ValueError, r"Invalid learning rate \(lr\): -1.0", _construct(GroupAdam, lr=-1.0)),
    Case("opt-lambda21", ValueError, r"Invalid lambda21", _construct(GroupAdam, lambda21=-0.1)),
    Case("opt-lambda1-nan", ValueError, r"Invalid lambda1", _construct(GroupAdam,
                                                                        lambda1=float("nan"))),
    Case("opt-betas", ValueError, r"Invalid beta", _construct(GroupAdam, betas=(1.0, 0.9))),
    Case("opt-group_by", ValueError, r"Invalid group_by: 'rows'",
         _construct(GroupAdam, group_by="rows")),
    Case("opt-nonfinite", ValueError, r"Invalid nonfinite: 'ignore'",
         _construct(GroupAdam, nonfinite="ignore")),
    Case("opt-rowwise-sgd", TypeError, r"rowwise", _construct(GroupSGD, rowwise=True)),
    Case("opt-n_samples", ValueError, r"Invalid n_samples: 0",
         _construct(GroupAdaHessian, n_samples=0)),
    Case("opt-lr-between-steps", ValueError, r"Invalid learning rate \(lr\)", _set_between_steps("lr", -2.0)),
    Case("opt-nan-gradient", NonFiniteGradientError, r"non-finite \(NaN/Inf\) gradient",
         _nan_gradient),
    Case("opt-load-other-type", ValueError, r"GroupAdagrad|lr_decay|optimizer",
         _load_other_optimizer),
    Case("opt-load-wrong-shape", ValueError, r"shape", _load_wrong_shape),
    # fused kernel
    Case("kernel-optimizer", ValueError, r"Invalid optimizer: 'adadelta'",
         _kernel_construct(optimizer="adadelta")),
    Case("kernel-pooling", ValueError, r"Invalid pooling: 'max'", _kernel_construct(pooling="max")),
    Case("kernel-dtype", ValueError, r"Invalid dtype", _kernel_construct(dtype=torch.float16)),
    Case("kernel-nonfinite", ValueError, r"Invalid nonfinite", _kernel_construct(nonfinite="x")),
    Case("kernel-ids-out-of-range", ValueError, r"out of range",
         _kernel_forward([0, 7, 1], [0, 2, 3])),
    Case("kernel-decreasing-offsets", ValueError, r"Invalid offsets: must start at 0, never "
         r"decrease", _kernel_forward([0, 1, 2], [0, 2, 1])),
    Case("kernel-offsets-count", ValueError, r"Invalid offsets: 4 entries",
         _kernel_forward([0, 1, 2], [0, 1, 2, 3])),
    Case("kernel-nan-gradient", NonFiniteGradientError, r"non-finite",
         _kernel_forward([0, 1, 2], [0, 2, 3], grad=lambda o: torch.full_like(o, float("inf")))),
    Case("kernel-override-key", ValueError, r"Invalid per-table hyperparameters \['betas'\]",
         _kernel_overrides({"a": {"betas": (0.5, 0.5)}})),
    Case("kernel-override-table", ValueError, r"Invalid table: 'zz'",
         _kernel_overrides({"b": {"lambda21": 0.2}, "zz": {"lambda21": 0.1}})),
    Case("kernel-override-value", ValueError, r"Invalid lambda21",
         _kernel_overrides({"b": {"lambda21": -1.0}})),
    # TorchRec glue
    Case("apply-unfusable", ValueError, r"Invalid optimizer_cls: GroupAdaHessian cannot run "
         "fused", _apply(GroupAdaHessian, lr=0.1)),
    Case("apply-unknown-table", ValueError, r"Invalid tables: \['t9'\]",
         _apply(GroupAdam, tables=["t0", "t9"])),
    Case("apply-bad-value-later-table", ValueError, r"Invalid lambda21",
         _apply(GroupAdam, lambda21=0.1, per_table={"t1": {"lambda21": -1.0}})),
    Case("planner-enumerator", ValueError, r"Invalid argument enumerator",
         _planner_enumerator),
    # Lightning: strategy, callbacks, optimizer container
    Case("strategy-verify", ValueError, r"Invalid verify_checkpoints: 'yes'",
         _strategy(verify_checkpoints="yes")),
    Case("strategy-comm-hook", ValueError, r"Invalid argument ddp_comm_hook",
         _strategy(ddp_comm_hook=print)),
    Case("grouplasso-optimizer", ValueError, r"Invalid optimizer: 'GroupNope'",
         _callback("GroupLasso", "GroupNope")),
    Case("grouplasso-lambda", ValueError, r"Invalid lambda21", _callback("GroupLasso",
                                                                         lambda21=-1.0)),
    Case("monitor-target", ValueError, r"Invalid target_feature_rate: 1.5",
         _callback("SparsityMonitor", 1.5)),
    Case("monitor-tune-every", ValueError, r"Invalid tune_every_n_steps: 0",
         _callback("SparsityMonitor", 0.2, tune_every_n_steps=0)),
    Case("monitor-schedule-share-one", ValueError, r"Invalid schedule_share: 1.0 \(valid range: "
         r"0 <= share < 1\)", _callback("SparsityMonitor", 0.2, schedule_share=1.0)),
    Case("monitor-schedule-share-negative", ValueError, r"Invalid schedule_share: -0.1",
         _callback("SparsityMonitor", 0.2, schedule_share=-0.1)),
    Case("monitor-schedule-shape", ValueError, r"Invalid schedule: 'exp' \(valid options: cubic, "
         r"linear\)", _callback("SparsityMonitor", 0.2, schedule_share=0.5, schedule="exp")),
    Case("monitor-schedule-no-target", ValueError, r"Invalid schedule_share: a schedule needs "
         "target_feature_rate", _callback("SparsityMonitor", None, schedule_share=0.5)),
    Case("monitor-refit-share-one", ValueError, r"Invalid refit_share: 1.0 \(valid range: "
         r"0 <= share < 1\)", _callback("SparsityMonitor", 0.2, refit_share=1.0)),
    Case("monitor-refit-share-negative", ValueError, r"Invalid refit_share: -0.2",
         _callback("SparsityMonitor", 0.2, refit_share=-0.2)),
    Case("monitor-refit-share-bool", ValueError, r"Invalid refit_share: True",
         _callback("SparsityMonitor", 0.2, refit_share=True)),
    Case("monitor-refit-no-target", ValueError, r"Invalid refit_share: a refit needs "
         "target_feature_rate", _callback("SparsityMonitor", None, refit_share=0.2)),
    Case("monitor-refit-overlaps-ramp", ValueError, r"Invalid refit_share: 0.5 with "
         r"schedule_start 0.3 and schedule_share 0.4 \(the ramp must end before the refit",
         _callback("SparsityMonitor", 0.2, schedule_start=0.3, schedule_share=0.4,
                   refit_share=0.5)),
    Case("monitor-refit-relax", ValueError, r"Invalid refit_relax: 1.5 \(valid range: "
         r"0 <= relax <= 1\)", _callback("SparsityMonitor", 0.2, refit_relax=1.5)),
    Case("monitor-tolerance", ValueError, r"Invalid tolerance: 1.0 \(valid range: "
         r"0 <= tolerance < 1\)", _callback("SparsityMonitor", 0.2, tolerance=1.0)),
    Case("monitor-tolerance-negative", ValueError, r"Invalid tolerance: -0.1 \(valid range",
         _callback("SparsityMonitor", 0.2, tolerance=-0.1)),
    Case("monitor-schedule-start-one", ValueError, r"Invalid schedule_start: 1.0 \(valid range",
         _callback("SparsityMonitor", 0.2, schedule_start=1.0, schedule_share=0.1)),
    Case("monitor-schedule-start-no-ramp", ValueError, r"Invalid schedule_start: a start needs "
         r"a ramp", _callback("SparsityMonitor", 0.2, schedule_start=0.5)),
    Case("monitor-bytes-and-rate", ValueError, r"Invalid target_bytes: give target_bytes or "
         "target_feature_rate, not both", _callback("SparsityMonitor", 0.2, target_bytes=10_000)),
    Case("monitor-bytes-zero", ValueError, r"Invalid target_bytes\['t0'\]: 0 \(a positive",
         _callback("SparsityMonitor", target_bytes={"t0": 0})),
    Case("monitor-serve-dtype", ValueError, r"Invalid serve_dtype: 'int2' \(valid options: fp32, "
         r"fp16, int8, int4\)", _callback("SparsityMonitor", target_bytes=10_000,
                                          serve_dtype="int2")),
    # one row per table costs its remap (4 B per row) + one row aligned to 128 B:
    # t0 2,000 + 128, t1 400 + 128 = 2,656 B
    Case("monitor-bytes-below-one-row", ValueError, r"Invalid target_bytes: 2655 bytes is below "
         r"what one row per table costs in fp32 \(2656 bytes", _budget(2655)),
    Case("monitor-bytes-below-one-row-table", ValueError, r"Invalid target_bytes\['t1'\]: 500 "
         r"bytes is below what one row of it costs in int8 \(528 bytes", _budget(
             {"t1": 500}, serve_dtype="int8")),
    Case("monitor-bytes-unknown-table", ValueError, r"Invalid target_bytes: unknown tables "
         r"\['t9'\]", _budget({"t9": 10_000})),
    Case("pruning-fraction", ValueError, r"Invalid fine_tune_fraction: 1.0",
         _callback("MagnitudePruning", 0.2, fine_tune_fraction=1.0)),
    Case("model-optimizer-missing-part", ValueError, r"no state for parts \['dense'\]",
         _model_optimizer_missing_part),
    # readers
    Case("criteo-label-2", ValueError, r"Invalid Criteo file .*x.txt', line 2: label '2' is not "
         "0 or 1", _reader("criteo", "x.txt", f"{CRITEO_OK}\n2{CRITEO_OK[1:]}\n".encode())),
    Case("criteo-label-nan", ValueError, r"line 1: label 'nan' is not 0 or 1",
         _reader("criteo", "x.txt", f"nan{CRITEO_OK[1:]}\n".encode())),
    Case("criteo-label-text", ValueError, r"line 1: label 'yes' is not a number",
         _reader("criteo", "x.txt", f"yes{CRITEO_OK[1:]}\n".encode())),
    Case("criteo-int-feature", ValueError, r"line 1: integer feature I1 is 'x1'",
         _reader("criteo", "x.txt", CRITEO_OK.replace("\t3", "\tx1", 1).encode() + b"\n")),
    Case("criteo-short-row", ValueError, r"line 2: 3 tab-separated columns \(expected 40",
         _reader("criteo", "x.txt", f"{CRITEO_OK}\n1\t2\t3\n".encode())),
    Case("criteo-not-utf8", ValueError, r"line 2: not utf-8 text \(invalid start byte at byte 2 of the line\)",
         _reader("criteo", "x.txt", f"{CRITEO_OK}\n".encode() + b"1\t\xff\xfe\n")),
    Case("avazu-no-header", ValueError, r"Invalid Avazu file .*, line 1: a CSV header with "
         "'click'", _reader("avazu", "a.csv", b"1,0,14102100\n")),
    Case("avazu-short-row", ValueError, r"line 3: 2 comma-separated fields \(the header has 4\)",
         _reader("avazu", "a.csv", b"id,click,hour,C1\n1,0,14102100,5\n2,1\n")),
    Case("avazu-long-row", ValueError, r"line 2: 5 comma-separated fields",
         _reader("avazu", "a.csv", b"id,click,hour,C1\n1,0,14102100,5,9\n")),
    Case("avazu-label-minus-one", ValueError, r"line 2: click '-1' is not 0 or 1",
         _reader("avazu", "a.csv", b"id,click,hour,C1\n1,-1,14102100,5\n")),
    Case("movielens-rating", ValueError, r"Invalid MovieLens file .*u.data', line 1: rating "
         "'good' is not a number", _reader("movielens", "u.data", b"1\t2\tgood\t0\n")),
    Case("reader-source", ValueError, r"Invalid source: 'kdd' \(valid options: criteo, avazu, "
         "movielens\\)", _reader("kdd", "x.txt", b"")),
    # streaming readers (the vocabulary pass reads every line: errors surface at construction)
    Case("stream-criteo-columns", ValueError, r"Invalid Criteo file .*c.txt', line 2: 2 "
         r"tab-separated columns \(expected 40", _stream("criteo", "c.txt",
                                                        (CRITEO_OK + "\n1\t2\n").encode())),
    Case("stream-criteo-columns-hashed", ValueError, r"Invalid Criteo file .*c.txt', line 2: 2 "
         "tab-separated", _stream("criteo", "c.txt", (CRITEO_OK + "\n1\t2\n").encode(),
                                  hash_size=10)),
    Case("stream-libsvm-label", ValueError, r"Invalid libsvm file .*s.txt', line 2: label 'yes' "
         "is not a number", _stream("libsvm", "s.txt", b"1 3:1\nyes 4:1\n")),
    Case("stream-libsvm-pair", ValueError, r"Invalid libsvm file .*s.txt', line 1: feature '3-1' "
         "is not idx:val", _stream("libsvm", "s.txt", b"1 3-1\n")),
    Case("stream-libsvm-value", ValueError, r"Invalid libsvm file .*s.txt', line 1: value of "
         "'3:x' is not a number", _stream("libsvm", "s.txt", b"1 3:x\n")),
    Case("stream-libsvm-index", ValueError, r"line 1: feature 'a:1': index 'a' is not a "
         "non-negative integer", _stream("libsvm", "s.txt", b"0 a:1\n")),
    Case("stream-libffm-triple", ValueError, r"Invalid libffm file .*f.txt', line 3: feature "
         "'2:5' is not field:idx:val", _stream("libffm", "f.txt", b"1 0:1:1\n0 1:2:1\n1 2:5\n")),
    Case("stream-libffm-field", ValueError, r"line 1: feature '7:1:1': field 7 >= num_fields 3",
         _stream("libffm", "f.txt", b"1 7:1:1\n", num_fields=3)),
    Case("stream-empty-file", ValueError, r"Invalid libsvm file .*s.txt', line 1: the file is "
         "empty", _stream("libsvm", "s.txt", b"")),
    Case("stream-missing-file", FileNotFoundError, r"Invalid path: .*nope.txt' does not exist",
         _stream("criteo", "nope.txt", None)),
    Case("stream-empty-line", ValueError, r"Invalid libsvm file .*s.txt', line 2: empty line",
         _stream("libsvm", "s.txt", b"1 3:1\n\n0 2:1\n")),
    Case("stream-avazu-fields", ValueError, r"Invalid Avazu file .*a.csv', line 3: 3 "
         r"comma-separated fields \(the header has 4\)",
         _stream("avazu", "a.csv", b"id,click,hour,C1\n1,0,14102100,5\n2,1,14102100\n")),
    Case("stream-format", ValueError, r"Invalid fmt: 'csv' \(valid options: criteo, avazu, "
         r"libsvm, libffm, criteo_binary\)", _stream("csv", "s.txt", b"1 3:1\n")),
    # export
    Case("serving-garbage", ValueError, r"Invalid serving file .*serving.pt'?: not readable",
         _serving_file(_garbage)),
    Case("serving-truncated", ValueError, r"Invalid serving file .*serving.pt'?: not readable",
         _serving_file(_truncated_serving)),
    Case("serving-other-file", ValueError, r"serving.pt'?: format None \(expected "
         r"'lightning_sgl.serving/1'", _serving_file(_other_torchscript)),
    Case("serving-unsorted-ids", ValueError, r"Invalid table 't': ids must be strictly",
         _serving_call(lambda s: s.ServingEmbeddingBagCollection(
             [_table([5, 0, 3], torch.ones(3, 4))(s)]))),
    Case("serving-nan-weights", ValueError, r"Invalid table 't': non-finite weights",
         _serving_call(lambda s: s.ServingEmbeddingBagCollection(
             [_table([0, 3], torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))(s)]))),
    Case("serving-data-type", ValueError, r"Invalid data_type: 'int3' \(valid options: fp32, "
         r"fp16, int8, int4\)", _serving_call(lambda s: s.ServingEmbeddingBagCollection(
             [_table([0], torch.ones(1, 4))(s)], data_type="int3"))),
    Case("serving-int4-odd-dim", ValueError, r"Invalid data_type 'int4' for table 't': dim 3 is "
         "not a multiple of 2", _serving_call(lambda s: s.ServingEmbeddingBagCollection(
             [_table([0], torch.ones(1, 3))(s)], data_type="int4"))),
    Case("serving-two-sources", ValueError, r"checkpoint and weights are both given",
         _serving_call(lambda s: s.export_serving(_configs(), checkpoint="x", weights={}))),
    Case("serving-weights-shape", ValueError, r"Invalid weights of table 't0': shape \(4, 4\) "
         r"\(the config says \[8, 4\]\)", _serving_call(lambda s: s.export_serving(
             _configs(), weights={"t0": torch.ones(4, 4)}))),
    # checkpoint loading
    Case("ckpt-flipped-bytes", Exception, r"shard_0.distcp is corrupt \(sha256",
         _checkpoint(_flip)),
    Case("ckpt-truncated-shard", Exception, r"shard_0.distcp has 2000 bytes",
         _checkpoint(_truncate_shard)),
    Case("ckpt-truncated-metadata", Exception, r"\.metadata has 10 bytes",
         _checkpoint(_truncate_metadata)),
    Case("ckpt-no-manifest", Exception, r"no manifest.json \(the save did not complete",
         _checkpoint(_no_manifest)),
]


def test_the_table_is_wide():
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)
    areas = {c.id.split("-")[0] for c in CASES}
    assert {"opt", "kernel", "apply", "strategy", "grouplasso", "monitor", "criteo", "avazu",
            "serving", "ckpt", "stream"} <= areas


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_clearly_and_changes_nothing(case, tmp_path):
    action, unchanged = case.make(tmp_path)
    with pytest.raises(case.error, match=case.match):
        action()
    unchanged()
