"""Conversations for `task: chat`: read every row form into one messages list, and pick the chat template.

Three row forms are read (found per file from its columns, or fixed by `dataset.conversation_format`):
OpenAI `messages: [{role, content}]`, ShareGPT `conversations: [{from, value}]` and Alpaca
`instruction`/`input`/`output`. Each becomes the OpenAI form, `[{"role", "content"}, ...]`, with
roles from `system`, `user`, `assistant`, `tool`; a row that cannot be one raises `BadConversation`
with the reject kind and reason, which preparation writes to `rejects.jsonl` like any other row.

Templates are rendered by the tokenizer's own `apply_chat_template`; this module only decides
which Jinja text that is (the model's own, a named one shipped here, a Jinja string or a file),
so the parameter check can refuse a model without one before any work starts.
"""

from __future__ import annotations

import copy
import difflib
import json
import re
import unicodedata
from pathlib import Path
from typing import Any, NamedTuple

from pydantic import BaseModel

from loraflow.errors import ConfigError, DataError

ROLES = ("system", "user", "assistant", "tool")
# ShareGPT's names, and the OpenAI names themselves; `dataset.roles` adds to (and may override) these.
DEFAULT_ROLE_NAMES = {"human": "user", "gpt": "assistant", **{role: role for role in ROLES}}
FORMATS = ("openai", "sharegpt", "alpaca")
_DEFAULT_COLUMN = {"openai": "messages", "sharegpt": "conversations"}
_ITEM_KEYS = {"openai": ("role", "content"), "sharegpt": ("from", "value")}
ALPACA_COLUMNS = ("instruction", "input", "output")

# ChatML with `{% generation %}` markers around each assistant turn and its end-of-turn token: with them,
# transformers' `apply_chat_template(return_assistant_tokens_mask=True)` marks exactly the tokens to learn.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
NAMED_TEMPLATES: dict[str, str] = {"chatml": CHATML}
_GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")
TRAIN_ON = ("assistant", "last", "all")


class ChatEncoding(BaseModel):
    """How a chat run renders and masks conversations: the template's Jinja text (resolved once, in
    the parameter check) and which turns the loss is on (`train_on`)."""

    template: str
    train_on: str = "assistant"


class BadConversation(ValueError):
    """A row that is not a usable conversation: `kind` and `reason` go to rejects.jsonl."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind, self.reason = kind, reason


class ConversationForm(NamedTuple):
    """How one file's rows are read: its row form and the columns (to the setting naming each) it needs."""

    format: str
    columns: dict[str, str]


def conversation_form(file: Path, keys: list[str], spec: Any) -> ConversationForm:
    """The row form of `file` from its columns `keys`, unless `spec.conversation_format` fixes it."""
    fmt = spec.conversation_format
    if fmt == "auto":
        fmt = _detect(file, keys, spec.messages_column)
    if fmt == "alpaca":  # `input` is optional: a file may have no such column at all
        wanted = [column for column in ALPACA_COLUMNS if column != "input" or column in keys]
        return ConversationForm(fmt, {column: "conversation_format" for column in wanted})
    return ConversationForm(fmt, {spec.messages_column or _DEFAULT_COLUMN[fmt]: "messages_column"})


def _detect(file: Path, keys: list[str], messages_column: str | None) -> str:
    if messages_column is not None and messages_column in keys:
        return "openai"
    for fmt, column in _DEFAULT_COLUMN.items():
        if messages_column is None and column in keys:
            return fmt
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    listed = ", ".join(repr(key) for key in keys[:20]) or "none"
    wanted = repr(messages_column) if messages_column else "'messages' (OpenAI), 'conversations' (ShareGPT)"
    raise DataError(
        f"{file}: no conversation column (columns: {listed}); expected {wanted} or 'instruction' + 'output' "
        "(Alpaca); set dataset.messages_column or dataset.conversation_format"
    )


def normalise_conversation(form: ConversationForm, values: tuple[Any, ...], spec: Any) -> list[dict[str, str]]:
    """One row's values (in `form.columns` order) as checked OpenAI-style messages, the default system
    prompt first when the row has none; `BadConversation` when the row cannot be used."""
    if form.format == "alpaca":
        messages = _alpaca(dict(zip(form.columns, values)))
    else:
        messages = _messages(values[0], form.format, next(iter(form.columns)), {**DEFAULT_ROLE_NAMES, **spec.roles})
    _check_turns(messages)
    if spec.system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": spec.system_prompt})
    return messages


