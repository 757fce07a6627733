"""Benchmarks of the adapter variants (not part of the package). Run from the repository root as
modules: ``python -m bench.step_time``, ``python -m bench.layer_time``, ``python -m bench.answer_logits``."""
