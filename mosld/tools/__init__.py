"""Command-line tools beside the library, each run as ``python -m mosld.tools.<name>``:

- ``memory``: a training step's memory, predicted from the config on the meta device;
- ``harness``: lm-evaluation-harness on a mosld run or adapter, routing intact;
- ``harness_tasks``: mosld's tasks, with mosld's prompts, written as local harness tasks.

Nothing in the library imports this package (``tests/test_imports.py`` checks), so a tool's optional
dependency (lm-eval) is needed only by that tool.
"""
