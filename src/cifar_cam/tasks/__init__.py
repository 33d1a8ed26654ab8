"""One small function per command: cfg -> objects -> engine -> files in the run dir."""
