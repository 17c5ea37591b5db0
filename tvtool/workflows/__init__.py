"""Workflows: commands that combine a method with evaluation (the layer above ``evaluate``).

* :mod:`tvtool.workflows.evaluator` -- :class:`~tvtool.workflows.evaluator.Evaluator`
  (accuracy of a base model plus task vectors at any coefficients, evaluated as
  :class:`tvtool.evaluate.EvalSettings` say), shared by the searches;
* :mod:`tvtool.workflows.merge_search` -- ``merge --search-coef``: the coefficient search
  (:func:`~tvtool.workflows.merge_search.search_coef`) and its workflow
  (:func:`~tvtool.workflows.merge_search.search_merge`);
* :mod:`tvtool.workflows.negation` -- ``negate --search``: the negation search
  (:func:`~tvtool.workflows.negation.search_negation`) and its workflow
  (:func:`~tvtool.workflows.negation.search_negate`);
* :mod:`tvtool.workflows.learn_coeffs` -- ``learn-coeffs``: aTLAS coefficients learned on
  datasets (:func:`~tvtool.workflows.learn_coeffs.learn_coeffs`).

The methods themselves (``tvtool.merge``, ``tvtool.atlas``, ``tvtool.commands``) import
no evaluation; callers import these modules directly.
"""
