"""Chat formats: the files' own Jinja template, or a built-in format for files without one.

Built-ins reproduce what each model's official template renders for plain conversations (no
tools): Gemma 3, Llama 3.1, Qwen 3 and generic ChatML (SmolLM2 and similar).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from catjax.text.base import Tokenizer

FORMATS = ("template", "gemma3", "llama3", "qwen3", "chatml")
NO_THINK = "/no_think"  # Qwen 3's soft switch; the paper prefixes it to the prompt

Message = dict[str, Any]
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


def detect_format(tok: Tokenizer) -> str:
    """The files' template if they carry one, else a built-in format named by the special tokens."""
    if tok.chat_template:
        return "template"
    has = tok.specials.__contains__
    if has("<start_of_turn>"):
        return "gemma3"
    if has("<|start_header_id|>"):
        return "llama3"
    if has("<|im_start|>"):
        return "qwen3" if has("<think>") else "chatml"
    raise ValueError(f"{tok.name}: no chat template and no chat special tokens I recognise; "
                     f"pass chat_format= one of {FORMATS[1:]}")


def render(tok: Tokenizer, messages: Sequence[Message], add_generation_prompt: bool = True,
           *, no_think: bool = False, **kwargs: Any) -> str:
    """Render `messages` in `tok.chat_format`. Keywords go to the template; built-ins take the
    ones they know (`enable_thinking`, `date_string`) and ignore the rest, as a template would."""
    msgs = _plain_messages(tok, messages)
    fmt = tok.chat_format
    try:
        if no_think:
            msgs = prefix_last_user(msgs, NO_THINK + " ")
        if fmt == "template":
            return render_template(tok.chat_template or "", msgs, add_generation_prompt,
                                   **{**tok.template_tokens, **kwargs})
        if kwargs.get("tools") or kwargs.get("documents"):
            raise ChatError("tools and documents need the model's own chat template")
        return BUILTINS[fmt](msgs, add_generation_prompt, **kwargs)
    except ChatError as e:
        raise ValueError(f"{tok.name}: {fmt} chat format: {e}") from None


class ChatError(Exception):
    """A conversation the chat format cannot render (raised by templates via raise_exception)."""


def prefix_last_user(messages: list[Message], prefix: str) -> list[Message]:
    """Copy of `messages` with `prefix` put before the last user message's text."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i]["role"] == "user":
            out = list(messages)
            out[i] = {**out[i], "content": prefix + _text(out[i])}
            return out
    raise ChatError("no user message to prefix /no_think to")


def _plain_messages(tok: Tokenizer, messages: Sequence[Message]) -> list[Message]:
    if not messages:
        raise ValueError(f"{tok.name}: cannot format an empty conversation")
    out = []
    for m in messages:
        if not isinstance(m, dict) or "role" not in m:
            raise ValueError(f"{tok.name}: chat messages must be dicts with 'role' and 'content', "
                             f"got {m!r:.80}")
        # transformers drops None-valued keys before rendering; templates test `is defined`.
        m = {k: v for k, v in m.items() if v is not None}
        # ...and gives reasoning under each name templates read it by.
        reasoning = next((m[k] for k in _REASONING_KEYS if k in m), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


def _text(m: Message) -> str:
    """A message's text: a string, or the text parts of a multimodal content list."""
    c = m.get("content", "")
    if isinstance(c, str):
        return c
    if isinstance(c, list):
        return "".join(p["text"] for p in c if isinstance(p, dict) and p.get("type") == "text")
    raise ChatError(f"message content must be a string or a list of parts, got {type(c).__name__}")


# -- Jinja templates ------------------------------------------------------------------------

def _raise(message: str) -> None:
    raise ChatError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters; chat templates expect plain json.dumps.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


