"""A study as one Slurm job array through submitit (an existing, maintained launcher; its local executor
runs the same jobs on the machine at hand). Each array task is ``meshnet-lesion segment ... --shard i/N``:
idempotent, so a task that is requeued, or the whole array submitted again, only does what is left.

submitit pickles the task function and its arguments into its own job folder (our own files, never
downloaded ones) and the task unpickles them on the cluster node.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path


def submit_array(command: Callable[[Sequence[str]], int], argv: list[str], tasks: int, folder: Path, *,
                 local: bool, partition: str | None, parallelism: int, gpus: int, cpus: int, mem_gb: int,
                 timeout_min: int) -> list:
    """Submit ``tasks`` array tasks, task i calling ``command(argv + ["--shard", "i/tasks"])`` (the CLI's ``main``,
    pickled by reference); returns submitit's jobs."""
    try:
        import submitit
    except ImportError as error:
        from ..errors import InputError

        raise InputError("submit needs submitit: pip install 'meshnet-lesion[cluster]'") from error
    executor = submitit.AutoExecutor(folder=Path(folder) / "%j", cluster="local" if local else "slurm")
    parameters = {"name": "meshnet-lesion", "timeout_min": timeout_min, "cpus_per_task": cpus, "mem_gb": mem_gb}
    if gpus:
        parameters["gpus_per_node"] = gpus
    if not local:
        parameters.update(slurm_partition=partition, slurm_array_parallelism=parallelism)
    executor.update_parameters(**parameters)
    return executor.map_array(command, [[*argv, "--shard", f"{i}/{tasks}", "-q"] for i in range(tasks)])
