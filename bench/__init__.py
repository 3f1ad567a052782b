"""The tda-bench harness: CLI, ground-truth retraining and its cache, metrics, records,
loggers. One run = (task, estimator, seed) -> metrics."""
