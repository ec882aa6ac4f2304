"""elastic-agent: the per-node daemon. Never imports torch (only agent.worker's helpers do)."""
