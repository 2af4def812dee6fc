"""``/v1/completions`` and ``/v1/chat/completions``: prompts to choices, answered whole or streamed.

Each request is checked for the caller (the router's :class:`~phlora_nim.router.access.Access`),
tokenized with the adapter's tokenizer, checked against the engine's limits, admitted (the
router's :class:`~phlora_nim.router.admission.Admission`: one slot per choice, so ``n`` counts
against a tenant's ``max_in_flight``), and fanned out: one engine request per choice (prompts × n),
all through the router's delivery path. Streams start only once the first token has come, so that
refusals, back-pressure and unavailable replicas still get their HTTP status (429 / 503 with
``Retry-After``); an error after that is one ``data: {"error": ...}`` event, then ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from phlora_nim.repository.registry import AdapterEntry
from phlora_nim.router.access import request_label
from phlora_nim.router.core import RouterCore
from phlora_nim.router.errors import RequestError
from phlora_nim.router.metrics import UNKNOWN
from phlora_nim.router.openai.decoding import ChoiceText
from phlora_nim.router.openai.errors import ApiError, bad_request, from_request_error
from phlora_nim.router.openai.generation import (
    Sampling,
    choice_seed,
    engine_request,
    generated_text_tokens,
    generated_tokens,
    takes_text,
    text_engine_request,
)
from phlora_nim.router.openai.models import Limits, ModelDirectory
from phlora_nim.router.openai.schemas import ChatCompletionRequest, CompletionRequest
from phlora_nim.router.openai.tokenizer import TemplateError, TextTokenizer
from phlora_nim.router.replicas import ModelInfo
from phlora_nim.router.tenants import Tenant

log = logging.getLogger("phlora_nim.router")


@dataclass
class Call:
    """One HTTP request's accounting: its label once known, recorded exactly once."""

    started: float = field(default_factory=time.perf_counter)
    label: str = UNKNOWN
    recorded: bool = False


@dataclass
class Job:
    """A checked request, ready to run: its target, prompts as token ids and choices."""

    kind: str  # "text_completion" or "chat.completion"
    model: str  # as the client named it
    entry: AdapterEntry | None
    tokenizer: TextTokenizer
    info: ModelInfo
    prompts: list[list[int]]
    prompt_texts: list[str]
    sampling: Sampling
    stops: list[str]
    n: int
    echo: bool = False
    include_usage: bool = False
    return_token_ids: bool = False
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))
    choices: list[ChoiceText] = field(default_factory=list)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.tokens) for c in self.choices)

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


