"""Constrained decoding inside the LLM worker: grammars, per-sequence token masks, and the
model-format facts (tool-call syntax, thinking markers) the gateway needs to parse output.

Grammars come from llguidance (JSON Schema and Lark compilers, token masks computed from the
model's own tokenizer). JSON is compiled compact: no whitespace is allowed between JSON tokens,
so a bounded schema finishes in a bounded number of tokens. Each constrained sequence gets its
own `GrammarProcessor`, a logits processor that mlx-lm's BatchGenerator calls on that row only,
so one constrained request never masks (or slows) the other sequences of the batch.
"""

from __future__ import annotations

import json
from typing import Any

import mlx.core as mx
import numpy as np

# Formats whose tool calls the worker can force (tool_choice "required" / a named function):
# text before the call object, the key that holds the arguments, text after the call.
FORCED_FORMATS: dict[str, tuple[str, str, str]] = {
    "hermes": ("<tool_call>\n", "arguments", "\n</tool_call>"),
    "llama3_json": ("", "parameters", ""),
    "mistral": ("[TOOL_CALLS][", "arguments", "]"),
    "json": ("", "arguments", ""),
}
# mlx-lm's parser names (mlx_lm.tool_parsers) mapped to the gateway's own, where they agree.
_FROM_MLX_LM = {"json_tools": "hermes", "mistral": "mistral"}
_COMPACT = {"whitespace_flexible": False}
NEG_INF = float("-inf")


class GrammarError(ValueError):
    """A schema or tool definition that cannot be enforced; the message names what and why."""


