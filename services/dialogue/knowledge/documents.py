"""Documents into titled sections of paragraphs: Markdown, plain text, HTML and PDF.

A section is what lies under one heading; its title is the heading path ("Billing > Refunds"), led by the
document's title unless the path starts at a top-level heading (which is then the title). Text before the first
heading is a section titled by the document's title alone. How each kind is read:

- **Markdown** (`text/markdown`): ATX (`## Refunds`) and setext (underlined) headings; paragraphs are separated by
  blank lines, with their soft line breaks made spaces (list items, table rows and quotes keep their lines), and
  a fenced code block (``` or ~~~) is one paragraph, kept as it is. The title is a YAML front matter's `title`,
  else the first `#` heading, else the file's name.
- **Plain text** (`text/plain`): one section of the paragraphs between blank lines, titled by the file's name.
- **HTML** (`text/html`, read with the standard library's html.parser): `h1`-`h6` are headings; block elements
  (`p`, `li`, `tr`, `div`, `br`, `pre`, ...) end paragraphs, and a table row is one, its cells between ` | `;
  what `script`, `style`, `template`, `noscript`, `svg` and `nav` hold is left out; `pre` keeps its line breaks.
  The title is `<title>`, else the first `h1`, else the file's name.
- **PDF** (`application/pdf`, with pypdf: pure Python, no dependencies, maintained): one section per page,
  titled "<title> > page N"; the title is the document's metadata title, else the file's name. PDF has no
  headings or paragraphs to read, only positioned text: paragraphs are what pypdf's text extraction separates by
  blank lines (often a whole page, which chunking splits at its lines and sentences). A scanned PDF (images
  without text) yields nothing.

Text is UTF-8 (a byte-order mark is dropped); an HTML file may declare another charset in a `<meta>` tag.
"""

from __future__ import annotations

import codecs
import io
import re
from collections.abc import Iterable
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path, PurePosixPath

import yaml

MARKDOWN = "text/markdown"
PLAIN_TEXT = "text/plain"
HTML = "text/html"
PDF = "application/pdf"
MEDIA_TYPES = {
    ".md": MARKDOWN,
    ".markdown": MARKDOWN,
    ".txt": PLAIN_TEXT,
    ".text": PLAIN_TEXT,
    ".html": HTML,
    ".htm": HTML,
    ".pdf": PDF,
}
# Between the parts of a heading path.
TITLE_SEPARATOR = " > "


class DocumentError(ValueError):
    """A document that cannot be read: an unsupported media type, text that does not decode, a broken PDF."""


@dataclass(frozen=True, slots=True)
class SourceDocument:
    """A document as given to ingestion: its path (its name in citations, unique in a knowledge base), its
    content, and its media type (one of MEDIA_TYPES' values)."""

    path: str
    content: bytes | str
    media_type: str

    @property
    def content_bytes(self) -> bytes:
        return self.content.encode() if isinstance(self.content, str) else self.content


@dataclass(frozen=True, slots=True)
class Section:
    title: str
    paragraphs: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ParsedDocument:
    title: str
    sections: tuple[Section, ...]


def media_type_for(path: str | Path) -> str | None:
    """The media type of a file by its extension, or None when it is not one ingestion reads."""
    return MEDIA_TYPES.get(Path(path).suffix.lower())


def read_documents(path: Path) -> list[SourceDocument]:
    """The documents at `path`: the file itself, or every file of a supported type under the directory (hidden
    files and directories left out), in path order. A document's path is the file's name, or its path relative
    to the directory, with forward slashes."""
    if path.is_file():
        media_type = media_type_for(path)
        if media_type is None:
            raise DocumentError(f"{path}: not a type ingestion reads ({', '.join(sorted(MEDIA_TYPES))})")
        return [SourceDocument(path.name, path.read_bytes(), media_type)]
    documents = []
    for file in sorted(path.rglob("*")):
        relative = file.relative_to(path)
        media_type = media_type_for(file)
        if media_type is None or not file.is_file() or any(part.startswith(".") for part in relative.parts):
            continue
        documents.append(SourceDocument(relative.as_posix(), file.read_bytes(), media_type))
    return documents


