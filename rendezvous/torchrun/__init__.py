"""torchrun's ``--rdzv-backend etcd-v3``: the ``RendezvousHandler`` on ``Participant``
(``plugin``), its flags (``conf``) and a ``torch.distributed.Store`` on etcd (``c10d_store``).
Only this package imports torch in ``rendezvous``, and only when torchrun loads it.
"""
