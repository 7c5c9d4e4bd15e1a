"""The public functional face of the math core (Algorithm 1 of Yue et al., torch only).

This is the only part of ``lightning_sgl.optim`` the other layers (the fused table kernel in
``torchrec_ext``, the callbacks) import. Everything here is pure or writes only the tensors it is
given:

- the three steps of Algorithm 1 and their chain: moment rules (:data:`RULES`, :func:`get_rule`,
  :func:`step_scalars`), the dual update (:func:`dual_update`, :func:`dual_carry`,
  :func:`dual_to_z`), the prox (:func:`soft_threshold`, :func:`group_norm`,
  :func:`group_shrink`, :func:`prox`), chained by :func:`group_step`; :func:`reprox` and
  :func:`group_norms` re-use the state without a gradient;
- in-place row front ends shared by the dense optimizers and the fused tables:
  :func:`apply_dense_`, :func:`apply_rows_`, :func:`accumulate_rows_`, :func:`reprox_rows_`
  (each guards its writes with :func:`rows_finite`), the refit's fixed-support rule
  :func:`support_rows`, and the group layouts :func:`to_groups` /
  :func:`from_groups`;
- one spec per base optimizer (:class:`OptimizerSpec`, :data:`SPECS`, :func:`get_spec`,
  :data:`FUSED_RULES`, :func:`validate_hyperparameters`) and the argument checks;
- :class:`NonFiniteGradientError`.

Reference: Yue et al., *Adaptive Optimizers with Sparse Group Lasso*, Algorithm 1.
"""

from ._dual import dual_carry, dual_to_z, dual_update
from ._functional import (
    accumulate_rows_,
    apply_dense_,
    apply_rows_,
    dual_and_moments,
    from_groups,
    group_norms,
    group_step,
    reprox,
    reprox_rows_,
    row_group_norms,
    rows_finite,
    rowwise_view,
    second_moment_input,
    step_is_finite,
    support_rows,
    to_groups,
)
from ._moments import RULES, MomentRule, get_rule, step_scalars
from ._prox import group_norm, group_shrink, prox, soft_threshold
from ._specs import (
    FLAGS,
    FUSED_RULES,
    LAMBDAS,
    SPECS,
    OptimizerSpec,
    get_spec,
    hyperparameter_names,
    validate_hyperparameters,
)
from ._validation import (
    NONFINITE_OPTIONS,
    NonFiniteGradientError,
    check_bool,
    check_choice,
)

__all__ = [
    "group_step", "dual_and_moments", "step_is_finite", "reprox", "group_norms",
    "second_moment_input", "apply_dense_", "apply_rows_", "accumulate_rows_", "reprox_rows_",
    "row_group_norms",
    "rows_finite", "support_rows", "to_groups", "from_groups", "rowwise_view",
    "RULES", "MomentRule", "get_rule", "step_scalars",
    "dual_update", "dual_carry", "dual_to_z",
    "soft_threshold", "group_norm", "group_shrink", "prox",
    "OptimizerSpec", "SPECS", "get_spec", "FUSED_RULES", "LAMBDAS", "FLAGS",
    "validate_hyperparameters", "hyperparameter_names",
    "NonFiniteGradientError", "NONFINITE_OPTIONS", "check_bool", "check_choice",
]