@functools.lru_cache(maxsize=32)
def _compile(source: str) -> Any:
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text; rendering ignores it."""

        tags = {"generation"}

        def parse(self, parser: Any) -> list[nodes.Node]:
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    # Templates are untrusted text from model repos: sandboxed, immutable. Block whitespace
    # handling as transformers sets it, so the same template renders the same string.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatError(f"template does not parse: {e} (line {e.lineno})") from None


def render_template(source: str, messages: list[Message], add_generation_prompt: bool,
                    **kwargs: Any) -> str:
    """Render a Hugging Face-style chat template."""
    import jinja2

    kwargs.setdefault("tools", None)
    kwargs.setdefault("documents", None)
    try:
        return _compile(source).render(messages=messages,
                                       add_generation_prompt=add_generation_prompt, **kwargs)
    except jinja2.TemplateError as e:
        raise ChatError(str(e)) from None


# -- built-in formats -----------------------------------------------------------------------

def gemma3(messages: list[Message], add_generation_prompt: bool, **_: Any) -> str:
    """Gemma 3: a system prompt is folded into the first user turn; the assistant is 'model'."""
    prefix = ""
    if messages[0]["role"] == "system":
        prefix, messages = _text(messages[0]) + "\n\n", messages[1:]
    out = ["<bos>"]
    for k, m in enumerate(messages):
        if (m["role"] == "user") != (k % 2 == 0):
            raise ChatError("roles must alternate user/assistant/user/..., starting with user")
        role = "model" if m["role"] == "assistant" else m["role"]
        first = prefix if k == 0 else ""
        out.append(f"<start_of_turn>{role}\n{first}{_text(m).strip()}<end_of_turn>\n")
    if add_generation_prompt:
        out.append("<start_of_turn>model\n")
    return "".join(out)


def llama3(messages: list[Message], add_generation_prompt: bool,
           date_string: str = "26 Jul 2024", **_: Any) -> str:
    """Llama 3.1: its template always writes a system turn that opens with the knowledge-cutoff
    and today lines, then the caller's system text."""
    system = ""
    if messages[0]["role"] == "system":
        system, messages = _text(messages[0]).strip(), messages[1:]
    out = ["<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
           f"Cutting Knowledge Date: December 2023\nToday Date: {date_string}\n\n"
           f"{system}<|eot_id|>"]
    for m in messages:
        if m.get("tool_calls"):
            raise ChatError("tool calls need the model's own chat template")
        if m["role"] in ("tool", "ipython"):
            # Tool output goes under 'ipython' as JSON: the official template's `is iterable`
            # test holds for strings too, so a string result is written quoted.
            body = json.dumps(m.get("content", ""), ensure_ascii=False)
            out.append(f"<|start_header_id|>ipython<|end_header_id|>\n\n{body}<|eot_id|>")
        else:
            out.append(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n"
                       f"{_text(m).strip()}<|eot_id|>")
    if add_generation_prompt:
        out.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
    return "".join(out)


def _is_tool_response(m: Message) -> bool:
    c = m.get("content")
    return isinstance(c, str) and c.startswith("<tool_response>") and c.endswith("</tool_response>")


def qwen3(messages: list[Message], add_generation_prompt: bool,
          enable_thinking: bool = True, **_: Any) -> str:
    """Qwen 3 (ChatML): assistant turns after the last real user query keep their reasoning in a
    <think> block; earlier ones lose it. `enable_thinking=False` pre-fills an empty think block."""
    out = []
    if messages[0]["role"] == "system":
        out.append(f"<|im_start|>system\n{_str_content(messages[0])}<|im_end|>\n")
    last_query = len(messages) - 1
    for k in range(len(messages) - 1, -1, -1):
        m = messages[k]
        if m["role"] == "user" and isinstance(m.get("content"), str) and not _is_tool_response(m):
            last_query = k
            break
    for k, m in enumerate(messages):
        content, role = _str_content(m), m["role"]
        last = k == len(messages) - 1
        if role == "user" or (role == "system" and k > 0):
            out.append(f"<|im_start|>{role}\n{content}<|im_end|>\n")
        elif role == "assistant":
            if m.get("tool_calls"):
                raise ChatError("tool calls need the model's own chat template")
            reasoning = m.get("reasoning_content")
            if not isinstance(reasoning, str):
                reasoning = ""
                if "</think>" in content:
                    head, content = content.split("</think>")[0], content.split("</think>")[-1]
                    reasoning = head.rstrip("\n").split("<think>")[-1].lstrip("\n")
                    content = content.lstrip("\n")
            if k > last_query and (last or reasoning):
                out.append(f"<|im_start|>assistant\n<think>\n{reasoning.strip(chr(10))}\n</think>"
                           f"\n\n{content.lstrip(chr(10))}")
            else:
                out.append(f"<|im_start|>assistant\n{content}")
            out.append("<|im_end|>\n")
        elif role == "tool":
            if k == 0 or messages[k - 1]["role"] != "tool":
                out.append("<|im_start|>user")
            out.append(f"\n<tool_response>\n{content}\n</tool_response>")
            if last or messages[k + 1]["role"] != "tool":
                out.append("<|im_end|>\n")
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
        if enable_thinking is False:
            out.append("<think>\n\n</think>\n\n")
    return "".join(out)


def _str_content(m: Message) -> str:
    # Qwen's template renders non-string content as empty.
    c = m.get("content")
    return c if isinstance(c, str) else ""


def chatml(messages: list[Message], add_generation_prompt: bool, **_: Any) -> str:
    """Plain ChatML: <|im_start|>role\\ncontent<|im_end|>\\n per message."""
    out = [f"<|im_start|>{m['role']}\n{_text(m)}<|im_end|>\n" for m in messages]
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)


BUILTINS: dict[str, Callable[..., str]] = {
    "gemma3": gemma3, "llama3": llama3, "qwen3": qwen3, "chatml": chatml}
