"""The GPU check (``make gpu-check``, ``bash tests/gpu/run.sh``): the end-to-end scenarios on real
NVIDIA GPUs with CUDA tensors (NCCL where there is a GPU per rank), and a CPU dry run of the
same. Never part of ``make test``: nothing here is named ``test_*``."""
