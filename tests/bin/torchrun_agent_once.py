"""One torch elastic agent (LocalElasticAgent, as torch's own agent tests build it) on the
etcd-v3 plug-in: ``ENDPOINT RUN_ID SLEEP_S EXIT_BARRIER_TIMEOUT``. Its one worker sleeps
SLEEP_S and exits 0; prints the agent's result and whether shutdown closed the job."""

import sys
import tempfile

from torch.distributed.elastic.agent.server.api import WorkerSpec
from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
from torch.distributed.elastic.rendezvous import RendezvousParameters, registry

endpoint, run_id, sleep_s, barrier_s = sys.argv[1:5]
params = RendezvousParameters(backend="etcd-v3", endpoint=endpoint, run_id=run_id, min_nodes=2, max_nodes=2,
                              local_addr="127.0.0.1", last_call="0.2")
handler = registry.get_rendezvous_handler(params)
spec = WorkerSpec(role="zzz", local_world_size=1, entrypoint=sys.executable,
                  args=("-c", f"import time; time.sleep({sleep_s})"), rdzv_handler=handler, max_restarts=0,
                  monitor_interval=0.1)
with tempfile.TemporaryDirectory() as logs:
    agent = LocalElasticAgent(spec, logs_specs=DefaultLogsSpecs(log_dir=logs), start_method="spawn",
                              exit_barrier_timeout=float(barrier_s))
    result = agent.run()
    print(f"agent result: {result.state.name}", flush=True)
    print(f"shutdown: {handler.shutdown()}", flush=True)
