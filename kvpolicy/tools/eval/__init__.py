"""``kvpolicy eval``: the command, its tasks, runner, metrics, report and plot."""
