"""Documents into titled sections: Markdown, plain text, HTML and PDF, each section titled by its heading path."""

from pathlib import Path

import pytest
from support.knowledge import CORPUS, pdf

from chatmesh.dialogue.knowledge.documents import (
    HTML,
    MARKDOWN,
    PDF,
    PLAIN_TEXT,
    DocumentError,
    ParsedDocument,
    Section,
    SourceDocument,
    media_type_for,
    parse_document,
    read_documents,
)


def parse(path: str, content: str | bytes, media_type: str) -> ParsedDocument:
    return parse_document(SourceDocument(path, content, media_type))


def test_markdown_sections_are_titled_by_their_heading_path_under_the_first_h1() -> None:
    document = parse(
        "docs/billing.md",
        "# Billing\n\nHow we bill.\n\n## Refunds\n\nWithin 14 days.\n\n### By card\n\nTo the card.\n\n"
        "## Invoices\n\nAs PDF.\n",
        MARKDOWN,
    )
    assert document == ParsedDocument(
        "Billing",
        (
            Section("Billing", ("How we bill.",)),
            Section("Billing > Refunds", ("Within 14 days.",)),
            Section("Billing > Refunds > By card", ("To the card.",)),
            Section("Billing > Invoices", ("As PDF.",)),
        ),
    )


def test_a_markdown_document_without_a_top_heading_is_titled_by_its_front_matter_or_file_name() -> None:
    with_front_matter = parse(
        "a.md", "---\ntitle: Getting started\nauthor: x\n---\n\nIntro.\n\n## Install\n\nRun it.", MARKDOWN
    )
    assert with_front_matter.title == "Getting started"
    assert [section.title for section in with_front_matter.sections] == ["Getting started", "Getting started > Install"]
    assert parse("guides/setup.md", "## Install\n\nRun it.", MARKDOWN).sections == (
        Section("setup > Install", ("Run it.",)),
    )


def test_markdown_paragraphs_are_unwrapped_but_lists_and_code_keep_their_lines() -> None:
    text = (
        "Setext title\n============\n\nA paragraph wrapped\nover two lines.\n\n- first item\n- second item\n\n"
        "```sh\n# not a heading\n\nkestrel --sync\n```\n\nSub\n---\n\nLast.\n"
    )
    document = parse("a.md", text, MARKDOWN)
    assert document.sections == (
        Section(
            "Setext title",
            (
                "A paragraph wrapped over two lines.",
                "- first item\n- second item",
                "```sh\n# not a heading\n\nkestrel --sync\n```",
            ),
        ),
        Section("Setext title > Sub", ("Last.",)),
    )


def test_plain_text_is_one_section_of_paragraphs_titled_by_the_file_name() -> None:
    document = parse("notes/security.txt", "First paragraph\nwith two lines.\n\n\n  Second.  \n", PLAIN_TEXT)
    assert document == ParsedDocument(
        "security", (Section("security", ("First paragraph\nwith two lines.", "Second.")),)
    )


def test_html_reads_headings_and_blocks_and_leaves_out_scripts_styles_and_navigation() -> None:
    html = """<html><head><title>Help &amp; support</title><style>p { color: red }</style></head><body>
      <nav><a href="/">Home</a></nav>
      <h1>Troubleshooting</h1><p>Restart   it
      first.</p>
      <h2>Error <em>codes</em></h2>
      <table><tr><th>Code</th><th>Meaning</th></tr><tr><td>E102</td><td>Disk full</td></tr></table>
      <ul><li>One</li><li>Two<br>lines</li></ul>
      <pre>line 1
  line 2</pre>
      <script>var hidden = "never";</script></body></html>"""
    document = parse("help.html", html, HTML)
    assert document == ParsedDocument(
        "Help & support",
        (
            Section("Troubleshooting", ("Restart it first.",)),
            Section(
                "Troubleshooting > Error codes",
                ("Code | Meaning", "E102 | Disk full", "One", "Two", "lines", "line 1\n  line 2"),
            ),
        ),
    )


def test_html_in_a_declared_charset_is_decoded_with_it() -> None:
    html = '<html><head><meta charset="gb18030"></head><body><h1>退款</h1><p>七天内全额退款。</p></body></html>'
    document = parse("zh.html", html.encode("gb18030"), HTML)
    assert document == ParsedDocument("退款", (Section("退款", ("七天内全额退款。",)),))


def test_pdf_pages_are_sections_titled_by_the_metadata_title() -> None:
    content = pdf(
        [["Kestrel 4.2 release notes.", "Files on demand on Linux."], ["Known issues."]], title="Release notes"
    )
    document = parse("notes.pdf", content, PDF)
    assert document == ParsedDocument(
        "Release notes",
        (
            Section("Release notes > page 1", ("Kestrel 4.2 release notes.\nFiles on demand on Linux.",)),
            Section("Release notes > page 2", ("Known issues.",)),
        ),
    )
    assert parse("guides/notes.pdf", pdf([["Text."]]), PDF).title == "notes"


@pytest.mark.parametrize(
    ("content", "media_type", "error"),
    [
        (b"%PDF-1.4 not really", PDF, "not a readable PDF"),
        (b"caf\xe9", MARKDOWN, "not valid utf-8-sig text"),
        (b"text", "application/msword", "is not one ingestion reads"),
    ],
)
def test_a_document_that_cannot_be_read_is_refused_naming_it(content: bytes, media_type: str, error: str) -> None:
    with pytest.raises(DocumentError, match=error) as raised:
        parse("docs/broken", content, media_type)
    assert "docs/broken" in str(raised.value)


def test_media_types_come_from_extensions() -> None:
    assert [media_type_for(name) for name in ("a.md", "b.MARKDOWN", "c.txt", "d.htm", "e.html", "f.pdf", "g.docx")] == [
        MARKDOWN,
        MARKDOWN,
        PLAIN_TEXT,
        HTML,
        HTML,
        PDF,
        None,
    ]


def test_a_folder_is_read_recursively_with_relative_paths_skipping_hidden_and_unknown_files(tmp_path: Path) -> None:
    (tmp_path / "guides").mkdir()
    (tmp_path / ".git").mkdir()
    (tmp_path / "guides" / "setup.md").write_text("# Setup")
    (tmp_path / "faq.html").write_text("<h1>FAQ</h1>")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    (tmp_path / ".git" / "notes.txt").write_text("no")
    (tmp_path / ".draft.md").write_text("no")
    documents = read_documents(tmp_path)
    assert [(document.path, document.media_type) for document in documents] == [
        ("faq.html", HTML),
        ("guides/setup.md", MARKDOWN),
    ]
    assert read_documents(tmp_path / "guides" / "setup.md") == [SourceDocument("setup.md", b"# Setup", MARKDOWN)]
    with pytest.raises(DocumentError, match="not a type ingestion reads"):
        read_documents(tmp_path / "image.png")


def test_every_document_of_the_test_corpus_parses_into_titled_sections() -> None:
    documents = read_documents(CORPUS)
    assert len(documents) == 9
    for document in documents:
        parsed = parse_document(document)
        assert parsed.sections, document.path
        assert all(section.title and section.paragraphs for section in parsed.sections)
    html = parse_document(next(document for document in documents if document.path == "en/troubleshooting.html"))
    text = "\n".join(paragraph for section in html.sections for paragraph in section.paragraphs)
    assert "analytics" not in text
    assert "Documentation" not in text  # the navigation