def _text(value: Any) -> str:
    """Contents keep their newlines and inner spacing (code, lists); only NFC and the ends are normalised."""
    if not isinstance(value, str):
        return "" if value is None else str(value)
    return (unicodedata.normalize("NFC", value) if not value.isascii() else value).strip()


def _alpaca(values: dict[str, Any]) -> list[dict[str, str]]:
    instruction, extra, output = (_text(values.get(column)) for column in ALPACA_COLUMNS)
    for name, text in (("instruction", instruction), ("output", output)):
        if not text:
            raise BadConversation("empty_content", f"empty or missing {name!r}")
    prompt = f"{instruction}\n\n{extra}" if extra else instruction
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


def _messages(raw: Any, fmt: str, column: str, role_names: dict[str, str]) -> list[dict[str, str]]:
    if isinstance(raw, str):  # a CSV or Parquet string column holding the JSON list
        try:
            raw = json.loads(raw)
        except ValueError:
            pass
    if not isinstance(raw, list):
        raise BadConversation("not_a_list", f"{column!r} is a {type(raw).__name__}, not a list of messages")
    role_key, content_key = _ITEM_KEYS[fmt]
    messages = []
    for position, item in enumerate(raw, 1):
        if not isinstance(item, dict) or role_key not in item:
            raise BadConversation("bad_message", f"message {position} is not an object with {role_key!r} and "
                                                 f"{content_key!r}")
        name = item[role_key]
        role = role_names.get(name) if isinstance(name, str) else None
        if role not in ROLES:
            raise BadConversation("unknown_role", f"message {position} has unknown role {name!r}; map it with "
                                                  f"dataset.roles (to one of {', '.join(ROLES)})")
        content = _text(item.get(content_key))
        if not content:
            raise BadConversation("empty_content", f"message {position} ({role}) has empty or missing {content_key!r}")
        messages.append({"role": role, "content": content})
    return messages


def _check_turns(messages: list[dict[str, str]]) -> None:
    systems = [position for position, message in enumerate(messages, 1) if message["role"] == "system"]
    if len(systems) > 1:
        raise BadConversation("two_system_turns", f"system turns at messages {systems}; a conversation has one")
    if systems and systems[0] != 1:
        raise BadConversation("two_system_turns", f"the system turn is message {systems[0]}; it must come first")
    if not any(message["role"] == "assistant" for message in messages):
        raise BadConversation("no_assistant_turn", "no assistant turn: nothing to learn")


def template_text(value: str) -> str:
    """`chat_template:` as Jinja text: a name shipped here, a file, or the Jinja itself."""
    if value in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[value]
    if "{{" in value or "{%" in value:
        return value
    path = Path(value).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    close = difflib.get_close_matches(value, list(NAMED_TEMPLATES), n=1, cutoff=0.5)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(
        f"chat_template: {value!r} is not a named template ({', '.join(NAMED_TEMPLATES)}), a Jinja string "
        f"or an existing file{hint}"
    )


def model_chat_template(model_path: str) -> str | None:
    """The chat template a model ships (`chat_template.jinja`, or in tokenizer_config.json), read without
    loading its tokenizer (which imports torch)."""
    jinja = _model_file(model_path, "chat_template.jinja")
    if jinja is not None:
        return jinja.read_text(encoding="utf-8")
    config = _model_file(model_path, "tokenizer_config.json")
    if config is None:
        return None
    template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
    if isinstance(template, list):  # named variants: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template or None


def _model_file(model_path: str, name: str) -> Path | None:
    """A file of a local model folder, or of a hub model (cache or download); None when it has none."""
    folder = Path(model_path)
    if folder.is_dir():
        return folder / name if (folder / name).is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(model_path, name))
    except (EntryNotFoundError, LocalEntryNotFoundError):
        return None


def resolve_chat_template(model_path: str, chat_template: str | None) -> str:
    """The template a chat run renders with: the one given, else the model's own, else refused."""
    if chat_template is not None:
        return template_text(chat_template)
    own = model_chat_template(model_path)
    if own is None:
        raise ConfigError(
            f"chat_template: model {Path(model_path).name!r} has no chat template; set chat_template to "
            f"{' or '.join(NAMED_TEMPLATES)}, a Jinja string or a .jinja file"
        )
    return own


