"""Staying in the job: opening etcd as configured (``connect``), waiting for it to answer
again (``reconnect``), fencing that holds on a black-holed link (``fence_guard``), and
probes of peer nodes (``peer_probe``).
"""
