"""What operators read: Prometheus metrics, goodput accounting, health endpoints, ``status``."""