def resolve_tool_parser(hf_tokenizer: Any, configured: str) -> str:
    """The tool-call format of this model: the configured one, else inferred from the chat
    template ("" when the model has none we know)."""
    if configured not in ("", "auto"):
        return "" if configured == "none" else configured
    template = getattr(hf_tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: the default one renders tools
        template = template.get("tool_use") or template.get("default")
    if isinstance(template, str) and ("<|python_tag|>" in template or
                                      '"parameters": dictionary of argument name' in template):
        return "llama3_json"
    try:
        from mlx_lm.tokenizer_utils import _infer_tool_parser

        name = _infer_tool_parser(hf_tokenizer)
    except Exception:  # a private helper of mlx-lm: its absence only loses auto-detection
        name = None
    if name is None:
        return ""
    return _FROM_MLX_LM.get(name, f"mlx_lm:{name}")


def resolve_reasoning(hf_tokenizer: Any, configured: str | list[str]) -> list[str]:
    """The [start, end] thinking markers of this model ([] = it does not think)."""
    if isinstance(configured, list):
        return list(configured)
    if configured == "none":
        return []
    if configured not in ("", "auto"):
        return ["<think>", "</think>"]  # "think", "deepseek_r1", "qwen3": the common pair
    try:
        from mlx_lm.tokenizer_utils import _infer_thinking

        start, end, _, _ = _infer_thinking(hf_tokenizer)
    except Exception:
        start = end = None
    return [start, end] if start and end else []


# A forced call must end well inside max_tokens whatever the model does, so its arguments
# schema is bounded as OpenAI's strict mode closes it: an object that does not say otherwise
# takes no keys beyond its `properties`, and a free string (no enum, const, pattern, format or
# maxLength) at most this many characters: room for a query or a path, not for an essay.
FORCED_STRING_MAX_CHARS = 256
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties")
_SUBSCHEMAS = ("items", "additionalProperties", "not", "if", "then", "else", "contains")
_STRING_BOUNDS = ("enum", "const", "pattern", "format", "maxLength")


def bounded(schema: Any) -> Any:
    """A copy of a tool's arguments schema with every open object closed and every free
    string given maxLength FORCED_STRING_MAX_CHARS (see above); what it states is kept."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [bounded(s) for s in out[key]]
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: bounded(s) for name, s in out[key].items()}
    for key in _SUBSCHEMAS:
        if isinstance(out.get(key), dict):
            out[key] = bounded(out[key])
    kinds = out.get("type")
    kinds = kinds if isinstance(kinds, list) else [kinds]
    if ("object" in kinds or "properties" in out) and "additionalProperties" not in out \
            and "patternProperties" not in out:
        out["additionalProperties"] = False
    if "string" in kinds and not any(k in out for k in _STRING_BOUNDS):
        low = out.get("minLength")
        out["maxLength"] = max(FORCED_STRING_MAX_CHARS, low if isinstance(low, int) else 0)
    return out


class Grammars:
    """Compiles grammars against one tokenizer (the llguidance tokenizer is built once, lazily:
    ~0.3 s for a 49k vocabulary)."""

    def __init__(self, hf_tokenizer: Any, eos_token_ids: list[int]) -> None:
        self._hf = hf_tokenizer
        self._eos = eos_token_ids
        self._llt: Any = None
        self._vocab: dict[str, int] | None = None

    @property
    def llt(self) -> Any:
        if self._llt is None:
            import llguidance.hf

            self._llt = llguidance.hf.from_tokenizer(self._hf, eos_token=self._eos)
        return self._llt

    def json_schema(self, schema: dict[str, Any], where: str) -> str:
        from llguidance import LLMatcher

        try:
            grammar = LLMatcher.grammar_from_json_schema(schema, overrides=_COMPACT)
        except ValueError as e:
            raise GrammarError(f"{where} is not a valid JSON schema: {e}") from None
        return self._checked(grammar, where)

    def tool_call(self, tools: list[dict[str, Any]], choice: str, fmt: str) -> str:
        """A grammar for exactly one call, to `choice` (a function name) or, for "required",
        to any of `tools`, in the tool-call syntax `fmt` (a FORCED_FORMATS key)."""
        from llguidance import LLMatcher

        prefix, args_key, suffix = FORCED_FORMATS[fmt]
        options = []
        for i, tool in enumerate(tools):
            fn = tool.get("function") or {}
            name = fn.get("name")
            if choice != "required" and name != choice:
                continue
            params = fn.get("parameters") or {"type": "object"}
            self.json_schema(params, f"tools[{i}].function.parameters")  # names what fails
            params = bounded(params)
            options.append({
                "type": "object",
                "properties": {"name": {"const": name}, args_key: params},
                "required": ["name", args_key],
                "additionalProperties": False,
            })
        if not options:
            raise GrammarError(f"tool_choice names function {choice!r}, which is not in tools")
        call = options[0] if len(options) == 1 else {"anyOf": options}
        call = {**call, "x-guidance": _COMPACT}
        body = "%json " + json.dumps(call)
        parts = [self._literal(prefix), "call", self._literal(suffix)]
        lark = "start: " + " ".join(p for p in parts if p) + "\ncall: " + body + "\n"
        return self._checked(LLMatcher.grammar_from_lark(lark), "tools")

    def matcher(self, grammar: str) -> Any:
        from llguidance import LLMatcher

        m = LLMatcher(self.llt, grammar, log_level=0)
        if m.is_error():
            raise GrammarError(m.get_error())
        return m

    def _checked(self, grammar: str, where: str) -> str:
        from llguidance import LLMatcher

        is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, self.llt)
        if is_error:
            raise GrammarError(f"{where} cannot be enforced: {'; '.join(messages)}")
        return grammar

    def _literal(self, text: str) -> str:
        """A Lark literal for `text`; a special token of the vocabulary becomes `<[id]>`, since
        special tokens never match as plain text."""
        if not text:
            return ""
        if self._vocab is None:
            self._vocab = self._hf.get_vocab()
        for token in ("[TOOL_CALLS]", "<tool_call>", "</tool_call>", "<|python_tag|>"):
            if token in text and token in self._vocab and \
                    self.llt.is_special_token(self._vocab[token]):
                before, _, after = text.partition(token)
                return " ".join(p for p in (self._literal(before), f"<[{self._vocab[token]}]>",
                                            self._literal(after)) if p)
        return json.dumps(text, ensure_ascii=False)


class GrammarProcessor:
    """mlx-lm logits processor for one sequence: masks every token the grammar forbids.

    BatchGenerator calls it once per decode step with the sequence's tokens so far; the first
    call comes before any generated token (the context ends with the prompt), each later call
    sees the token sampled at the previous step last, which the matcher consumes first."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self.matcher = matcher
        self._started = False
        self._words = np.full((1, (vocab_size + 31) // 32), -1, dtype=np.int32)

    @property
    def done(self) -> bool:
        """The grammar is complete (nothing may follow) or broken: end the sequence."""
        return self.matcher.is_stopped() or self.matcher.is_error()

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        m = self.matcher
        if self._started:
            m.consume_token(int(tokens[-1].item()))
        self._started = True
        if m.is_error():
            return logits  # the engine ends this sequence after the step
        m.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)
        allowed = np.unpackbits(self._words.view(np.uint8), bitorder="little")
        width = logits.shape[-1]
        if allowed.size < width:  # the model pads its vocabulary: padding is never allowed
            allowed = np.concatenate([allowed, np.zeros(width - allowed.size, np.uint8)])
        mask = mx.array(allowed[:width].astype(np.bool_))
        return mx.where(mask, logits, mx.array(NEG_INF, dtype=logits.dtype))
