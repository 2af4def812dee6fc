"""Tokenizers and chat templates for the HTTP front, without torch or transformers.

A checkpoint's tokenizer is read from the files ``save_pretrained`` writes: ``tokenizer.json`` (the
`tokenizers` library's format, which transformers' fast tokenizers wrap) and ``tokenizer_config.json``
(special tokens, ``chat_template``, ``clean_up_tokenization_spaces``), with ``chat_template.jinja`` /
``chat_template.json`` where newer transformers put the template. Encoding and decoding match
transformers' fast tokenizer (``encode(text, add_special_tokens=False)``, ``decode(ids,
skip_special_tokens=True)``: what the repository's ``preprocessing`` / ``postprocessing`` models do).

Chat templates are rendered as transformers renders them (``transformers.utils.chat_template_utils``:
a sandboxed jinja2 environment with ``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols``
extension, a ``tojson`` filter that keeps non-ASCII characters, ``raise_exception`` and
``strftime_now``, and the special tokens as variables).
"""

from __future__ import annotations

import datetime as dt
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from phlora_nim.core.errors import InputError

_SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token")


class TemplateError(ValueError):
    """A chat template refused the messages (its ``raise_exception``) or failed to render."""


def _token_text(value: Any) -> str | None:
    """A special token as ``tokenizer_config.json`` stores it: a string, or an AddedToken mapping."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"unreadable tokenizer file ({exc})", where=str(path), expected="JSON") from None
    return data if isinstance(data, dict) else {}


def _chat_template(folder: Path, config: dict[str, Any]) -> str | None:
    """The default chat template: ``chat_template.jinja``, ``chat_template.json``, or the config's entry."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = _read_json(folder / "chat_template.json").get("chat_template", config.get("chat_template"))
    if isinstance(template, list):  # named templates: transformers uses "default"
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template else None


def _tojson(value: Any, indent: int | None = None, separators: Any = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise(message: str) -> None:
    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return dt.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=256)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def _clean_up_spaces(text: str) -> str:
    """transformers' ``clean_up_tokenization`` (spaces before punctuation and contractions)."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'")):
        text = text.replace(before, after)
    for before, after in ((" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text


@dataclass(frozen=True)
class TextTokenizer:
    """One checkpoint's tokenizer: ids ↔ text, special tokens, and its chat template.

    Example:
        >>> tok = TextTokenizer.load(Path("model_repository/tensorrt_llm/tokenizer"))  # doctest: +SKIP
        >>> tok.decode(tok.encode("the red cat"))  # doctest: +SKIP
        'the red cat'
    """

    folder: Path
    tokenizer: Tokenizer = field(repr=False)
    special: dict[str, str | None] = field(repr=False)
    chat_template: str | None = field(repr=False)
    clean_up_spaces: bool = False

    @classmethod
    def load(cls, folder: Path) -> TextTokenizer:
        """Read ``folder``'s tokenizer.

        Raises:
            InputError: no ``tokenizer.json`` (a slow-only tokenizer cannot be read without transformers),
                or unreadable files.
        """
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise InputError(
                "no tokenizer.json",
                where=str(folder),
                expected="a fast tokenizer saved by transformers (tokenizer.json)",
                fix="save the checkpoint's tokenizer with a fast tokenizer, then convert again",
            )
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # the library raises plain Exceptions for malformed files
            raise InputError(f"unreadable tokenizer ({exc})", where=str(path)) from None
        config = _read_json(folder / "tokenizer_config.json")
        special_map = _read_json(folder / "special_tokens_map.json")
        special = {name: _token_text(config.get(name, special_map.get(name))) for name in _SPECIAL}
        return cls(
            folder=folder,
            tokenizer=tokenizer,
            special=special,
            chat_template=_chat_template(folder, config),
            clean_up_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
        )

    def token_id(self, name: str) -> int | None:
        text = self.special.get(name)
        return None if text is None else self.tokenizer.token_to_id(text)

    @property
    def eos_id(self) -> int | None:
        return self.token_id("eos_token")

    @property
    def pad_id(self) -> int:
        """The pad id the ``preprocessing`` model sends: the pad token's, else the end token's (≥ 0)."""
        pad = self.token_id("pad_token")
        return pad if pad is not None else max(self.eos_id if self.eos_id is not None else 0, 0)

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: list[int]) -> str:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return _clean_up_spaces(text) if self.clean_up_spaces else text

    def render_chat(
        self, messages: list[dict[str, Any]], *, template: str | None = None, add_generation_prompt: bool = True
    ) -> str:
        """``messages`` through ``template`` (default: this tokenizer's), as transformers'
        ``apply_chat_template(tokenize=False)`` renders them, with this tokenizer's special tokens.

        Raises:
            TemplateError: no chat template, or the template refused the messages.
        """
        template = template or self.chat_template
        if template is None:
            raise TemplateError("the model has no chat template: use /v1/completions with a prompt")
        try:
            return _compile(template).render(
                messages=messages, add_generation_prompt=add_generation_prompt, **self.special
            )
        except TemplateError:
            raise
        except jinja2.TemplateError as exc:
            raise TemplateError(f"the chat template failed: {exc}") from None
