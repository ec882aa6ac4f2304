"""The rendezvous protocol beneath :class:`rendezvous.participant.Participant`: pure
decisions (``decide``, ``reachability``), the step executor and the round's election and
close (``executor``, ``coordination``, ``rounds``, ``round_members``, ``answers``), what a
node watches (``inbox``, ``job_view``, ``notices``) and its leases (``session``,
``leases``, ``presence``).
"""
