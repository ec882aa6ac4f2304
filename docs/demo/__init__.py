"""``make demo``: one elastic job on this machine, through a node failure, a preemption and a join.

    .venv/bin/python -m docs.demo [--plain] [--png FILE]

An embedded etcd (127.0.0.1, free ports, a temporary data dir, auto-compaction) and three
simulated nodes: three ``elastic-agent start`` processes, each in a working directory of its
own, sharing one checkpoint directory, training ``docs/examples/train_ddp.py``. The demo
reads each agent's ``/metrics`` and console the way an operator would, kills one node with
``kill -9``, preempts another (SIGTERM: drain, exit 3), starts a fourth that joins, lets the
job finish, and sums it up: steps, restarts by reason, seconds lost per event, goodput and a
chart of step against time.

Modules: ``nodes`` (the processes it starts and stops), ``metrics`` (one agent's scrape),
``scenario`` (the story), ``display`` (the live screen, or a plain line per update when
stdout is not a terminal), ``report`` (summary and chart).
"""
