"""Ingesting documents into a tenant's collection: read, clean, chunk, dedupe, embed, publish.

Files are read by extension (Markdown, text, HTML, JSON Lines, CSV), cleaned (NFKC, no control
characters, collapsed whitespace), cut into overlapping windows of the encoder's own tokens that
prefer to end at a paragraph or sentence, stripped of exact and near duplicates, embedded in
batches and written through one :class:`~router.context.collections.CollectionWriter`: the new
version appears whole or not at all.

A chunk is embedded with its document's title on the line before its text (:func:`embedding_text`):
a window cut from the middle of a long answer often never names what it is about, and the title
does.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import re
import sys
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np

from router.config import LoadedConfig
from router.context.collections import CollectionWriter, tenant_collection_config
from router.context.types import ChunkRecord, IngestReport
from router.errors import InvalidArgument
from router.files import Progress, jsonl_objects
from router.routing.encoder import (
    MAX_TOKENS,
    Encoder,
    bulk_encoder,
    encode_in_batches,
    plain_tokenizer,
)

BOUNDARY_ZONE = 0.2  # a window may end early at a boundary within its last 20%
TITLE_TOKENS = 32  # at most this much of a title is embedded with each chunk
EMBEDDED_AS = "title-line+text"
"""Names what :func:`embedding_text` embeds; part of each source's digest, so a change of it
re-embeds every source at the next ingestion."""
_SENTENCE_END = frozenset(".!?…。！？;")
_CLOSERS = frozenset("\"')]}»”’")


class ReadError(Exception):
    """A file that cannot be ingested; the message is the reason shown to the user."""


@dataclass(frozen=True)
class Document:
    """One document of a file: its source id, text (markup removed), title and tags."""

    source: str
    text: str
    title: str = ""
    tags: tuple[str, ...] = ()


# --------------------------------------------------------------------------------------------
# cleaning


@cache
def _control_table() -> dict[int, str | None]:
    """Control, format and surrogate characters removed (tab becomes a space; line breaks and
    the zero-width joiners that emoji and some scripts need are kept)."""
    table: dict[int, str | None] = {
        code: None
        for code in range(sys.maxunicode + 1)
        if unicodedata.category(chr(code)) in ("Cc", "Cf", "Cs")
    }
    for keep in ("\n", "\u200c", "\u200d"):
        table.pop(ord(keep), None)
    table[ord("\t")] = " "
    return table


_PARAGRAPH_BREAK = re.compile(r"\n[^\S\n]*\n\s*")
_SPACES = re.compile(r"\s+")


def clean_text(text: str) -> str:
    """NFKC, control characters removed, whitespace collapsed; paragraphs (blank-line
    separated) become single lines joined by one newline."""
    text = unicodedata.normalize("NFKC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n").translate(_control_table())
    paragraphs = (_SPACES.sub(" ", p).strip() for p in _PARAGRAPH_BREAK.split(text))
    return "\n".join(p for p in paragraphs if p)


def clean_line(text: str) -> str:
    """:func:`clean_text` on one line (titles, tags)."""
    return clean_text(text).replace("\n", " ")


def text_key(text: str) -> str:
    """What two chunks share when they are exact duplicates."""
    return _SPACES.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


# --------------------------------------------------------------------------------------------
# markup


_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_ATX = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
_SETEXT = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
_RULE = re.compile(r"^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$")
_LIST_ITEM = re.compile(r"^[ \t]*(?:[-*+]|\d{1,9}[.)])[ \t]+(?:\[[ xX]\][ \t]+)?")
_QUOTE = re.compile(r"^[ \t]{0,3}(?:>[ \t]?)+")
_REF_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:[ \t]*\S+.*$")
_TABLE_RULE = re.compile(r"^[ \t]*\|?[ \t]*:?-{3,}:?[ \t]*(?:\|[ \t]*:?-{3,}:?[ \t]*)*\|?[ \t]*$")
_COMMENT = re.compile(r"<!--.*?-->", re.S)
_INLINE_CODE = re.compile(r"(`+)(.+?)\1", re.S)
_IMAGE = re.compile(r"!\[[^\]]*\](?:\([^)]*\)|\[[^\]]*\])")
_LINK = re.compile(r"\[([^\]]+)\](?:\([^)]*\)|\[[^\]]*\])")
_AUTOLINK = re.compile(r"<((?:https?|ftp)://[^>\s]+|mailto:[^>\s]+|[^>\s@]+@[^>\s]+)>")
_TAG = re.compile(r"</?[A-Za-z][^<>]*>")
_STRONG = re.compile(r"(\*\*|__)(?=\S)(.+?)(?<=\S)\1")
_EM_STAR = re.compile(r"(?<![\w*])\*(?=[^\s*])(.+?)(?<=[^\s*])\*(?![\w*])")
_EM_UNDER = re.compile(r"(?<![\w])_(?=[^\s_])(.+?)(?<=[^\s_])_(?![\w])")
_STRIKE = re.compile(r"~~(?=\S)(.+?)(?<=\S)~~")
_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!|>~<])")
_FRONT_TITLE = re.compile(r"^title[ \t]*:[ \t]*(.+?)[ \t]*$", re.I)


def _markdown_inline(text: str) -> str:
    """Inline Markdown to plain text: links keep their text, images go, emphasis marks go."""
    codes: list[str] = []

    def stash(match: re.Match[str]) -> str:
        codes.append(match.group(2).strip())
        return f"\x00{len(codes) - 1}\x00"

    text = _INLINE_CODE.sub(stash, text)
    text = _IMAGE.sub("", text)
    text = _LINK.sub(r"\1", text)
    text = _AUTOLINK.sub(lambda m: m.group(1).removeprefix("mailto:"), text)
    text = _TAG.sub("", text)
    for pattern in (_STRONG, _STRONG, _EM_STAR, _EM_UNDER, _STRIKE):
        text = pattern.sub(lambda m: m.group(m.lastindex or 1), text)
    text = _ESCAPE.sub(r"\1", text)
    return re.sub("\x00(\\d+)\x00", lambda m: codes[int(m.group(1))], text)


def markdown_to_text(markdown: str) -> tuple[str, str]:
    """``(text, title)``: Markdown syntax removed, code kept as text (one line per code line),
    headings, list items and table rows as their own paragraphs; the title is front matter's
    ``title:`` or else the first heading."""
    lines = _COMMENT.sub("", markdown.replace("\r\n", "\n").replace("\r", "\n")).split("\n")
    title = ""
    if lines and lines[0].strip() == "---":
        for end in range(1, len(lines)):
            if lines[end].strip() in ("---", "..."):
                for line in lines[1:end]:
                    match = _FRONT_TITLE.match(line.strip())
                    if match and not title:
                        title = match.group(1).strip("'\"")
                lines = lines[end + 1 :]
                break
    out: list[str] = []
    fence: str | None = None
    for line in lines:
        opening = _FENCE.match(line)
        if fence is not None:
            if opening and opening.group(1)[0] == fence[0] and len(opening.group(1)) >= len(fence):
                fence = None
            else:
                out += [line, ""]
            continue
        if opening:
            fence = opening.group(1)
            out.append("")
            continue
        heading = _ATX.match(line)
        if heading:
            text = _markdown_inline(heading.group(2) or "")
            title = title or text.strip()
            out += ["", text, ""]
            continue
        if _SETEXT.match(line) and out and out[-1].strip():  # the line above is a heading
            title = title or out[-1].strip()
            out.append("")
            continue
        if _RULE.match(line) or _REF_DEF.match(line) or _TABLE_RULE.match(line):
            out.append("")
            continue
        line = _QUOTE.sub("", line)
        item = _LIST_ITEM.match(line)
        if item:
            out += ["", _markdown_inline(line[item.end() :])]
            continue
        if "|" in line and line.strip().startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            out += ["", _markdown_inline(" | ".join(cells)), ""]
            continue
        out.append(_markdown_inline(line))
    return "\n".join(out), clean_line(title)


class _HtmlText(HTMLParser):
    SKIP = frozenset(  # not text, or site chrome (menus) repeated on every page
        {"script", "style", "noscript", "template", "svg", "iframe", "object", "nav"}
    )
    BLOCK = frozenset(
        [
            "address",
            "article",
            "aside",
            "blockquote",
            "br",
            "dd",
            "div",
            "dl",
            "dt",
            "figcaption",
            "figure",
            "footer",
            "form",
            "h1",
            "h2",
            "h3",
            "h4",
            "h5",
            "h6",
            "header",
            "hr",
            "li",
            "main",
            "nav",
            "ol",
            "p",
            "pre",
            "section",
            "table",
            "tbody",
            "thead",
            "tfoot",
            "tr",
            "ul",
            "caption",
            "details",
            "summary",
        ]
    )

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.title_parts: list[str] = []
        self.h1_parts: list[str] = []
        self._skip = 0
        self._pre = 0
        self._in_title = False
        self._in_h1 = False
        self._h1_done = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self.SKIP:
            self._skip += 1
        elif tag == "title":
            self._in_title = True
        elif tag == "h1" and not self._h1_done:
            self._in_h1 = True
        if tag == "pre":
            self._pre += 1
        if tag in self.BLOCK:
            self.parts.append("\n\n")
        elif tag in ("td", "th"):
            self.parts.append(" ")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIP:
            self._skip = max(0, self._skip - 1)
        elif tag == "title":
            self._in_title = False
        elif tag == "h1" and self._in_h1:
            self._in_h1 = False
            self._h1_done = True
        if tag == "pre":
            self._pre = max(0, self._pre - 1)
        if tag in self.BLOCK:
            self.parts.append("\n\n")

    def handle_data(self, data: str) -> None:
        if self._skip:
            return
        if self._in_title:
            self.title_parts.append(data)
            return
        if self._in_h1:
            self.h1_parts.append(data)
        self.parts.append(data.replace("\n", "\n\n") if self._pre else data)


def html_to_text(html: str) -> tuple[str, str]:
    """``(text, title)``: tags, scripts, styles and navigation menus removed; block elements
    become paragraphs; the title is ``<title>`` or else the first ``<h1>``."""
    parser = _HtmlText()
    parser.feed(html)
    parser.close()
    title = clean_line("".join(parser.title_parts)) or clean_line("".join(parser.h1_parts))
    return "".join(parser.parts), title


# --------------------------------------------------------------------------------------------
# readers


def _decode(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ReadError(f"cannot read: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ReadError(
            f"not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start})"
        ) from None


def _tags_value(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = value.split(";")
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise ReadError(f"{where}: tags must be a list of strings")
    return tuple(t for t in (clean_line(t) for t in value) if t)


def _read_markdown(path: Path, source: str) -> list[Document]:
    text, title = markdown_to_text(_decode(path))
    return [Document(source, text, title)]


def _read_text(path: Path, source: str) -> list[Document]:
    return [Document(source, _decode(path))]


def _read_html(path: Path, source: str) -> list[Document]:
    text, title = html_to_text(_decode(path))
    return [Document(source, text, title)]


def _record_id(value: Any, where: str) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ReadError(f"{where}: id must be a string or an integer")
    return str(value)


def _read_jsonl(path: Path, source: str) -> list[Document]:
    documents = []
    for number, record in jsonl_objects(_decode(path).splitlines(), ReadError):
        where = f"line {number}"
        text = record.get("text")
        if not isinstance(text, str):
            raise ReadError(f"{where}: expected a string 'text'")
        title = record.get("title") or ""
        if not isinstance(title, str):
            raise ReadError(f"{where}: 'title' must be a string")
        # "_id" is the BEIR layout's name for it
        record_id = _record_id(record.get("id", record.get("_id")), where)
        documents.append(
            Document(
                f"{source}#{record_id if record_id is not None else number}",
                text,
                clean_line(title),
                _tags_value(record.get("tags"), where),
            )
        )
    return documents


def _read_csv(path: Path, source: str) -> list[Document]:
    reader = csv.DictReader(io.StringIO(_decode(path), newline=""), strict=True)
    documents = []
    try:
        fields = reader.fieldnames or []
        if "text" not in fields:
            raise ReadError(f"the header {fields} has no 'text' column")
        for number, row in enumerate(reader, start=1):
            where = f"row {number}"
            if None in row:
                raise ReadError(f"{where}: more fields than the header")
            text = row.get("text")
            if text is None:
                raise ReadError(f"{where}: fewer fields than the header")
            record_id = _record_id(row.get("id"), where)
            documents.append(
                Document(
                    f"{source}#{record_id if record_id is not None else number}",
                    text,
                    clean_line(row.get("title") or ""),
                    _tags_value(row.get("tags") or "", where),
                )
            )
    except csv.Error as exc:
        raise ReadError(f"malformed CSV: {exc}") from None
    return documents


READERS: dict[str, Callable[[Path, str], list[Document]]] = {
    ".md": _read_markdown,
    ".markdown": _read_markdown,
    ".txt": _read_text,
    ".html": _read_html,
    ".htm": _read_html,
    ".jsonl": _read_jsonl,
    ".csv": _read_csv,
}


def _walk(root: Path) -> list[Path]:
    """Files under ``root`` sorted by path, hidden files and folders left out, folder links
    not followed."""
    found: list[Path] = []
    for directory, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [Path(directory) / name for name in filenames if not name.startswith(".")]
    return sorted(found, key=lambda path: path.relative_to(root).parts)


def source_id(path: Path, root: Path, base: Path | None) -> str:
    """The source id of the file ``path``, found under the given path ``root``.

    With a ``base`` folder (ingestion passes the configuration file's folder): the file's path
    relative to ``base`` when the file is inside it, else its absolute path; symbolic links
    and ``..`` are resolved first. So one file has one id whatever the working directory and
    whether it was named by itself or through a folder, and re-ingesting it skips it when it
    is unchanged. Without ``base``: the path relative to ``root``'s parent.
    """
    if base is None:
        return path.relative_to(root.parent).as_posix()
    resolved = path.resolve()
    try:
        return resolved.relative_to(base.resolve()).as_posix()
    except ValueError:
        return resolved.as_posix()


def read_documents(
    paths: Sequence[Path], base: Path | None = None
) -> tuple[list[Document], dict[str, str]]:
    """The documents in ``paths`` (files, or folders walked recursively) and the files skipped
    (name -> reason). A source id is ``source_id(file, given path, base)``, plus ``#id`` (or
    ``#line`` / ``#row``) for JSON Lines and CSV records."""
    documents: list[Document] = []
    skipped: dict[str, str] = {}
    seen: set[str] = set()
    for given in paths:
        root = Path(os.path.abspath(given))
        if root.is_dir():
            files = _walk(root)
        elif root.is_file():
            files = [root]
        else:
            skipped[str(given)] = "no such file or directory"
            continue
        for path in files:
            name = source_id(path, root, base)
            reader = READERS.get(path.suffix.lower())
            if reader is None:
                skipped[name] = (
                    f"unsupported file type {path.suffix or '(no extension)'!r} (expected one of "
                    f"{', '.join(sorted(READERS))})"
                )
                continue
            try:
                found = reader(path, name)
            except ReadError as exc:
                skipped[name] = str(exc)
                continue
            for document in found:
                if document.source in seen:
                    skipped[document.source] = "duplicate source id (an earlier document has it)"
                    continue
                seen.add(document.source)
                documents.append(document)
            if not found:
                skipped[name] = "no documents in the file"
    return documents, skipped


# --------------------------------------------------------------------------------------------
# chunking


def chunk_text(text: str, chunk_tokens: int, chunk_overlap: int) -> list[str]:
    """Spans of ``text`` of at most ``chunk_tokens`` tokens, each starting at most
    ``chunk_overlap`` tokens before the previous one ends: at the first sentence or paragraph
    in that overlap when there is one, else on a whole word.

    A window ends early at a paragraph break, else a sentence end, when one lies within its
    last 20%; otherwise at the last whole word that fits.
    """
    if chunk_overlap >= chunk_tokens:
        raise InvalidArgument("chunk_overlap must be smaller than chunk_tokens")
    encoding = plain_tokenizer().encode(text, add_special_tokens=False)
    offsets = encoding.offsets
    count = len(offsets)
    if count == 0:
        return [text.strip()] if text.strip() else []
    if count <= chunk_tokens:
        return [text[offsets[0][0] : offsets[-1][1]]]
    words = encoding.word_ids
    # for a cut before token j (1 <= j < count): does a word, sentence or paragraph end there?
    word_start = [True] + [words[j] != words[j - 1] for j in range(1, count)]

    def gap(j: int) -> str:
        return text[offsets[j - 1][1] : offsets[j][0]]

    def token(j: int) -> str:
        return text[offsets[j][0] : offsets[j][1]]

    def sentence_end(j: int) -> bool:
        if not gap(j):
            return False
        last = token(j - 1)
        if last and last[-1] in _CLOSERS and j >= 2:
            last = token(j - 2)
        return bool(last) and last[-1] in _SENTENCE_END

    chunks: list[str] = []
    start = 0
    zone = max(1, math.ceil(chunk_tokens * (1 - BOUNDARY_ZONE)))
    while True:
        end = start + chunk_tokens
        if end >= count:
            chunks.append(text[offsets[start][0] : offsets[-1][1]])
            break
        lowest = start + zone
        cut = next((j for j in range(end, lowest - 1, -1) if "\n" in gap(j)), None)
        if cut is None:
            cut = next((j for j in range(end, lowest - 1, -1) if sentence_end(j)), None)
        if cut is None:
            cut = end
            while cut > start + 1 and not word_start[cut]:
                cut -= 1
            if not word_start[cut]:
                cut = end  # one word longer than the window: cut inside it
        chunks.append(text[offsets[start][0] : offsets[cut - 1][1]])
        following = max(cut - chunk_overlap, start + 1)
        # Open the next window on a sentence or paragraph inside the overlap when there is one,
        # else on a whole word that is not punctuation.
        boundary = next(
            (j for j in range(following, cut) if "\n" in gap(j) or sentence_end(j)), None
        )
        if boundary is not None:
            following = boundary
        else:
            while following > start + 1 and not word_start[following]:
                following -= 1
            while following < cut - 1 and not token(following)[:1].isalnum():
                following += 1
        start = max(following, start + 1)
    return chunks


# --------------------------------------------------------------------------------------------
# ingestion


@dataclass
class _DocumentChunks:
    """A new or changed document and the chunks it is stored as."""

    document: Document
    digest: str
    chunks: list[ChunkRecord] = field(default_factory=list)


def document_digest(
    text: str, title: str, tags: Sequence[str], chunk_tokens: int, chunk_overlap: int, encoder: str
) -> str:
    """What decides whether a source must be re-chunked and re-embedded."""
    payload = json.dumps(
        {
            "text": text,
            "title": title,
            "tags": list(tags),
            "chunk_tokens": chunk_tokens,
            "chunk_overlap": chunk_overlap,
            "encoder": encoder,
            "embedded": EMBEDDED_AS,
        },
        ensure_ascii=False,
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _merge_tags(*groups: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(t for group in groups for t in group))


def embedding_text(chunk: ChunkRecord) -> str:
    """What is embedded for ``chunk``: the first :data:`TITLE_TOKENS` tokens of its title, a
    newline, and its text (the text alone when it has no title)."""
    if not chunk.title:
        return chunk.text
    encoding = plain_tokenizer().encode(chunk.title, add_special_tokens=False)
    title = chunk.title
    if len(encoding.offsets) > TITLE_TOKENS:
        title = title[: encoding.offsets[TITLE_TOKENS - 1][1]]
    return f"{title}\n{chunk.text}"


def _embed(encoder: Encoder, texts: list[str], dim: int) -> np.ndarray:
    """Unit-norm embeddings of ``texts`` (whether or not the encoder normalises its own)."""
    out = encode_in_batches(encoder.encode, texts, dim, progress="embedding", unit="chunk")
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.maximum(norms, 1e-12)


def _near_duplicates(
    embeddings: np.ndarray, stored_best: np.ndarray, threshold: float, *, within: bool = True
) -> list[int]:
    """Rows to keep: not within ``threshold`` cosine of a stored chunk or (with ``within``) of
    an earlier kept row of the same document."""
    kept: list[int] = []
    for row in range(len(embeddings)):
        if stored_best[row] >= threshold:
            continue
        if within and kept and float(np.max(embeddings[kept] @ embeddings[row])) >= threshold:
            continue
        kept.append(row)
    return kept


def ingest(
    loaded: LoadedConfig,
    tenant: str,
    collection: str,
    paths: Sequence[Path],
    *,
    tags: Sequence[str] = (),
    delete: Sequence[str] = (),
    encoder: Encoder | None = None,
    progress: Progress | None = None,
) -> IngestReport:
    """Add or replace the documents in ``paths`` and delete the sources in ``delete``, as one
    new version of ``tenant``'s ``collection``.

    A source (its id: ``source_id``, relative to the configuration file's folder) whose
    cleaned text, title, tags and chunking settings are unchanged is left as it is. Unreadable
    files are reported in ``skipped_files`` and the rest is ingested. Any error
    leaves the previous version live. Nothing changed means no new version.
    """
    config = tenant_collection_config(loaded, tenant, collection)
    configured = loaded.config.tenants[tenant].collections
    say: Progress = progress or (lambda message: None)
    given_tags = _merge_tags([t for t in (clean_line(t) for t in tags) if t])
    documents, skipped = read_documents(paths, base=loaded.base_dir)
    report = IngestReport(collection=collection, skipped_files=skipped)
    say(f"read {len(documents)} documents ({len(skipped)} files skipped)")
    if config.chunk_tokens + 2 > MAX_TOKENS:
        say(
            f"warning: chunk_tokens {config.chunk_tokens} exceeds what the encoder reads "
            f"({MAX_TOKENS - 2} tokens); chunk ends will not count in their embedding"
        )
    if encoder is None:
        encoder = bulk_encoder()
    dim = int(encoder.dim)
    encoder_name = str(encoder.name)
    with CollectionWriter(
        loaded.data_dir,
        tenant,
        collection,
        config,
        dim,
        encoder=encoder_name,
        configured=configured,
    ) as writer:
        for source in dict.fromkeys(delete):
            if writer.delete_source(source):
                report.deleted_sources.append(source)
            else:
                report.skipped_files[source] = "not in the collection (nothing to delete)"

        pending: list[_DocumentChunks] = []
        for document in documents:
            text = clean_text(document.text)
            if not text:
                report.skipped_files.setdefault(document.source, "no text after cleaning")
                continue
            title = clean_line(document.title)
            doc_tags = _merge_tags(given_tags, document.tags)
            digest = document_digest(
                text, title, doc_tags, config.chunk_tokens, config.chunk_overlap, encoder_name
            )
            previous = writer.source_digest(document.source)
            if previous == digest:
                report.unchanged_sources.append(document.source)
                continue
            if previous is None:
                report.added_sources.append(document.source)
            else:
                report.replaced_sources.append(document.source)
                writer.delete_source(document.source)  # its old chunks are no duplicates
            changed = _DocumentChunks(Document(document.source, text, title, doc_tags), digest)
            for position, piece in enumerate(
                chunk_text(text, config.chunk_tokens, config.chunk_overlap)
            ):
                changed.chunks.append(
                    ChunkRecord(document.source, position, piece, doc_tags, title)
                )
            pending.append(changed)

        # exact duplicates (casefolded, whitespace collapsed) go before anything is embedded
        seen = {text_key(text) for text in writer.texts()}
        for changed in pending:
            unique = []
            for chunk in changed.chunks:
                key = text_key(chunk.text)
                if key in seen:
                    report.duplicates_dropped += 1
                else:
                    seen.add(key)
                    unique.append(chunk)
            changed.chunks = unique

        texts = [embedding_text(chunk) for changed in pending for chunk in changed.chunks]
        if texts:
            say(f"embedding {len(texts)} chunks from {len(pending)} documents")
        embeddings = _embed(encoder, texts, dim)

        offset = 0
        for changed in pending:
            vectors = embeddings[offset : offset + len(changed.chunks)]
            offset += len(changed.chunks)
            stored_best = (
                writer.max_similarity(vectors) if len(vectors) else np.empty(0, np.float32)
            )
            # the chunks of a titled document share the title in their embeddings, which draws
            # them together: among themselves only exact duplicates go
            kept = _near_duplicates(
                vectors,
                stored_best,
                config.near_duplicate,
                within=not changed.document.title,
            )
            report.duplicates_dropped += len(changed.chunks) - len(kept)
            writer.replace_source(
                changed.document.source,
                [changed.chunks[i] for i in kept],
                vectors[kept],
                changed.digest,
            )
            report.chunks_written += len(kept)

        report.total_chunks = writer.size
        if writer.changed:
            say(f"building the index over {report.total_chunks} chunks")
            report.version = writer.commit()
            say(f"published {report.version}")
        else:
            report.version = writer.base_version or ""
            say("nothing changed; no new version")
    return report
