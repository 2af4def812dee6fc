"""The router's OpenAI-compatible HTTP front (``phlora-nim serve --http-port PORT``).

Any OpenAI SDK client picks an adapter with ``model``; the front reuses the router's catalogue,
access control, replica choice, resend-on-miss and back-pressure (the objects of its gRPC service),
tokenizes in the router with each adapter's own tokenizer and chat template, and sends token ids to
TensorRT-LLM's ``tensorrt_llm`` model. Modules: :mod:`app` (routes), :mod:`schemas` (request
bodies and the field policy), :mod:`tokenizer` (tokenizers and chat templates), :mod:`completions`
(checks, admission, fan-out), :mod:`generation` (the engine request), :mod:`decoding` (text and stop
strings), :mod:`responses` (bodies and stream chunks), :mod:`errors`, :mod:`models` (``/v1/models``),
:mod:`server` (uvicorn in the router's event loop).
"""
