"""``make demo``: one elastic job on this machine, through a node failure, a preemption and a join.

    .venv/bin/python -m docs.demo [--plain] [--png FILE] [--restart] [--sharded]

An embedded etcd (127.0.0.1, free ports, a temporary data dir, auto-compaction) and three
simulated nodes: three ``elastic-agent start`` processes, each in a working directory of its
own, sharing one checkpoint directory, training ``docs/examples/train_ddp.py``. The demo
reads each agent's ``/metrics`` and console the way an operator would, kills one node with
``kill -9``, preempts another (SIGTERM: drain, exit 3), starts a fourth that joins, lets the
job finish, and sums it up: steps, restarts by reason, seconds and steps lost per event,
goodput and a chart of step against time.

By default the job recovers in process (``el.run``): the survivors of the ``kill -9`` re-form
the process group in their running workers and go on from the last step they all completed,
and the newcomer gets the state from a survivor. ``--restart`` shows the process-restart loop
(``el.step``) instead: every membership change restarts the workers from the last checkpoint,
so the ``kill -9`` redoes the steps since it. ``--sharded`` trains the FSDP2 example
(``docs/examples/train_fsdp.py``, each rank holding only its shards) through the same story:
in process, the survivors re-shard the lost node's shards onto the smaller group from the
copies the nodes keep of each other's shards in memory; with ``--restart``, from the DCP
checkpoint on disk, re-sharded on load.

Modules: ``nodes`` (the processes it starts and stops), ``metrics`` (one agent's scrape),
``scenario`` (the story), ``display`` (the live screen, or a plain line per update when
stdout is not a terminal), ``report`` (summary and chart).
"""
