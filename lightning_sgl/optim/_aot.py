"""Ahead-of-time compiled (AOTInductor) kernels for the fused-table row update.

``torch.compile`` re-enters dynamo at every call: guard evaluation, AOTAutograd and Inductor
wrappers cost tens of microseconds per call, which is a visible share of a fused embedding step
(one call per step and table segment). For the fused update on CPU we therefore export the same
Python function (:func:`._functional._accumulate_rows_packed_`, the math core unchanged) with
``torch.export`` (dynamic row counts) and compile it with AOTInductor into a package whose runner
is called directly. Packages are cached on disk, keyed by a hash of the exported graph (so a
change of the math gives a new key, never a stale kernel), the torch version, the CPU's
instruction set and the thread count:
``$LIGHTNING_SGL_CACHE_DIR``, else ``$XDG_CACHE_HOME/lightning_sgl/aoti``, else
``~/.cache/lightning_sgl/aoti``.

Only what the export was made for is sent to a runner: CPU, contiguous tensors, ``seen`` flags
given, at least two rows, two unique rows and two indices (dimensions of size 0 or 1 are
specialised by ``torch.export``).
Anything else -- or a failed export or compile (then a warning, once) -- returns ``None`` and the
caller uses the ``torch.compile`` path.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["cache_dir", "run_accumulate"]

_RUNNERS: dict = {}
_BROKEN: set = set()


def cache_dir() -> Path:
    """Where compiled packages are kept (see the module docstring)."""
    env = os.environ.get("LIGHTNING_SGL_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lightning_sgl" / "aoti"


class _Accumulate(nn.Module):
    """``accumulate_rows_`` with its static configuration bound, as an exportable module."""

    def __init__(self, layout, rule_name, rowwise, exact):
        super().__init__()
        self.static = (layout, rule_name, rowwise, exact)

    def forward(self, x2d, idx, inv, g_index, dual2d, flags, packed, states):
        from ._functional import _accumulate_rows_packed_

        layout, rule_name, rowwise, exact = self.static
        return _accumulate_rows_packed_(x2d, idx, inv, g_index, dual2d, states, flags, packed,
                                        layout, rule_name, rowwise, exact)


def _eligible(tensors) -> bool:
    return all(t.device.type == "cpu" and t.is_contiguous() for t in tensors)


def _build(module: nn.Module, args: tuple, dynamic_shapes: tuple):
    ep = torch.export.export(module, args, dynamic_shapes=dynamic_shapes)
    spec = repr([(tuple(t.shape[1:]), t.dtype) for t in _flat(args)])
    # the package is built for this CPU's ISA and thread count (parallel loops or not)
    machine = f"{torch.backends.cpu.get_cpu_capability()} threads={torch.get_num_threads()}"
    digest = hashlib.sha256("\n".join([torch.__version__, machine, spec,
                                        ep.graph_module.code]).encode())
    path = cache_dir() / f"accumulate-{digest.hexdigest()[:32]}.pt2"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".pt2", dir=path.parent)
        os.close(fd)
        try:
            torch._inductor.aoti_compile_and_package(ep, package_path=tmp)
            os.replace(tmp, path)  # atomic: ranks compiling the same kernel do not collide
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return torch._inductor.aoti_load_package(str(path))


def _flat(args):
    for a in args:
        if isinstance(a, tuple):
            yield from _flat(a)
        elif isinstance(a, Tensor):
            yield a


def run_accumulate(key, x2d, idx, inv, g_index, dual2d, states2d, flags, packed, layout,
                   rule_name, rowwise, exact) -> Tensor | None:
    """Run the AOT-compiled update for ``key``: the mask of refused rows (see
    ``_functional.accumulate_rows_``), or ``None`` if it does not apply (nothing was written)."""
    if key in _BROKEN:
        return None
    states2d = tuple(states2d)
    if (flags is None or min(x2d.shape[0], idx.shape[0], inv.shape[0]) < 2
            or not _eligible((x2d, idx, inv, g_index, dual2d, *states2d, packed, flags))):
        return None
    args = (x2d, idx, inv, g_index, dual2d, flags, packed, states2d)
    runner = _RUNNERS.get(key)
    if runner is None:
        rows = torch.export.Dim("rows", min=2)
        uniq = torch.export.Dim("uniq", min=2)
        n = torch.export.Dim("n", min=2)
        dims = ({0: rows}, {0: uniq}, {0: n}, {0: n}, {0: rows}, {0: rows}, {},
                tuple({0: rows} for _ in states2d))
        try:
            runner = _build(_Accumulate(layout, rule_name, rowwise, exact), args, dims)
        except Exception as err:  # compiler missing, export limitation, ...: fall back
            _BROKEN.add(key)
            warnings.warn(f"lightning_sgl: AOT compile of the fused update failed for {key[:5]} "
                          f"({err!r:.200}); using torch.compile", RuntimeWarning, stacklevel=3)
            return None
        _RUNNERS[key] = runner
    return runner(*args)[0]
