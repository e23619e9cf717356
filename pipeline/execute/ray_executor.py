"""The Ray executor: one Ray task per strip of blocks, a bounded number in flight, the model put in
the object store once. Ray is imported when the executor starts, not when this module is.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from pipeline.config import RaySpec
from pipeline.errors import BlockError, ConfigError, Interrupted
from pipeline.execute.memory import WorkerMemory, device_free, per_task, tasks_per_gpu
from pipeline.execute.ray_session import RaySession, unwrapped
from pipeline.execute.worker import BlockTask, OnDone, run_strip, strip_name
from pipeline.plan import Block


class RayExecutor:
    """One Ray task per strip of blocks (often one block), at most ``max_in_flight`` submitted at once.

    ``ray.address`` None starts a local Ray instance for the run and stops it after (unless this
    process already joined one, as a notebook or a test session may have); "auto" or an address
    joins a running cluster.
    """

    name = "ray"

    def __init__(self, spec: RaySpec, search_path: str | None = None) -> None:
        self.spec = spec
        self.search_path = search_path
        # Workers unpickle the user's model by reference: let them import from the config's folder.
        paths = [p for p in (search_path, os.environ.get("PYTHONPATH")) if p]
        runtime_env = {"env_vars": {"PYTHONPATH": os.pathsep.join(paths)}} if paths else None
        self._session = RaySession(spec.address, "ray.address", ConfigError, runtime_env, spec.connect_timeout_s)

    def start(self) -> None:
        """Join or start Ray, and refuse a cluster without the CPUs or GPUs one task asks for."""
        self._session.start()
        resources = self._session.ray.cluster_resources()
        if self.spec.gpus_per_task > 0 and resources.get("GPU", 0) < self.spec.gpus_per_task:
            raise ConfigError("ray.gpus_per_task", f"{self.spec.gpus_per_task} GPUs per task requested, but the Ray "
                              f"cluster has {resources.get('GPU', 0):g} GPUs")
        if resources.get("CPU", 0) < self.spec.cpus_per_task:
            raise ConfigError("ray.cpus_per_task", f"{self.spec.cpus_per_task} CPUs per task requested, but the Ray "
                              f"cluster has {resources.get('CPU', 0):g} CPUs")

    def stop(self) -> None:
        self._session.stop()

    def slots(self) -> int:
        """Block tasks the cluster runs at once."""
        resources = self._session.ray.cluster_resources()
        slots = resources.get("CPU", 1) / self.spec.cpus_per_task
        if self.spec.gpus_per_task > 0:
            slots = min(slots, resources.get("GPU", 0) / self.spec.gpus_per_task)
        return max(1, int(slots))

    def worker_memory(self, gpu: bool) -> WorkerMemory:
        """Measured by one Ray task with a block task's resources (so on a node, and a GPU, that block
        tasks get), divided by the block tasks that share it: those per GPU with ``gpu``, else those
        the node runs at once. One node's figure: on a cluster of unlike nodes, give tiling.block a number.
        """
        ray = self._session.ray
        probe: Any = ray.remote(_measure).options(num_cpus=self.spec.cpus_per_task, num_gpus=self.spec.gpus_per_task)
        with unwrapped(ConfigError, "tiling.block", "auto: measuring a worker's memory failed: "):
            free, what, node = ray.get(probe.remote(gpu))
        if gpu:
            sharing = tasks_per_gpu(self.spec.gpus_per_task)
        else:
            resources: dict[str, float] = next((n["Resources"] for n in ray.nodes() if n.get("NodeID") == node), {})
            tasks = resources.get("CPU", 1) / self.spec.cpus_per_task
            if self.spec.gpus_per_task > 0:
                tasks = min(tasks, resources.get("GPU", 0) / self.spec.gpus_per_task)
            sharing = int(tasks)
        return replace(per_task(free, what, sharing), workers=self.slots())

    def run(self, task: BlockTask, strips: Iterable[list[Block]], on_done: OnDone) -> None:
        """Submit the strips as Ray tasks, keeping at most ``max_in_flight`` (default: twice the slots)
        pending, and call ``on_done`` with each block's result as its strip finishes.

        Raises:
          PipelineError: a task's own error, as itself; BlockError naming the blocks for any other
            failure (after ``ray.max_retries`` retries of a worker that died).
        """
        ray = self._session.ray
        remote: Any = ray.remote(run_strip).options(
            num_cpus=self.spec.cpus_per_task, num_gpus=self.spec.gpus_per_task, max_retries=self.spec.max_retries,
        )
        task_ref = ray.put(task)  # the model's parameters go to the object store once
        todo = iter(strips)
        pending: dict[Any, list[Block]] = {}
        limit = self.spec.max_in_flight or 2 * self.slots()  # keep every slot busy while results come back
        try:
            while True:
                while len(pending) < limit and (strip := next(todo, None)) is not None:
                    pending[remote.remote(task_ref, strip)] = strip
                if not pending:
                    return
                # A bounded wait, so that SIGINT and SIGTERM reach this thread within a second.
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
                for ref in ready:
                    strip = pending.pop(ref)
                    with unwrapped(BlockError, strip_name(strip)):
                        results = ray.get(ref)
                    for result in results:
                        on_done(result)
        except KeyboardInterrupt as err:  # SIGINT, SIGTERM (errors.Interrupted): the driver's exit ends its
            # tasks, not a ray.cancel, which racing a task that just finished aborts the whole process in Ray
            # 2.60 ("Tried to complete task that was not pending"). ray.wait re-raises our Interrupted as a
            # plain KeyboardInterrupt: the signal's name is put back.
            pending.clear()
            raise Interrupted.of(err) from None
        finally:
            for ref in pending:
                ray.cancel(ref)


def _measure(gpu: bool) -> tuple[int, str, str]:
    """In a Ray worker: its device's free bytes, what was measured, and its node's id."""
    import ray

    free, what = device_free(gpu)
    return free, what, ray.get_runtime_context().get_node_id()
