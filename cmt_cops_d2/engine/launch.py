"""Multi-process launch: Detectron2's ``launch`` plus a CPU path.

Detectron2 v0.6's ``launch`` requires CUDA and NCCL. This one uses NCCL with one process per GPU when
CUDA is available, and otherwise runs ``num_processes`` CPU workers over the Gloo backend, the same
model / trainer / evaluator code (so a multi-process run can be checked on a machine without GPU).
Multi-machine jobs use ``--num-machines``, ``--machine-rank`` and ``--dist-url tcp://HOST:PORT`` as
with Detectron2. An exception in any worker ends the launch with that exception (non-zero exit).
"""
import logging
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.utils import comm

__all__ = ["launch", "DEFAULT_TIMEOUT"]

DEFAULT_TIMEOUT = timedelta(minutes=30)


def _find_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(main_func, num_processes_per_machine: int, num_machines: int = 1, machine_rank: int = 0,
           dist_url: str = None, args=(), timeout=DEFAULT_TIMEOUT, backend: str = None):
    """Run ``main_func(*args)`` in ``num_processes_per_machine * num_machines`` processes.

    Args:
        num_processes_per_machine: GPUs per machine (``--num-gpus``); on a machine without CUDA, the
            number of CPU worker processes.
        dist_url: ``tcp://HOST:PORT`` or ``"auto"`` (a free local port; single machine only).
        backend: ``"nccl"`` or ``"gloo"``; default NCCL with CUDA, else Gloo.
    """
    world_size = num_machines * num_processes_per_machine
    if world_size <= 1:
        return main_func(*args)
    if dist_url is None or dist_url == "auto":
        if num_machines != 1:
            raise ValueError("--dist-url auto works on one machine only; pass tcp://HOST:PORT")
        dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    mp.start_processes(
        _distributed_worker,
        nprocs=num_processes_per_machine,
        args=(main_func, backend, world_size, num_processes_per_machine, machine_rank, dist_url,
              args, timeout),
        daemon=False,
        start_method="spawn",
    )


def _distributed_worker(local_rank, main_func, backend, world_size, num_per_machine, machine_rank,
                        dist_url, args, timeout):
    if backend == "nccl":
        if num_per_machine > torch.cuda.device_count():
            raise RuntimeError(f"{num_per_machine} processes per machine requested but only "
                               f"{torch.cuda.device_count()} CUDA device(s) are visible")
        torch.cuda.set_device(local_rank)
    global_rank = machine_rank * num_per_machine + local_rank
    try:
        dist.init_process_group(backend=backend, init_method=dist_url, world_size=world_size,
                                rank=global_rank, timeout=timeout)
    except Exception:
        logging.getLogger(__name__).error(f"Process group URL: {dist_url}")
        raise
    # Detectron2's comm helpers (get_local_rank, ...) read the per-machine group.
    num_machines = world_size // num_per_machine
    for i in range(num_machines):
        group = dist.new_group(list(range(i * num_per_machine, (i + 1) * num_per_machine)))
        if i == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group
    comm.synchronize()
    try:
        main_func(*args)
    finally:
        dist.destroy_process_group()
