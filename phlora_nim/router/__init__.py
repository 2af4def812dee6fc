"""The phlora-nim router: an adapter-aware KServe v2 gRPC front for many Triton replicas.

Clients choose an adapter by name (as the model name, the ``lora_adapter`` request parameter or
``phlora-adapter`` gRPC metadata); the router adds ``lora_task_id``, sends the weights only when a
replica lacks them, keeps each adapter on few replicas, and enforces tenants' access rights.
"""

from phlora_nim.router.config import RouterConfig
from phlora_nim.router.server import Router, RouterThread

__all__ = ["Router", "RouterConfig", "RouterThread"]
