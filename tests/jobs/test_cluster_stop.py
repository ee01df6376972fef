"""A worker process freezes its start-up objects; embedded Ray's shutdown leaves none of its processes
behind (real Ray, token authentication on)."""

import gc

import ray
from ray._private import worker as ray_worker

from rayquant.jobs.cluster import EMBEDDED, connect, create_workers, disconnect
from rayquant.jobs.spec import ClusterSpec


class Idle:
    def __init__(self, setup: object):
        pass

    def join(self, rendezvous: str) -> int:
        return 0

    def frozen(self) -> int:
        return gc.get_freeze_count()


def test_a_joined_worker_is_frozen_and_an_embedded_cluster_s_shutdown_reaps_every_process_it_started() -> None:
    assert not ray.is_initialized()
    cluster = connect(ClusterSpec(num_workers=1), verbose=False)
    assert cluster.where == EMBEDDED
    workers = create_workers(Idle, 1, num_cpus=1, num_gpus=0)
    ray.get([w.setup.remote(None, "") for w in workers])
    # the imports (here: Ray's, this module's) are out of the collector's reach once the worker has joined
    assert ray.get(workers[0].call.remote("frozen")) > 10_000
    processes = [info.process for infos in ray_worker._global_node.all_processes.values() for info in infos]
    assert {"raylet", "gcs_server", "monitor"} <= set(ray_worker._global_node.all_processes)
    ray.kill(workers[0])
    disconnect(cluster)
    assert not ray.is_initialized()
    assert all(p.poll() is not None for p in processes), [p.args[:2] for p in processes if p.poll() is None]
