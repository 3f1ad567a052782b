"""The field's own implementations behind tda-bench's contract: peer estimators.

Each module wraps one method of a reference library (kronfluence, dattri, TRAK) so that it
is configured, run, timed and judged exactly like tda-bench's own estimators:
``fit(problem)`` then ``score(problem) -> [n_queries, n_train]``, positive = proponent
(DESIGN.md). Everything a library needs is mapped from the
:class:`~estimators.problem.AttributionProblem` (its loss, measurement, sampled targets,
L2 coefficient, checkpoints and ``model_factory``), never from task-specific code; the
libraries' own files go to a scratch folder under the run folder.

The libraries are an optional extra (``pip install -e ".[peers]"``); a peer whose library
is missing refuses on construction in one sentence that names the extra. The libraries
are imported only inside these modules, so nothing else in tda-bench needs them.
"""
