"""Text <-> token ids and the chat template, from a GGUF's metadata or an HF folder's tokenizer.json.

From a GGUF, mirrors what HF transformers builds for `tokenizer.ggml.model == "gpt2"`:
byte-level BPE from the file's tokens and merges, GPT-2's pre-tokenizer regex (no
per-`tokenizer.ggml.pre` split for "smollm"; Qwen2/3's and Llama 3's regexes for "qwen2"
and "llama-bpe"), control tokens (token_type 3) as special tokens matched whole in text,
user-defined tokens (type 4) as plain added tokens.

From an HF folder: `tokenizer.json` as is (the `tokenizers` library), the chat template
from `chat_template.jinja` or `tokenizer_config.json`. A folder without tokenizer.json
borrows SmolLM2's tokenizer when its vocab size is SmolLM2's (with a warning), else it is refused.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import structlog
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from shared.engine.config import ModelConfig
from shared.engine.gguf_file import GgufFile
from shared.engine.hf_checkpoint import HfCheckpoint
from shared.engine.presets import GgufSource, HfFolderSource, RandomSource, Source, resolve_source, smollm2_gguf_path

_CONTROL = 3
_USER_DEFINED = 4

# tokenizer.ggml.pre -> the split regex before byte-level BPE (None: GPT-2's, built into ByteLevel).
_SPLIT_PATTERNS: dict[str, str | None] = {
    "default": None,
    "gpt2": None,
    "smollm": None,
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}
# For a folder whose tokenizer files carry no chat template.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

log = structlog.get_logger()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the alphabet byte-level BPE tokens are spelled in)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


@functools.cache
def _unicode_to_byte() -> dict[str, int]:
    return {char: byte for byte, char in _bytes_to_unicode().items()}


def _byte_level_vocab(tokens: Sequence[str]) -> dict[str, int]:
    """Token -> id; a token not spelled in the byte alphabet is respelled from its UTF-8 bytes (as HF does)."""
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {}
    for index, token in enumerate(tokens):
        if not set(token) <= alphabet:
            token = "".join(spelling[b] for b in token.encode("utf-8"))
        vocab[token] = index
    return vocab


def _byte_level_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    if pre not in _SPLIT_PATTERNS:
        raise ValueError(f"pre-tokenizer {pre!r} is not supported; supported: {', '.join(_SPLIT_PATTERNS)}")
    pattern = _SPLIT_PATTERNS[pre]
    if pattern is None:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])


def _build_byte_level_bpe(tokens: list[str], merges: list[str], token_types: list[int], pre: str = "default") -> Tokenizer:
    bpe = models.BPE(vocab=_byte_level_vocab(tokens), merges=[tuple(m.split(" ")) for m in merges])
    tokenizer = Tokenizer(bpe)
    tokenizer.pre_tokenizer = _byte_level_pre_tokenizer(pre)
    tokenizer.decoder = decoders.ByteLevel()
    alphabet = set(_bytes_to_unicode().values())
    # A "control" token spelled outside the byte alphabet is a llama.cpp mislabel; HF skips it too.
    control = [t for t, kind in zip(tokens, token_types) if kind == _CONTROL and set(t) <= alphabet]
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    user = [t for t, kind in zip(tokens, token_types) if kind == _USER_DEFINED]
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
    return tokenizer


def _compile_chat_template(source: str) -> jinja2.Template:
    """Sandboxed like HF's `apply_chat_template`: same whitespace control, filters and globals."""

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
        # Jinja's own tojson escapes HTML characters, which templates do not expect.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class ChatTokenizer:
    """Encodes, decodes and renders chat prompts. Safe to share between threads (read-only)."""

    def __init__(self, tokenizer: Tokenizer, chat_template: str, bos_token_id: int | None, eos_token_ids: Sequence[int]):
        self._tokenizer = tokenizer
        self._template = _compile_chat_template(chat_template)
        self.bos_token_id = bos_token_id
        self.eos_token_ids: tuple[int, ...] = tuple(eos_token_ids)
        self._added_ids = frozenset(tokenizer.get_added_tokens_decoder())
        self._byte_level = type(tokenizer.decoder).__name__ == "ByteLevel"
        self._special_tokens = {
            "bos_token": "" if bos_token_id is None else (tokenizer.id_to_token(bos_token_id) or ""),
            "eos_token": tokenizer.id_to_token(self.eos_token_ids[0]) or "",
        }

    @classmethod
    def from_gguf(cls, gguf: GgufFile) -> ChatTokenizer:
        kind = gguf.field("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(f"{gguf.path.name}: tokenizer model {kind!r} is not supported (only byte-level 'gpt2')")
        tokens = gguf.field("tokenizer.ggml.tokens")
        token_types = gguf.field("tokenizer.ggml.token_type", [1] * len(tokens))
        pre = gguf.field("tokenizer.ggml.pre", "default")
        tokenizer = _build_byte_level_bpe(tokens, gguf.field("tokenizer.ggml.merges"), token_types, pre)
        return cls(
            tokenizer,
            chat_template=gguf.field("tokenizer.chat_template", None) or _default_template(gguf.path),
            bos_token_id=gguf.field("tokenizer.ggml.bos_token_id", None),
            eos_token_ids=(gguf.field("tokenizer.ggml.eos_token_id"),),
        )

    @classmethod
    def from_hf_folder(cls, folder: Path, config: ModelConfig) -> ChatTokenizer:
        """tokenizer.json + the folder's chat template; BOS/EOS ids are the model config's."""
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        return cls(tokenizer, _folder_chat_template(folder), config.bos_token_id, config.eos_token_ids)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special tokens written in the text (e.g. "<|im_start|>") stay whole. No BOS added."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes one token stands for (a piece of a multi-byte character stays a piece)."""
        spelled = self._tokenizer.id_to_token(token_id)
        if spelled is None:
            raise ValueError(f"token id {token_id} is not in the vocabulary")
        if token_id in self._added_ids or not self._byte_level:
            return self.decode([token_id], skip_special_tokens=False).encode()
        return bytes(_unicode_to_byte()[char] for char in spelled)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages` ([{"role": ..., "content": ...}]); encode() it to get ids."""
        return self._template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, **self._special_tokens
        )


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas whose concatenation equals decode(all ids).

    A multi-byte character can span tokens; while the decoded tail ends in U+FFFD (an
    incomplete UTF-8 sequence) the text is held back until the next token completes it.
    Decoding restarts from the last emitted boundary (vLLM's prefix/read offsets), so each
    call costs O(tokens since the last emission), not O(all tokens).
    """

    def __init__(self, tokenizer: ChatTokenizer, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0  # start of the window re-decoded for context
        self._read_offset = 0  # ids before this were emitted

    def _decode(self, start: int, stop: int | None = None) -> str:
        return self._tokenizer.decode(self._ids[start:stop], skip_special_tokens=self._skip_special)

    def add(self, token_id: int) -> str:
        """Feeds one token; returns the newly completed text (possibly "")."""
        self._ids.append(token_id)
        emitted = self._decode(self._prefix_offset, self._read_offset)
        text = self._decode(self._prefix_offset)
        if text.endswith("\ufffd") or len(text) <= len(emitted):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return text[len(emitted):]

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character decodes as U+FFFD); call at the end."""
        emitted = self._decode(self._prefix_offset, self._read_offset)
        text = self._decode(self._prefix_offset)
        self._prefix_offset = self._read_offset = len(self._ids)
        return text[len(emitted):]


def load_tokenizer(model: str | Path) -> ChatTokenizer:
    """The tokenizer of a preset, HF folder or GGUF file; no weights are read (cheap enough for the gateway)."""
    return tokenizer_for(resolve_source(model))


def tokenizer_for(source: Source, config: ModelConfig | None = None) -> ChatTokenizer:
    """`config`: the model's, when the caller has it already (spares re-reading an HF folder's headers)."""
    match source:
        case GgufSource(path=path):
            return ChatTokenizer.from_gguf(GgufFile(path))
        case RandomSource():
            return smollm2_tokenizer()
        case HfFolderSource(path=path):
            return _folder_tokenizer(path, config or HfCheckpoint(path).model_config())


@functools.cache
def smollm2_tokenizer() -> ChatTokenizer:
    """SmolLM2's tokenizer (the random presets' and the fallback), parsed once per process: it is read-only."""
    return ChatTokenizer.from_gguf(GgufFile(smollm2_gguf_path()))


def _folder_tokenizer(folder: Path, config: ModelConfig) -> ChatTokenizer:
    if (folder / "tokenizer.json").is_file():
        return ChatTokenizer.from_hf_folder(folder, config)
    fallback = smollm2_tokenizer()
    if fallback.vocab_size != config.vocab_size:
        raise ValueError(
            f"{folder} has no tokenizer.json, and its vocab_size {config.vocab_size} differs from the "
            f"{fallback.vocab_size} of SmolLM2's tokenizer (the only fallback); add the model's tokenizer.json"
        )
    log.warning("tokenizer_fallback", folder=str(folder), tokenizer="smollm2-135m", vocab_size=config.vocab_size)
    return fallback


def _folder_chat_template(folder: Path) -> str:
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text()
    config_path = folder / "tokenizer_config.json"
    template = json.loads(config_path.read_text()).get("chat_template") if config_path.is_file() else None
    if isinstance(template, list):  # [{"name": ..., "template": ...}]: the "default" one, else the first
        named = {entry.get("name"): entry.get("template") for entry in template}
        template = named.get("default") or (template[0].get("template") if template else None)
    return template or _default_template(folder)


def _default_template(where: Path) -> str:
    log.warning("chat_template_missing", source=str(where), using="chatml")
    return CHATML_TEMPLATE
