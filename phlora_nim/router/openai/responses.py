"""Answer bodies in OpenAI's shapes: whole completions, and server-sent event chunks for streams.

Streams follow OpenAI (and vLLM): ``data: {chunk}`` events, chat streams open each choice with a
``{"role": "assistant"}`` delta and close it with an empty delta and its ``finish_reason``;
with ``stream_options.include_usage`` every chunk has ``"usage": null`` and a last chunk with no
choices carries the usage; the stream ends with ``data: [DONE]``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from phlora_nim.router.openai.completions import Job

DONE = "data: [DONE]\n\n"


def _id(job: Job) -> str:
    return ("chatcmpl-" if job.kind == "chat.completion" else "cmpl-") + job.id


def whole(job: Job, texts: list[str]) -> dict[str, Any]:
    """The non-streamed answer, ``texts`` being each choice's full text."""
    choices: list[dict[str, Any]] = []
    for i, (choice, text) in enumerate(zip(job.choices, texts, strict=True)):
        if job.kind == "chat.completion":
            item: dict[str, Any] = {
                "index": i,
                "message": {"role": "assistant", "content": text, "refusal": None, "tool_calls": []},
                "logprobs": None,
                "finish_reason": choice.finish_reason,
            }
        else:
            prefix = job.prompt_texts[i // job.n] if job.echo else ""
            item = {"index": i, "text": prefix + text, "logprobs": None, "finish_reason": choice.finish_reason}
            if job.return_token_ids:
                item["prompt_token_ids"] = job.prompts[i // job.n]
        if job.return_token_ids:
            item["token_ids"] = list(choice.tokens)
        choices.append(item)
    body: dict[str, Any] = {
        "id": _id(job),
        "object": job.kind,
        "created": job.created,
        "model": job.model,
        "choices": choices,
        "usage": job.usage(),
        "system_fingerprint": None,
    }
    if job.return_token_ids and job.kind == "chat.completion":
        body["prompt_token_ids"] = job.prompts[0]
    return body


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class ChunkWriter:
    """Builds one stream's chunks."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.opened: set[int] = set()
        self.closed: set[int] = set()
        self.object = "chat.completion.chunk" if job.kind == "chat.completion" else "text_completion"

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> str:
        data: dict[str, Any] = {
            "id": _id(self.job),
            "object": self.object,
            "created": self.job.created,
            "model": self.job.model,
            "choices": choices,
            "system_fingerprint": None,
        }
        if self.job.include_usage:
            data["usage"] = None
        data.update(extra)
        return _event(data)

    def delta(self, index: int, text: str) -> list[str]:
        """The chunks for ``text`` of choice ``index`` (and its finish, once it is done)."""
        job, out = self.job, []
        choice = job.choices[index]
        if index in self.closed:
            return out
        if choice.done:
            self.closed.add(index)
        if job.kind == "chat.completion":
            if index not in self.opened:
                self.opened.add(index)
                role = {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None}
                out.append(self._chunk([{**role, "finish_reason": None}]))
            if text:
                out.append(
                    self._chunk([{"index": index, "delta": {"content": text}, "logprobs": None, "finish_reason": None}])
                )
            if choice.done:
                end: dict[str, Any] = {
                    "index": index,
                    "delta": {},
                    "logprobs": None,
                    "finish_reason": choice.finish_reason,
                }
                if job.return_token_ids:
                    end["token_ids"] = list(choice.tokens)
                out.append(self._chunk([end]))
            return out
        if index not in self.opened:
            self.opened.add(index)
            if job.echo:
                text = job.prompt_texts[index // job.n] + text
        if text or choice.done:
            item: dict[str, Any] = {
                "index": index,
                "text": text,
                "logprobs": None,
                "finish_reason": choice.finish_reason if choice.done else None,
            }
            if choice.done and job.return_token_ids:
                item["token_ids"] = list(choice.tokens)
            out.append(self._chunk([item]))
        return out

    def usage(self) -> str:
        return self._chunk([], usage=self.job.usage())


async def chunks(job: Job, events: AsyncIterator[tuple[int, str]]) -> AsyncIterator[str]:
    """Server-sent events of a stream, from the job's ``(choice, delta)`` events (without ``[DONE]``)."""
    writer = ChunkWriter(job)
    async for index, text in events:
        for chunk in writer.delta(index, text):
            yield chunk
    if job.include_usage:
        yield writer.usage()
