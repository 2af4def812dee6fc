"""Protobuf wire pieces for KServe v2 requests built by appending to their bytes (protobuf parsers append
repeated fields found later in a message, and keep the last value of a scalar one)."""

from __future__ import annotations

from tritonclient.grpc import service_pb2


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


# ``raw_input_contents`` (length-delimited) of ModelInferRequest.
RAW_TAG = varint((service_pb2.ModelInferRequest.DESCRIPTOR.fields_by_name["raw_input_contents"].number << 3) | 2)
