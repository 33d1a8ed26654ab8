"""One thin module per command: cfg -> objects -> files in the run dir (tasks may share tasks.common, not each
other). Imports serve, inference and everything below it."""
