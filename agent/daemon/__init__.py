"""The per-node daemon behind ``elastic-agent start``: settings, the loop, the workers' processes."""