def parse_document(document: SourceDocument) -> ParsedDocument:
    """The document's title and its sections, each with at least one paragraph."""
    name = PurePosixPath(document.path).stem or document.path
    if document.media_type == PDF:
        return _parse_pdf(document.content_bytes, name, document.path)
    if document.media_type == MARKDOWN:
        return _parse_markdown(_text(document), name)
    if document.media_type == PLAIN_TEXT:
        return _with_sections(name, [((), _paragraphs(_text(document)))])
    if document.media_type == HTML:
        return _parse_html(_text(document), name)
    raise DocumentError(f"{document.path}: media type {document.media_type!r} is not one ingestion reads")


def _text(document: SourceDocument) -> str:
    if isinstance(document.content, str):
        return document.content
    encoding = "utf-8-sig"
    if document.media_type == HTML:
        declared = _HTML_CHARSET.search(document.content[:2048])
        if declared is not None:
            encoding = declared.group(1).decode("ascii")
            try:
                encoding = "utf-8-sig" if codecs.lookup(encoding).name == "utf-8" else encoding
            except LookupError:
                raise DocumentError(f"{document.path}: unknown charset {encoding!r}") from None
    try:
        return document.content.decode(encoding)
    except UnicodeDecodeError as error:
        raise DocumentError(f"{document.path}: not valid {encoding} text (at byte {error.start})") from None


_HTML_CHARSET = re.compile(rb"""<meta[^>]*charset\s*=\s*["']?([A-Za-z0-9_.:-]+)""", re.IGNORECASE)


def _paragraphs(text: str) -> tuple[str, ...]:
    return tuple(paragraph.strip() for paragraph in re.split(r"\n[ \t]*\n", text.strip()) if paragraph.strip())


# (heading path, paragraphs) for each heading, in order.
RawSections = Iterable[tuple[tuple[tuple[int, str], ...], tuple[str, ...]]]


def _with_sections(title: str, raw_sections: RawSections) -> ParsedDocument:
    sections = []
    for headings, paragraphs in raw_sections:
        if not paragraphs:
            continue
        path = [text for _, text in headings]
        if not headings or headings[0][0] != 1:
            path.insert(0, title)
        sections.append(Section(TITLE_SEPARATOR.join(path), paragraphs))
    return ParsedDocument(title, tuple(sections))


class _Outline:
    """The heading path while a document is read, and the paragraphs gathered under the current heading."""

    def __init__(self) -> None:
        self.headings: list[tuple[int, str]] = []
        self.paragraphs: list[str] = []
        self.sections: list[tuple[tuple[tuple[int, str], ...], tuple[str, ...]]] = []
        self.first_h1: str | None = None

    def paragraph(self, text: str) -> None:
        if text.strip():
            self.paragraphs.append(text.strip())

    def heading(self, level: int, text: str) -> None:
        text = " ".join(text.split())
        if not text:
            return
        self.close_section()
        while self.headings and self.headings[-1][0] >= level:
            self.headings.pop()
        self.headings.append((level, text))
        if level == 1 and self.first_h1 is None:
            self.first_h1 = text

    def close_section(self) -> None:
        self.sections.append((tuple(self.headings), tuple(self.paragraphs)))
        self.paragraphs = []


_ATX_HEADING = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
_SETEXT_UNDERLINE = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")


def _parse_markdown(text: str, name: str) -> ParsedDocument:
    lines = text.splitlines()
    front_title = None
    if lines and lines[0].strip() == "---":
        end = next((index for index in range(1, len(lines)) if lines[index].strip() in ("---", "...")), None)
        if end is not None:
            front_title = _front_matter_title("\n".join(lines[1:end]))
            lines = lines[end + 1 :]
    outline = _Outline()
    block: list[str] = []
    fence: str | None = None

    def end_block() -> None:
        outline.paragraph(_unwrap(block) if fence is None else "\n".join(block))
        block.clear()

    for line in lines:
        if fence is not None:
            block.append(line)
            if line.strip().startswith(fence):
                end_block()
                fence = None
            continue
        opening = _FENCE.match(line)
        if opening is not None:
            end_block()
            fence = opening.group(1)
            block.append(line)
            continue
        heading = _ATX_HEADING.match(line)
        if heading is not None:
            end_block()
            outline.heading(len(heading.group(1)), heading.group(2) or "")
            continue
        underline = _SETEXT_UNDERLINE.match(line)
        if underline is not None and len(block) == 1:
            heading_text = block.pop()
            outline.heading(1 if underline.group(1)[0] == "=" else 2, heading_text)
            continue
        if not line.strip() or underline is not None:
            end_block()
            continue
        block.append(line)
    end_block()
    outline.close_section()
    return _with_sections(front_title or outline.first_h1 or name, outline.sections)


