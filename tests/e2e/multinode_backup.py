"""Run by test_multinode.py in its own process: a 3-node Ray cluster made with
ray.cluster_utils.Cluster (one process tree per node on this machine), a backup with
--shared semantics (the image path is visible to every node), and a report of where the
read tasks ran."""
import json
import sys

import ray
from ray.cluster_utils import Cluster

from alike_ray.sources.image import ImageSource
from pipelines.backup import run_backup
from pipelines.cluster import local_node_id
from pipelines.restore import run_restore

store, image, target = sys.argv[1:4]
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
cluster.add_node(num_cpus=1)
cluster.add_node(num_cpus=1)
cluster.wait_for_nodes()
ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
here = local_node_id()
src = ImageSource(image, name="web", shared=True, node_id=here)
[res] = run_backup(store, [(src, "web")], parallel=1, node_id=here)
rst = run_restore(store, "web", None, [target], node_id=here)
print(json.dumps({"nodes": len(ray.nodes()), "backup": res, "restore": rst}))
ray.shutdown()
cluster.shutdown()
