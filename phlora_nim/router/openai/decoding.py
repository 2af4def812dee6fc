"""From generated token ids to the text of one choice: incremental detokenization and stop strings.

Tokens arrive in pieces (one per streamed response, or all at once); the same code turns them into
text for streaming and non-streaming answers, so both give the same text. A piece of text is let out
only once it is final: not the start of a multi-byte character still being formed (``\\ufffd`` at
the end), and not text that could still become the start of a stop string. A stop string found
ends the choice: the text before it is the answer (OpenAI: the stop sequence is not included), and
the tokens counted are those generated up to the one that completed it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from phlora_nim.router.openai.tokenizer import TextTokenizer


class IncrementalDecoder:
    """Text deltas of a growing token sequence (the prefix-window method of TGI and vLLM).

    Decoding a short window before the new tokens, rather than each token alone, keeps the spaces and
    merges a tokenizer's decoder adds between tokens; :meth:`finish` reconciles with a decode of the
    whole sequence.
    """

    def __init__(self, tokenizer: TextTokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""  # emitted so far
        self._prefix = 0
        self._read = 0

    def feed(self, ids: Sequence[int]) -> str:
        """Add ``ids``; returns the text they complete ('' while a character is still incomplete)."""
        self.ids.extend(int(i) for i in ids)
        prefix_text = self.tokenizer.decode(self.ids[self._prefix : self._read])
        new_text = self.tokenizer.decode(self.ids[self._prefix :])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        delta = new_text[len(prefix_text) :] if new_text.startswith(prefix_text) else new_text
        self._prefix, self._read = self._read, len(self.ids)
        self.text += delta
        return delta

    def finish(self) -> str:
        """The text still to emit so that the whole equals ``decode(ids)``."""
        full = self.tokenizer.decode(self.ids)
        rest = full[len(self.text) :] if full.startswith(self.text) else ""
        self.text += rest
        return rest


class StopMatcher:
    """Cuts text at the first of ``stops``, holding back what could still begin one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""
        self.stopped = False

    def _holdback(self, text: str) -> int:
        """Length of the longest end of ``text`` that is a proper prefix of a stop string."""
        best = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:k]):
                    best = k
                    break
        return best

    def feed(self, text: str) -> str:
        """The part of ``text`` that is final; sets :attr:`stopped` when a stop string completes."""
        if self.stopped:
            return ""
        buffer = self.held + text
        hits = [i for i in (buffer.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self.held = True, ""
            return buffer[: min(hits)]
        keep = self._holdback(buffer)
        self.held = buffer[len(buffer) - keep :] if keep else ""
        return buffer[: len(buffer) - keep]

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


@dataclass
class ChoiceText:
    """One choice's text as tokens come: deltas to send, token count, finish reason.

    Args:
        tokenizer: the adapter's (or base model's) tokenizer.
        stops: stop strings.
        max_tokens: tokens asked for; reaching them is ``finish_reason="length"``.
    """

    tokenizer: TextTokenizer
    stops: Sequence[str]
    max_tokens: int
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None

    def __post_init__(self) -> None:
        self._decoder = IncrementalDecoder(self.tokenizer)
        self._matcher = StopMatcher(self.stops)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def feed(self, ids: Sequence[int]) -> str:
        """Text made final by ``ids`` (fed one by one: a stop string ends the choice at its token)."""
        out = []
        for token in ids:
            if self.done:
                break
            self.tokens.append(int(token))
            out.append(self._matcher.feed(self._decoder.feed([token])))
            if self._matcher.stopped:
                self.finish_reason = "stop"
            elif len(self.tokens) >= self.max_tokens:
                out.append(self._finish("length"))
        return "".join(out)

    def _finish(self, reason: str) -> str:
        text = self._matcher.feed(self._decoder.finish())
        if self._matcher.stopped:
            reason = "stop"
        else:
            text += self._matcher.flush()
        self.finish_reason = reason
        return text

    def end(self) -> str:
        """The upstream finished: the rest of the text; fewer tokens than asked means the end token came."""
        if self.done:
            return ""
        return self._finish("stop" if len(self.tokens) < self.max_tokens else "length")