def training_template(tokenizer: Any, template: str) -> str:
    """The template conversations are tokenised and masked with: `template` when it has
    `{% generation %}` markers (the shipped `chatml`); else TRL's training version of a model template
    it knows (Llama 3, Qwen 2.5/3, Gemma, Phi, DeepSeek ...: the same text, with markers, and thinking
    templates made prefix-preserving); else `template` itself, masked by prefix rendering."""
    if _GENERATION_MARKER.search(template):
        return template
    from trl.chat_template_utils import get_training_chat_template  # ~5 s to import: only for such templates

    probe = copy.copy(tokenizer)  # TRL reads the template off the tokenizer; the shared one stays as it is
    probe.chat_template = template
    try:
        return get_training_chat_template(probe) or template
    except ValueError:  # a template TRL has no training version of
        return template


def assistant_spans(tokenizer: Any, messages: list[dict[str, str]], template: str) -> tuple[list[int], list[range]]:
    """The templated conversation's token ids and, per assistant turn, the token positions it spans
    (its end-of-turn token included); `template` as `training_template` gives it.

    A template with `{% generation %}` markers gets transformers' own assistant mask. For one without
    (a model template TRL does not know), each turn's characters are found by rendering the
    conversation up to the turn (with the generation prompt) and up to its end, which is exact for
    any template whose renderings of a conversation's prefixes are prefixes of its rendering.
    """
    render = tokenizer.apply_chat_template
    if _GENERATION_MARKER.search(template):
        encoded = render(messages, chat_template=template, tokenize=True, return_dict=True,
                         return_assistant_tokens_mask=True)
        ids, mask = list(encoded["input_ids"]), encoded["assistant_masks"]
        starts = [i for i, bit in enumerate(mask) if bit and (i == 0 or not mask[i - 1])]
        stops = [i + 1 for i, bit in enumerate(mask) if bit and (i + 1 == len(mask) or not mask[i + 1])]
        return ids, [range(start, stop) for start, stop in zip(starts, stops)]
    text = render(messages, chat_template=template, tokenize=False)
    char_spans = []
    for position, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(messages[:position], chat_template=template, tokenize=False, add_generation_prompt=True)
        through = render(messages[: position + 1], chat_template=template, tokenize=False)
        if not (through.startswith(before) and text.startswith(through)):
            raise DataError(
                "chat_template: the template renders a conversation's start differently from the whole "
                "conversation, so its assistant turns cannot be found; add {% generation %} markers to it "
                "or use chat_template: chatml"
            )
        char_spans.append((len(before), len(through.rstrip())))  # the newline after a turn is the next one's
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    starts = [start for start, _ in encoded["offset_mapping"]]
    spans = [range(*_token_range(starts, a, b)) for a, b in char_spans]
    return list(encoded["input_ids"]), spans


def _token_range(starts: list[int], first_char: int, end_char: int) -> tuple[int, int]:
    inside = [i for i, start in enumerate(starts) if first_char <= start < end_char]
    return (inside[0], inside[-1] + 1) if inside else (0, 0)


def generation_case(tokenizer: Any, messages: list[dict[str, str]], template: str) -> tuple[str, str]:
    """(prompt text, reference): the conversation up to its last assistant turn, in the template with
    the generation prompt, and that turn's content: what generation evaluation asks and expects."""
    last = max(i for i, message in enumerate(messages) if message["role"] == "assistant")
    prompt = tokenizer.apply_chat_template(messages[:last], chat_template=template, tokenize=False,
                                           add_generation_prompt=True)
    return prompt, messages[last]["content"]


def end_of_turn(tokenizer: Any, template: str) -> str:
    """What the template writes right after an assistant's words (`<|im_end|>` for ChatML): where a
    generated answer stops."""
    marker = "\u0000answer\u0000"
    conversation = [{"role": "user", "content": "question"}, {"role": "assistant", "content": marker}]
    text = tokenizer.apply_chat_template(conversation, chat_template=template, tokenize=False)
    return text.split(marker, 1)[1].strip() or (tokenizer.eos_token or "")
