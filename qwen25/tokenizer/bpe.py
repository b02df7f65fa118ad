"""The Qwen2.5 byte-level BPE tokenizer, run on the HF `tokenizers` (Rust) engine.

Owns building the pipeline (NFC, the Qwen2 split regex, byte-level BPE, the 22 control tokens with their
`special` flags, SPEC §2) from GGUF metadata or from an HF `tokenizer.json`, plus encode/decode, the
special/stop token sets and saving a directory `transformers.AutoTokenizer` loads with identical ids.
Encoding can treat control-token spellings as plain text (`encode(..., allow_special=False)`, and per part in
`encode_parts`): that is how chat prompts keep user content from forging turns (`qwen25.chat.prompt`).
It does not read GGUF files (it is handed their metadata dict: `qwen25.checkpoint.load_tokenizer` opens a
file), render chat templates (`qwen25.chat`) or detokenize streams (`tokenizer/stream.py`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as _RustTokenizer

from qwen25.tokenizer.hf_config import tokenizer_config

# SPEC §2; identical to `PRETOKENIZE_REGEX` in transformers' tokenization_qwen2.py. Digits split one at a time.
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Added tokens that Qwen's tokenizer_config.json marks `special: false` (SPEC §2), so skip_special_tokens keeps
# them (tool-call parsers and FIM prompts need the text). llama.cpp's converter types every `<|...|>` token as
# CONTROL, so a GGUF cannot tell these apart from <|im_end|>; the names are the only signal left.
QWEN2_NON_SPECIAL = frozenset({
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
})

# llama.cpp `llama_token_type` values stored in tokenizer.ggml.token_type.
GGUF_NORMAL, GGUF_UNKNOWN, GGUF_CONTROL, GGUF_USER_DEFINED, GGUF_UNUSED, GGUF_BYTE = 1, 2, 3, 4, 5, 6

# GGUF pre-tokenizer names that mean exactly the Qwen2 regex (llama.cpp `LLAMA_VOCAB_PRE_TYPE_QWEN2`).
_QWEN2_PRE_NAMES = frozenset({"qwen2", "deepseek-r1-qwen"})
_STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map that byte-level BPE vocabularies are spelled in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


BYTE_TO_CHAR = _bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json spells a token as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    """A Qwen2.5 tokenizer: `encode`/`decode` plus the token ids a chat engine needs."""

    def __init__(self, backend: _RustTokenizer, *, eos_token_id: int | None = None, pad_token_id: int | None = None,
                 bos_token_id: int | None = None, chat_template: str | None = None):
        if not isinstance(backend.decoder, decoders.ByteLevel):
            # token_bytes() and StreamDecoder rely on every token decoding to a fixed byte string.
            raise ValueError(f"expected a byte-level BPE tokenizer (ByteLevel decoder), got {backend.decoder!r}")
        self._tk = backend
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.chat_template = chat_template
        added = backend.get_added_tokens_decoder()
        self._special_ids = frozenset(i for i, tok in added.items() if tok.special)
        self._added_ids = frozenset(added)
        self._added_tokens = tuple(added[i].content for i in sorted(added))
        self._bytes_cache: dict[int, bytes] = {}
        # The same pipeline without the added vocabulary (it shares the BPE model object, so it costs nothing):
        # what `encode(..., allow_special=False)` runs on.
        self._plain = _RustTokenizer(backend.model)
        self._plain.normalizer = backend.normalizer
        self._plain.pre_tokenizer = backend.pre_tokenizer
        self._plain.post_processor = backend.post_processor
        # Finding added tokens in markup text (encode_parts): a regex over their spellings, longest first, is the
        # leftmost-longest match the Rust side uses, as long as no token strips whitespace, matches single words
        # only or is matched after normalization; otherwise the backend's own encoding locates them.
        self._added_by_content = {added[i].content: i for i in sorted(added, reverse=True)}
        simple = all(not (t.lstrip or t.rstrip or t.single_word or t.normalized) for t in added.values())
        spellings = sorted(self._added_by_content, key=len, reverse=True)
        self._added_re = re.compile("|".join(map(re.escape, spellings))) if simple and spellings else None

    # --- construction

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        """Build from a GGUF's `tokenizer.*` metadata (vocab, merges, token types, special ids, chat template)."""
        model = metadata.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(f"tokenizer.ggml.model is {model!r}; only byte-level BPE ('gpt2') is supported")
        pre = metadata.get("tokenizer.ggml.pre")
        if pre not in _QWEN2_PRE_NAMES:
            raise ValueError(f"tokenizer.ggml.pre is {pre!r}; only the Qwen2 pre-tokenizer ('qwen2') is supported")
        tokens = [str(t) for t in metadata["tokenizer.ggml.tokens"]]
        types = [int(t) for t in metadata.get("tokenizer.ggml.token_type", [GGUF_NORMAL] * len(tokens))]
        if len(types) != len(tokens):
            raise ValueError(f"tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
        merges = []
        for m in metadata["tokenizer.ggml.merges"]:
            pair = str(m).split(" ")
            if len(pair) != 2:
                raise ValueError(f"malformed merge {m!r} in tokenizer.ggml.merges (expected 'left right')")
            merges.append((pair[0], pair[1]))

        # Every entry, the [PADnnnnnn] fillers (type UNUSED) included, is a plain BPE vocab entry at its own id, as
        # transformers' GGUF conversion does: ids match the file and decoding a padding id gives its literal name.
        # No merge ever produces them, so encode never emits them.
        vocab = {tok: i for i, tok in enumerate(tokens)}
        if len(vocab) != len(tokens):
            raise ValueError("tokenizer.ggml.tokens contains duplicate tokens")
        backend = _build_backend(models.BPE(vocab, merges, dropout=None, unk_token=None, continuing_subword_prefix="",
                                            end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
        added = [
            AddedToken(tok, special=(typ == GGUF_CONTROL and tok not in QWEN2_NON_SPECIAL), normalized=False)
            for tok, typ in zip(tokens, types) if typ in (GGUF_CONTROL, GGUF_USER_DEFINED)
        ]
        backend.add_tokens(added)

        def opt_id(key: str) -> int | None:
            value = metadata.get(key)
            return None if value is None else int(value)

        bos = opt_id("tokenizer.ggml.bos_token_id")
        if metadata.get("tokenizer.ggml.add_bos_token") and bos is not None:
            backend.post_processor = processors.TemplateProcessing(
                single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A $B:1", special_tokens=[(tokens[bos], bos)])
        template = metadata.get("tokenizer.chat_template")
        return cls(backend, eos_token_id=opt_id("tokenizer.ggml.eos_token_id"),
                   pad_token_id=opt_id("tokenizer.ggml.padding_token_id"), bos_token_id=bos,
                   chat_template=None if template is None else str(template))

    @classmethod
    def from_file(cls, tokenizer_json: str | os.PathLike,
                  tokenizer_config: str | os.PathLike | None = None) -> Tokenizer:
        """Load an HF `tokenizer.json`; `tokenizer_config.json` adds the chat template, eos/pad/bos and the
        per-token `special` flags of `added_tokens_decoder` (which override the flags in tokenizer.json)."""
        config: dict[str, Any] = {}
        if tokenizer_config is not None:
            config = json.loads(Path(tokenizer_config).read_text(encoding="utf-8"))
        text = Path(tokenizer_json).read_text(encoding="utf-8")
        flags = {int(i): bool(tok.get("special")) for i, tok in config.get("added_tokens_decoder", {}).items()}
        if flags:
            spec = json.loads(text)
            changed = False
            for tok in spec.get("added_tokens", []):
                if tok["id"] in flags and tok.get("special") != flags[tok["id"]]:
                    tok["special"] = flags[tok["id"]]
                    changed = True
            if changed:
                # tokenizers cannot flip the flag of an existing added token in place, so patch the JSON.
                text = json.dumps(spec, ensure_ascii=False)
        backend = _RustTokenizer.from_str(text)

        def config_id(key: str) -> int | None:
            content = _token_content(config.get(key))
            return None if content is None else backend.token_to_id(content)

        template = config.get("chat_template")
        if isinstance(template, list):  # older multi-template form: [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default", next(iter(named.values()), None))
        return cls(backend, eos_token_id=config_id("eos_token"), pad_token_id=config_id("pad_token"),
                   bos_token_id=config_id("bos_token"), chat_template=template)

    @classmethod
    def from_pretrained_dir(cls, directory: str | os.PathLike) -> Tokenizer:
        """Load an HF model directory (tokenizer.json, tokenizer_config.json, optional chat_template.jinja)."""
        root = Path(directory)
        tokenizer_json = root / "tokenizer.json"
        if not tokenizer_json.is_file():
            raise FileNotFoundError(f"{root}: no tokenizer.json (vocab.json/merges.txt-only directories are not "
                                    "supported; re-save the tokenizer with transformers to get one)")
        config = root / "tokenizer_config.json"
        tok = cls.from_file(tokenizer_json, config if config.is_file() else None)
        # transformers >= 4.47 writes the template to its own file instead of tokenizer_config.json.
        jinja = root / "chat_template.jinja"
        if jinja.is_file():
            tok.chat_template = jinja.read_text(encoding="utf-8")
        elif tok.chat_template is None and (root / "chat_template.json").is_file():
            tok.chat_template = json.loads((root / "chat_template.json").read_text(encoding="utf-8")).get(
                "chat_template")
        return tok

    # --- encode / decode

    def encode(self, text: str, add_special_tokens: bool = False, *, allow_special: bool = True) -> list[int]:
        """Token ids of `text`.

        allow_special (the default, as in HF tokenizers): added-token spellings written in the text (`<|im_start|>`,
        `<tool_call>`, ...) become those tokens. False: they are ordinary text, the byte-level BPE of their
        characters (what transformers' `split_special_tokens=True` does for special tokens, here for every added
        token, the non-special `<tool_call>` and FIM tokens included). ValueError for a str that is not valid
        Unicode (a lone surrogate, e.g. from undecodable bytes)."""
        backend = self._tk if allow_special else self._plain
        try:
            return backend.encode(text, add_special_tokens=add_special_tokens).ids
        except TypeError as e:
            raise (_not_text(text) or e) from None

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False, *,
                     allow_special: bool = True) -> list[list[int]]:
        """`encode` over many texts, in parallel on the Rust side (no offsets computed)."""
        backend = self._tk if allow_special else self._plain
        try:
            return [e.ids for e in backend.encode_batch_fast(list(texts), add_special_tokens=add_special_tokens)]
        except TypeError as e:
            raise next((err for t in texts if (err := _not_text(t)) is not None), e) from None

    def encode_parts(self, parts: Iterable[tuple[str, bool]]) -> list[int]:
        """Ids of the concatenated texts of `(text, markup)` parts, added tokens matched in markup parts only.

        A markup part's added-token spellings become those tokens, each part on its own (a spelling across two
        parts is text); a part with markup=False is plain text (`allow_special=False`). Between added tokens, the
        text of neighbouring parts is normalized, pre-tokenized and BPE-merged as one string, exactly as `encode`
        does, so whenever every spelling in the joined text lies inside one markup part the result equals
        `encode("".join(texts))`. This is how chat prompts keep the template's markup special and its content
        plain (`qwen25.chat.prompt`)."""
        ids: list[int] = []
        pending: list[str] = []  # text since the last added token

        def flush() -> None:
            text = "".join(pending)
            pending.clear()
            if text:
                ids.extend(self.encode(text, allow_special=False))

        for text, markup in parts:
            if not markup:
                pending.append(text)
                continue
            pos = 0
            for start, end, token_id in self._added_matches(text):
                pending.append(text[pos:start])
                flush()
                ids.append(token_id)
                pos = end
            pending.append(text[pos:])
        flush()
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; invalid UTF-8 becomes U+FFFD, unknown ids are dropped (as the HF tokenizers do)."""
        return self._tk.decode(_id_list(ids), skip_special_tokens=skip_special_tokens)

    def decode_batch(self, batch: Sequence[Sequence[int]], skip_special_tokens: bool = False) -> list[str]:
        return self._tk.decode_batch([_id_list(ids) for ids in batch], skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes one token decodes to (b"" for an unknown id); what StreamDecoder feeds on."""
        cached = self._bytes_cache.get(token_id)
        if cached is None:
            token = self._tk.id_to_token(token_id)
            if token is None:
                cached = b""
            else:
                try:  # the ByteLevel decoder's rule: all chars in the byte alphabet, else the raw UTF-8
                    cached = bytes(CHAR_TO_BYTE[c] for c in token)
                except KeyError:
                    cached = token.encode("utf-8")
            self._bytes_cache[token_id] = cached
        return cached

    # --- vocabulary

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (151936 from the GGUF, 151665 from an HF tokenizer.json)."""
        return self._tk.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int | None:
        return self._tk.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry as spelled in the file (byte-level alphabet, e.g. 'Ġworld')."""
        return self._tk.id_to_token(token_id)

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids `decode(skip_special_tokens=True)` drops: the 14 chat/vision control tokens, not tool/FIM."""
        return self._special_ids

    @property
    def added_ids(self) -> frozenset[int]:
        """All added (atomically matched) token ids, special or not."""
        return self._added_ids

    @property
    def added_tokens(self) -> tuple[str, ...]:
        """The spellings of the added tokens (`<|im_start|>`, `<tool_call>`, ...), in id order."""
        return self._added_tokens

    def _added_matches(self, text: str) -> Iterator[tuple[int, int, int]]:
        """(start, end, id) of each added token `encode` would match in `text`, left to right."""
        if self._added_re is not None:
            for m in self._added_re.finditer(text):
                yield m.start(), m.end(), self._added_by_content[m.group()]
        elif self._added_ids:
            try:
                encoding = self._tk.encode(text)
            except TypeError as e:
                raise (_not_text(text) or e) from None
            for token_id, (start, end) in zip(encoding.ids, encoding.offsets):
                if token_id in self._added_ids:
                    yield start, end, token_id

    @property
    def stop_token_ids(self) -> frozenset[int]:
        """Ids that end generation: <|im_end|>, <|endoftext|> and the eos id, whichever exist."""
        ids = {self._tk.token_to_id(t) for t in _STOP_TOKENS} | {self.eos_token_id}
        return frozenset(i for i in ids if i is not None)

    @property
    def backend(self) -> _RustTokenizer:
        """The underlying `tokenizers.Tokenizer` (for training-data pipelines that want its batch API)."""
        return self._tk

    # --- saving

    def save(self, directory: str | os.PathLike) -> Path:
        """Write tokenizer.json and tokenizer_config.json (chat template, special flags) into `directory`."""
        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        self._tk.save(str(root / "tokenizer.json"))
        config = tokenizer_config(self)
        (root / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                    encoding="utf-8")
        return root

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, special={len(self._special_ids)}, "
                f"added={len(self._added_ids)}, eos={self.eos_token_id}, pad={self.pad_token_id})")


def _not_text(text: object) -> ValueError | None:
    """The error for a str the Rust side refuses (it holds a lone surrogate), None for anything else."""
    if not isinstance(text, str):
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return ValueError(f"text is not valid Unicode: lone surrogate U+{ord(text[e.start]):04X} at index {e.start} "
                          "(undecodable bytes, or half of a UTF-16 pair)")
    return None


def _id_list(ids: Iterable[int]) -> list[int]:
    """Plain ints for the Rust side; accepts lists, numpy arrays and torch tensors."""
    tolist = getattr(ids, "tolist", None)
    return tolist() if tolist is not None else [int(i) for i in ids]


def _build_backend(bpe: models.BPE) -> _RustTokenizer:
    """The Qwen2 pipeline around a BPE model, as in Qwen's own tokenizer.json (SPEC §2)."""
    tk = _RustTokenizer(bpe)
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tk.post_processor = processors.ByteLevel(trim_offsets=False)  # adds nothing; no BOS for Qwen
    tk.decoder = decoders.ByteLevel()
    return tk


__all__ = ["Tokenizer", "QWEN2_SPLIT_REGEX", "QWEN2_NON_SPECIAL", "BYTE_TO_CHAR", "CHAR_TO_BYTE"]
