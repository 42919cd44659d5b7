"""The evaluation harness behind ``kvpolicy eval``: tasks, metrics, runner, plot."""
