"""Task vectors: algebra, the shared vector rules, streaming plans, similarity.

The package is the public API (``from tvtool.vectors import X``); its modules hold one
concern each:

* :mod:`tvtool.vectors.rules` -- coefficients, metadata consistency, architecture and base
  compatibility, key/shape/dtype checks: the rules every command shares;
* :mod:`tvtool.vectors.algebra` -- pure functions over state dicts (``extract``, ``negate``,
  ``scale``, ``add``, ``apply``) and the per-tensor primitives;
* :mod:`tvtool.vectors.streaming` -- streaming plans (:class:`StreamPlan`, ``plan_extract``);
* :mod:`tvtool.vectors.combine` -- the one streaming combination ``[base +] reduce(vectors)``
  used by apply, negate, eval (``plan_combine``) and merge (:mod:`tvtool.merge.plan`);
* :mod:`tvtool.vectors.similarity` -- norms and cosine similarities.
"""

from tvtool.vectors.algebra import (
    accumulation_dtype,
    add,
    add_to_sum,
    apply,
    extract,
    negate,
    scale,
    start_sum,
    tensor_combine,
    tensor_delta,
)
from tvtool.vectors.combine import (
    MISSING_POLICIES,
    Alignment,
    align_vectors,
    combine_tensor,
    plan_combine,
    weighted_sum,
)
from tvtool.vectors.rules import (
    BATCHNORM_STATISTICS,
    VectorInput,
    batchnorm_warning,
    check_architecture,
    check_coefficients,
    check_finite,
    check_vector_consistency,
    check_vectors_fit_base,
    expand_coefs,
    metadata_warnings,
    moved_batchnorm,
    open_vector,
    open_vector_meta,
)
from tvtool.vectors.similarity import cosine_matrix, vector_norms
from tvtool.vectors.streaming import Producer, StreamPlan, align_keys, plan_extract, state_dict_of

__all__ = [
    "BATCHNORM_STATISTICS",
    "MISSING_POLICIES",
    "Alignment",
    "Producer",
    "StreamPlan",
    "VectorInput",
    "accumulation_dtype",
    "add",
    "add_to_sum",
    "align_keys",
    "align_vectors",
    "apply",
    "batchnorm_warning",
    "check_architecture",
    "check_coefficients",
    "check_finite",
    "check_vector_consistency",
    "check_vectors_fit_base",
    "combine_tensor",
    "cosine_matrix",
    "expand_coefs",
    "extract",
    "metadata_warnings",
    "moved_batchnorm",
    "negate",
    "open_vector",
    "open_vector_meta",
    "plan_combine",
    "plan_extract",
    "scale",
    "start_sum",
    "state_dict_of",
    "tensor_combine",
    "tensor_delta",
    "vector_norms",
    "weighted_sum",
]