# A line that starts a list item, a table row or a quote: kept on a line of its own.
_LINE_START = re.compile(r"^\s*(?:[-*+]\s|\d+[.)]\s|\||>)")


def _unwrap(lines: list[str]) -> str:
    """A Markdown paragraph's lines, a soft line break (a line that continues the one before) made a space."""
    unwrapped: list[str] = []
    for line in lines:
        if unwrapped and not _LINE_START.match(line):
            unwrapped[-1] = f"{unwrapped[-1].rstrip()} {line.strip()}"
        else:
            unwrapped.append(line.rstrip())
    return "\n".join(unwrapped)


def _front_matter_title(front_matter: str) -> str | None:
    try:
        fields = yaml.safe_load(front_matter)
    except yaml.YAMLError:
        return None
    title = fields.get("title") if isinstance(fields, dict) else None
    return " ".join(title.split()) if isinstance(title, str) and title.strip() else None


_HTML_SKIPPED = frozenset({"script", "style", "template", "noscript", "svg", "nav"})
_HTML_HEADINGS = {f"h{level}": level for level in range(1, 7)}
_HTML_BLOCKS = frozenset(
    {
        *("p", "div", "section", "article", "main", "header", "footer", "aside", "blockquote", "figure"),
        *("figcaption", "ul", "ol", "li", "dl", "dt", "dd", "table", "thead", "tbody", "tr"),
        *("br", "hr", "pre", "body", "form", "details", "summary", "caption"),
    }
)


class _HtmlReader(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.outline = _Outline()
        self.title: str | None = None
        self._skipping: list[str] = []
        self._text: list[str] = []
        self._heading: int | None = None
        self._in_title = False
        self._pre_depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self._skipping or tag in _HTML_SKIPPED:
            if tag in _HTML_SKIPPED:
                self._skipping.append(tag)
            return
        if tag == "title":
            self._in_title = True
        elif tag in _HTML_HEADINGS:
            self._end_paragraph()
            self._heading = _HTML_HEADINGS[tag]
        elif tag in _HTML_BLOCKS:
            self._end_paragraph()
            if tag == "pre":
                self._pre_depth += 1
        elif tag in ("td", "th") and "".join(self._text).strip():
            self._text.append(" | ")

    def handle_endtag(self, tag: str) -> None:
        if self._skipping:
            if tag == self._skipping[-1]:
                self._skipping.pop()
            return
        if tag == "title":
            self._in_title = False
        elif tag in _HTML_HEADINGS and self._heading is not None:
            self.outline.heading(self._heading, "".join(self._text))
            self._text.clear()
            self._heading = None
        elif tag in _HTML_BLOCKS:
            self._end_paragraph()
            if tag == "pre":
                self._pre_depth = max(0, self._pre_depth - 1)

    def handle_data(self, data: str) -> None:
        if self._skipping:
            return
        if self._in_title:
            self.title = " ".join(((self.title or "") + data).split())
        else:
            self._text.append(data)

    def _end_paragraph(self) -> None:
        if self._heading is not None:
            return
        text = "".join(self._text)
        self._text.clear()
        if self._pre_depth:
            self.outline.paragraph(text.strip("\n"))
        else:
            self.outline.paragraph(" ".join(text.split()))

    def finish(self) -> None:
        self.close()
        self._heading = None
        self._end_paragraph()
        self.outline.close_section()


def _parse_html(text: str, name: str) -> ParsedDocument:
    reader = _HtmlReader()
    reader.feed(text)
    reader.finish()
    return _with_sections(reader.title or reader.outline.first_h1 or name, reader.outline.sections)


def _parse_pdf(content: bytes, name: str, path: str) -> ParsedDocument:
    # Imported here: a process that never reads a PDF (dialogue answering turns) does not load it.
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    try:
        reader = PdfReader(io.BytesIO(content))
        metadata_title = reader.metadata.title if reader.metadata is not None else None
        pages = [page.extract_text() or "" for page in reader.pages]
    except (PyPdfError, ValueError, KeyError, TypeError) as error:
        raise DocumentError(f"{path}: not a readable PDF ({type(error).__name__})") from None
    title = " ".join(metadata_title.split()) if isinstance(metadata_title, str) and metadata_title.strip() else name
    sections = [
        Section(f"{title}{TITLE_SEPARATOR}page {number}", paragraphs)
        for number, text in enumerate(pages, start=1)
        if (paragraphs := _paragraphs(text))
    ]
    return ParsedDocument(title, tuple(sections))