class Completions:
    """Runs completion requests on the router's objects (the :class:`RouterCore` the gRPC front uses too)."""

    def __init__(self, *, core: RouterCore, directory: ModelDirectory) -> None:
        self.core = core
        self.config = core.config
        self.access = core.access
        self.admission = core.admission
        self.metrics = core.metrics
        self.directory = directory

    # accounting ------------------------------------------------------------------------------
    def record(self, call: Call, code: grpc.StatusCode | None) -> None:
        if not call.recorded:
            call.recorded = True
            self.admission.done(call.label, call.started, code)

    def api_error(self, exc: RequestError) -> ApiError:
        wait = max(1, round(self.config.health_interval)) if exc.code == grpc.StatusCode.UNAVAILABLE else 1
        return from_request_error(exc, retry_after=wait)

    # checking --------------------------------------------------------------------------------
    async def _engine(self) -> ModelInfo:
        return await self.core.pool.model_info(self.config.llm_model)

    def _check_prompt(self, ids: list[int], tokenizer: TextTokenizer, limits: Limits, param: str) -> None:
        if not ids:
            raise bad_request(f"{param}: encodes to no tokens; send a non-empty prompt", param=param)
        bad = next((t for t in ids if not 0 <= t < tokenizer.vocab_size), None)
        if bad is not None:
            raise bad_request(
                f"{param}: token id {bad} outside the vocabulary [0, {tokenizer.vocab_size})", param=param
            )
        if limits.max_input_len is not None and len(ids) > limits.max_input_len:
            raise ApiError(
                400,
                f"{param}: {len(ids)} tokens, more than the model's maximum input length of "
                f"{limits.max_input_len} tokens: shorten it",
                param=param,
                code="context_length_exceeded",
            )

    def _max_tokens(self, asked: int | None, prompts: list[list[int]], limits: Limits, *, default: int | None) -> int:
        longest = max(len(p) for p in prompts)
        room = None if limits.max_seq_len is None else limits.max_seq_len - longest
        if asked is None:
            return max(1, min(x for x in (default, room, 4096) if x is not None))
        if room is not None and asked > room:
            raise ApiError(
                400,
                f"max_tokens: {asked} asked, but the model's context of {limits.max_seq_len} tokens leaves "
                f"{room} after a prompt of {longest} tokens: ask for at most {room}",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return asked

    def _sampling(self, request: CompletionRequest | ChatCompletionRequest, max_tokens: int) -> Sampling:
        if request.min_tokens is not None and request.min_tokens > max_tokens:
            raise bad_request(
                f"min_tokens: {request.min_tokens} is more than max_tokens ({max_tokens})", param="min_tokens"
            )
        top_k = request.top_k if request.top_k not in (None, -1, 0) else None
        return Sampling(
            max_tokens=max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            top_k=top_k,
            seed=request.seed,
            min_tokens=request.min_tokens or None,
            ignore_eos=request.ignore_eos,
        )

    def _check_choices(self, prompts: int, n: int) -> None:
        if prompts * n > self.config.max_choices:
            raise bad_request(
                f"n: {prompts} prompt(s) × n = {n} asks for {prompts * n} choices, more than the "
                f"{self.config.max_choices} this server gives per request: send fewer",
                param="n",
            )

    async def _open(
        self, model: str, tenant: Tenant | None, call: Call, *, prompts: int, n: int
    ) -> tuple[AdapterEntry | None, TextTokenizer, ModelInfo, Limits]:
        """What both kinds of job start with: the adapter (None: base), its label on ``call``, its
        tokenizer, the engine model's interface and the limits it sets (choices checked first)."""
        entry = self.access.resolve(model, tenant, base_model=self.directory.base_model)
        call.label = request_label(entry.name if entry else None, self.directory.base_model)
        tokenizer = self.directory.tokenizer(entry)
        self._check_choices(prompts, n)
        info = await self._engine()
        return entry, tokenizer, info, self.directory.limits(info)

    async def completion_job(self, request: CompletionRequest, tenant: Tenant | None, call: Call) -> Job:
        """Check a ``/v1/completions`` request (raises ApiError / RequestError)."""
        raw = request.prompts()
        entry, tokenizer, info, limits = await self._open(request.model, tenant, call, prompts=len(raw), n=request.n)
        prompts, texts = [], []
        for i, p in enumerate(raw):
            ids = tokenizer.encode(p) if isinstance(p, str) else list(p)
            self._check_prompt(ids, tokenizer, limits, "prompt" if len(raw) == 1 else f"prompt[{i}]")
            prompts.append(ids)
            texts.append(p if isinstance(p, str) else tokenizer.decode(ids))
        max_tokens = self._max_tokens(request.max_tokens, prompts, limits, default=16)  # OpenAI's default here
        return Job(
            kind="text_completion",
            model=request.model,
            entry=entry,
            tokenizer=tokenizer,
            info=info,
            prompts=prompts,
            prompt_texts=texts,
            sampling=self._sampling(request, max_tokens),
            stops=request.stops,
            n=request.n,
            echo=request.echo,
            include_usage=request.include_usage,
            return_token_ids=request.return_token_ids,
        )

    async def chat_job(self, request: ChatCompletionRequest, tenant: Tenant | None, call: Call) -> Job:
        """Check a ``/v1/chat/completions`` request: the messages through the adapter's chat template."""
        entry, tokenizer, info, limits = await self._open(request.model, tenant, call, prompts=1, n=request.n)
        try:
            text = tokenizer.render_chat(
                [m.as_template_input() for m in request.messages], template=self.directory.chat_template(entry)
            )
        except TemplateError as exc:
            raise bad_request(f"messages: {exc}", param="messages") from None
        ids = tokenizer.encode(text)
        self._check_prompt(ids, tokenizer, limits, "messages")
        max_tokens = self._max_tokens(request.token_limit, [ids], limits, default=None)
        return Job(
            kind="chat.completion",
            model=request.model,
            entry=entry,
            tokenizer=tokenizer,
            info=info,
            prompts=[ids],
            prompt_texts=[text],
            sampling=self._sampling(request, max_tokens),
            stops=request.stops,
            n=request.n,
            include_usage=request.include_usage,
            return_token_ids=request.return_token_ids,
        )

    # running ---------------------------------------------------------------------------------
    def admit(self, job: Job, tenant: Tenant | None, call: Call) -> contextlib.AbstractContextManager[None]:
        adapter = job.entry.name if job.entry else None
        return self.admission.admit(tenant, call.label, adapter=adapter, slots=len(job.prompts) * job.n)

    async def _choice(self, job: Job, index: int, queue: asyncio.Queue[tuple[int, Any]]) -> None:
        """Run choice ``index``; its text deltas go to ``queue``, then ``None`` (or the exception)."""
        choice = job.choices[index]
        prompt = job.prompts[index // job.n]
        tok = job.tokenizer
        end_id = tok.eos_id if tok.eos_id is not None else -1
        try:
            seed = choice_seed(job.sampling, index)
            if takes_text(job.info):  # the llmapi model: the rendered text goes, text comes back
                text = job.prompt_texts[index // job.n]
                request = text_engine_request(self.config.llm_model, job.info, text, job.sampling, seed=seed)
            else:
                request = engine_request(
                    self.config.llm_model, job.info, prompt, job.sampling, end_id=end_id, pad_id=tok.pad_id, seed=seed
                )
            plan = self.access.built_plan(request, job.entry, base_model=self.directory.base_model)
            pieces_of = (
                generated_text_tokens(self.core.delivery, plan, tok.encode, lambda: None)
                if takes_text(job.info)
                else generated_tokens(self.core.delivery, plan, job.info, lambda: None)
            )
            async with contextlib.aclosing(pieces_of) as pieces:
                async for ids in pieces:
                    await queue.put((index, choice.feed(ids)))
                    if choice.done:
                        break  # a stop string: the upstream call is cancelled
            await queue.put((index, choice.end()))
            await queue.put((index, None))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # handed to the reader, which answers the client
            await queue.put((index, exc))

    async def events(self, job: Job, call: Call) -> AsyncIterator[tuple[int, str]]:
        """``(choice index, text delta)`` of every choice as they come, until all are finished."""
        count = len(job.prompts) * job.n
        job.choices = [ChoiceText(job.tokenizer, job.stops, job.sampling.max_tokens) for _ in range(count)]
        queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        tasks = [asyncio.create_task(self._choice(job, i, queue)) for i in range(count)]
        first = True
        try:
            left = count
            while left:
                index, item = await queue.get()
                if item is None:
                    left -= 1
                    continue
                if isinstance(item, ApiError | RequestError):
                    raise item
                if isinstance(item, BaseException):
                    log.exception("completion failed", exc_info=item)
                    raise RequestError(grpc.StatusCode.INTERNAL, f"generation failed: {type(item).__name__}")
                if first and job.choices[index].tokens:
                    first = False
                    self.metrics.time_to_first_token.labels(call.label).observe(time.perf_counter() - call.started)
                yield index, item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.metrics.prompt_tokens.labels(call.label).inc(job.prompt_tokens)
            self.metrics.generation_tokens.labels(call.label).inc(job.completion_tokens)
