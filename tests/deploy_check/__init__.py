"""make deploy-check: the files in deploy/ run for real on this machine (a real Slurm, a real
Prometheus, every Grafana query), not only parsed. See docs/operations.md, "Deploy check"."""
