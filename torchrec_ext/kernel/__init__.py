"""``GroupTBE``: the table-batched fused Group-optimizer kernel, one module per job.

- :mod:`.layout` -- flat buffers, per-table offsets, segments of equal width, views;
- :mod:`.plan` -- the lookup plan of a batch, id and offset checks;
- :mod:`.forward` -- pooled lookups (FBGEMM's CPU forward, or ``embedding_bag``);
- :mod:`.update` -- the backward = the optimizer step (native or eager) and the non-finite policy;
- :mod:`.native` -- the compiled CPU update (``torchrec_ext._C``) and its hyperparameter matrix;
- :mod:`.rows` -- row services: column-shard reductions, incremental feature counts, norms,
  prox re-application, pruning;
- :mod:`.tbe` -- the ``GroupTBE`` module that composes them.

Imports with torch alone (FBGEMM and TorchRec are not needed here).
"""

from lightning_sgl.optim.functional import FUSED_RULES, validate_hyperparameters

from .layout import TableSpec
from .tbe import COMPILE_MIN_WEIGHTS, OVERRIDABLE, GroupTBE
from .update import unique_rows

__all__ = ["GroupTBE", "TableSpec", "FUSED_RULES", "COMPILE_MIN_WEIGHTS", "OVERRIDABLE",
           "validate_hyperparameters", "unique_rows"]
