"""aTLAS: learned anisotropic scaling of task vectors (Zhang et al., arXiv 2407.02880).

θ = θ0 + Σ_t Σ_b λ_{t,b} τ_{t,b}: one learned coefficient per task vector per parameter block,
the task vectors frozen. Public API:

* blocks -- :func:`parse_granularity`, :func:`build_partition` (:class:`Partition`),
  :class:`Packing` (the flat chunked layout);
* composition -- :class:`VectorStack`, :class:`ComposedEncoder` (the fused composed model),
  and the pure :func:`compose_state`, :func:`composed_vector`, :func:`compose_tensor`;
* objectives -- ``ce``, ``entropy``, ``infomax``, ``ufm``, ``negation``
  (:mod:`tvtool.atlas.objectives`); protocols -- ``adamerging``, ``atlas``, ``tvtool``
  (:mod:`tvtool.atlas.protocols`, each reference's loop and defaults; the batches each step
  sees in :mod:`tvtool.atlas.draws`);
* learning -- :func:`learn` (:class:`LearnerConfig`, :class:`TaskData`, :class:`LearnResult`;
  :mod:`tvtool.atlas.learner`, :mod:`tvtool.atlas.config`), the candidates it evaluates and
  keeps (:mod:`tvtool.atlas.selection`), the examples it learns on (:func:`split_examples`,
  :mod:`tvtool.atlas.examples`), image augmentation (:mod:`tvtool.atlas.augment`) and the UFM
  objective's pseudo-labels (:mod:`tvtool.atlas.ufm`);
* files -- :class:`CoefficientSet`, :func:`read_coefficients`, :func:`write_coefficients`.

The command's workflow (files and datasets in, coefficient file out) is
:func:`tvtool.workflows.learn_coeffs.learn_coeffs`.

See docs/coeffs.md.
"""

from tvtool.atlas.blocks import (
    Granularity,
    Packing,
    Partition,
    TensorSpec,
    build_partition,
    layer_of,
    parse_granularity,
)
from tvtool.atlas.compose import (
    ComposedEncoder,
    VectorStack,
    compose_state,
    compose_tensor,
    composed_vector,
)
from tvtool.atlas.examples import split_examples
from tvtool.atlas.files import (
    COEFFICIENTS_TENSOR,
    CoefficientSet,
    coefficient_set_from_source,
    read_coefficients,
    write_coefficients,
)
from tvtool.atlas.learner import LearnerConfig, LearnResult, TaskData, learn
from tvtool.atlas.objectives import OBJECTIVES
from tvtool.atlas.protocols import PROTOCOLS

__all__ = [
    "COEFFICIENTS_TENSOR",
    "OBJECTIVES",
    "PROTOCOLS",
    "CoefficientSet",
    "ComposedEncoder",
    "Granularity",
    "LearnResult",
    "LearnerConfig",
    "Packing",
    "Partition",
    "TaskData",
    "TensorSpec",
    "VectorStack",
    "build_partition",
    "coefficient_set_from_source",
    "compose_state",
    "compose_tensor",
    "composed_vector",
    "layer_of",
    "learn",
    "parse_granularity",
    "read_coefficients",
    "split_examples",
    "write_coefficients",
]
