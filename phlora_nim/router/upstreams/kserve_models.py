"""The KServe v2 model RPCs (ready, metadata, config, index) for replicas that speak the OpenAI API.

The gRPC front asks these of "a replica" through ``pool.control``; an OpenAI-speaking replica has no
KServe model, so the answers describe the text model the router presents (see :mod:`kserve_text`).
"""

from __future__ import annotations

from typing import Any

from tritonclient.grpc import model_config_pb2, service_pb2

_INPUTS = (
    ("text_input", "BYTES", model_config_pb2.TYPE_STRING, [1], False),
    ("input_ids", "INT32", model_config_pb2.TYPE_INT32, [-1], True),
    ("max_tokens", "INT32", model_config_pb2.TYPE_INT32, [1], True),
    ("temperature", "FP32", model_config_pb2.TYPE_FP32, [1], True),
    ("top_p", "FP32", model_config_pb2.TYPE_FP32, [1], True),
    ("top_k", "INT32", model_config_pb2.TYPE_INT32, [1], True),
    ("seed", "UINT64", model_config_pb2.TYPE_UINT64, [1], True),
    ("stop_words", "BYTES", model_config_pb2.TYPE_STRING, [-1], True),
)
_OUTPUTS = (
    ("text_output", "BYTES", model_config_pb2.TYPE_STRING, [1]),
    ("output_ids", "INT32", model_config_pb2.TYPE_INT32, [-1]),
)


class KServeModels:
    """Answers in place of a Triton stub: one model, ``name``, ready while the pool has a ready replica."""

    def __init__(self, name: str) -> None:
        self.name = name

    async def ModelReady(self, request: service_pb2.ModelReadyRequest, **_: Any) -> service_pb2.ModelReadyResponse:
        return service_pb2.ModelReadyResponse(ready=request.name == self.name)

    async def ModelMetadata(
        self, request: service_pb2.ModelMetadataRequest, **_: Any
    ) -> service_pb2.ModelMetadataResponse:
        tensor = service_pb2.ModelMetadataResponse.TensorMetadata
        return service_pb2.ModelMetadataResponse(
            name=request.name,
            versions=["1"],
            platform="openai",
            inputs=[tensor(name=n, datatype=d, shape=s) for n, d, _, s, _ in _INPUTS],
            outputs=[tensor(name=n, datatype=d, shape=s) for n, d, _, s in _OUTPUTS],
        )

    async def ModelConfig(self, request: service_pb2.ModelConfigRequest, **_: Any) -> service_pb2.ModelConfigResponse:
        config = model_config_pb2.ModelConfig(name=request.name, platform="openai", max_batch_size=0)
        config.model_transaction_policy.decoupled = True
        for name, _, data_type, dims, optional in _INPUTS:
            config.input.add(name=name, data_type=data_type, dims=dims, optional=optional)
        for name, _, data_type, dims in _OUTPUTS:
            config.output.add(name=name, data_type=data_type, dims=dims)
        return service_pb2.ModelConfigResponse(config=config)

    async def RepositoryIndex(
        self, request: service_pb2.RepositoryIndexRequest, **_: Any
    ) -> service_pb2.RepositoryIndexResponse:
        model = service_pb2.RepositoryIndexResponse.ModelIndex(name=self.name, version="1", state="READY")
        return service_pb2.RepositoryIndexResponse(models=[model])
