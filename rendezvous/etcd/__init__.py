"""The etcd v3 client: the one place that imports ``grpc`` and the etcd stubs (``rpc``).
``store`` is the adapter to :class:`rendezvous.store.Store` (KV, leases, retries, error
translation); ``streams``, ``auth`` and ``tls`` are its channel, credentials and TLS;
``server`` starts a local etcd (tests, benchmarks, ``--standalone``).
"""
