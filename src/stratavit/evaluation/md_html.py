"""Markdown -> one self-contained HTML page, images embedded (the report's ``report.html``).

:func:`write_html` uses the ``markdown`` package when it is installed (imported lazily: it is an
optional dependency) and otherwise :func:`markdown_to_html`, a small built-in converter for the
Markdown subset the reports use. Raw HTML in the Markdown is escaped by both.
"""

from __future__ import annotations

import base64
import html
import importlib.util
import mimetypes
import re
import urllib.parse
import warnings
from pathlib import Path

__all__ = ["markdown_to_html", "write_html"]

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; line-height: 1.45;
       color: #222; max-width: 980px; margin: 2em auto; padding: 0 1em; }
h1, h2, h3 { line-height: 1.2; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; }
table { border-collapse: collapse; margin: 1em 0; font-size: .92em; }
th, td { border: 1px solid #ccc; padding: .3em .7em; }
th { background: #f2f2f2; } tr:nth-child(even) td { background: #fafafa; }
code { background: #f4f4f4; padding: .1em .3em; border-radius: 3px; font-size: .92em; }
pre { background: #f4f4f4; padding: .7em; overflow-x: auto; } pre code { padding: 0; }
img { max-width: 100%; height: auto; }
blockquote { margin: 0; padding-left: 1em; border-left: 3px solid #ccc; color: #555; }
""".strip()

_SAFE_URL = re.compile(r"^(?:[a-z][a-z0-9+.-]*:|//)", re.I)
_LIST_ITEM = re.compile(r"^( *)[-*+]\s+(.*)$")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_TABLE_SEP = re.compile(r"^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$")
_HR = re.compile(r"^\s{0,3}([-*_])(\s*\1){2,}\s*$")
_FENCE = re.compile(r"^\s*(```|~~~)")


def _url(raw: str) -> str:
    """An escaped URL for an attribute; ``javascript:`` and other non-web schemes become ``#``."""
    raw = raw.strip()
    if _SAFE_URL.match(raw) and not re.match(r"^(https?:|mailto:|data:image/|//)", raw, re.I):
        raw = "#"
    return html.escape(raw, quote=True)


def _inline(text: str) -> str:
    """Inline Markdown (code, images, links, bold, italic) -> HTML, with everything else escaped."""
    stash: list[str] = []

    def keep(fragment: str) -> str:
        stash.append(fragment)
        return f"\x00{len(stash) - 1}\x00"

    text = text.replace("\x00", "")
    text = re.sub(r"(`+)(.+?)\1", lambda m: keep(f"<code>{html.escape(m[2].strip())}</code>"), text)
    text = re.sub(
        r"!\[([^\]]*)\]\(\s*<?([^)\s>]+)>?(?:\s+\"([^\"]*)\")?\s*\)",
        lambda m: keep(
            f'<img src="{_url(m[2])}" alt="{html.escape(m[1], quote=True)}"'
            + (f' title="{html.escape(m[3], quote=True)}"' if m[3] else "")
            + ">"
        ),
        text,
    )
    text = re.sub(
        r"\[([^\]]+)\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)",
        lambda m: keep(f'<a href="{_url(m[2])}">') + m[1] + keep("</a>"),
        text,
    )
    text = re.sub(
        r"<(https?://[^>\s]+)>", lambda m: keep(f'<a href="{_url(m[1])}">{html.escape(m[1])}</a>'), text
    )
    text = html.escape(text, quote=False)
    text = re.sub(r"\*\*(?=\S)(.+?)(?<=\S)\*\*", r"<strong>\1</strong>", text)
    text = re.sub(r"(?<!\w)__(?=\S)(.+?)(?<=\S)__(?!\w)", r"<strong>\1</strong>", text)
    text = re.sub(r"(?<![\w*])\*(?=[^\s*])(.+?)(?<=[^\s*])\*(?![\w*])", r"<em>\1</em>", text)
    text = re.sub(r"(?<!\w)_(?=[^\s_])(.+?)(?<=[^\s_])_(?!\w)", r"<em>\1</em>", text)
    text = re.sub(r"\\([\\`*_{}\[\]()#+\-.!|])", r"\1", text)
    for _ in range(3):  # stashed fragments may hold stashed fragments (link text with code)
        text = re.sub(r"\x00(\d+)\x00", lambda m: stash[int(m[1])], text)
    return text


def _split_row(line: str) -> list[str]:
    line = line.strip()
    if line.startswith("|"):
        line = line[1:]
    if line.endswith("|") and not line.endswith("\\|"):
        line = line[:-1]
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)]


def _table(lines: list[str]) -> str:
    header = _split_row(lines[0])
    aligns = []
    for cell in _split_row(lines[1]):
        left, right = cell.startswith(":"), cell.endswith(":")
        aligns.append("center" if left and right else "right" if right else "left" if left else "")

    def cells(row: list[str], tag: str) -> str:
        out = []
        for i in range(len(header)):
            text = row[i] if i < len(row) else ""
            al = aligns[i] if i < len(aligns) else ""
            style = f' style="text-align: {al}"' if al else ""
            out.append(f"<{tag}{style}>{_inline(text)}</{tag}>")
        return "<tr>" + "".join(out) + "</tr>"

    body = [cells(_split_row(r), "td") for r in lines[2:]]
    parts = ["<table>", "<thead>", cells(header, "th"), "</thead>"]
    if body:
        parts += ["<tbody>", *body, "</tbody>"]
    parts.append("</table>")
    return "\n".join(parts)


def _list(items: list[tuple[int, str]]) -> str:
    out: list[str] = []
    stack: list[int] = []
    for indent, text in items:
        if not stack or indent > stack[-1]:
            out.append("<ul>")
            stack.append(indent)
        else:
            while len(stack) > 1 and indent < stack[-1]:
                out.append("</li></ul>")
                stack.pop()
            out.append("</li>")
        out.append("<li>" + _inline(text))
    out.extend("</li></ul>" for _ in stack)
    return "".join(out)


def markdown_to_html(text: str) -> str:
    """Built-in converter for the Markdown subset our reports use.

    Headings (``#``..``######``), paragraphs, ``-``/``*`` bullet lists nested by indentation,
    pipe tables (with ``:---:`` alignment), fenced code blocks, ``>`` quotes, horizontal rules,
    and inline code, images, links, ``**bold**`` and ``_italic_``. All other text is escaped.
    """
    lines = text.replace("\r\n", "\n").replace("\r", "\n").expandtabs(4).split("\n")
    blocks: list[str] = []
    para: list[str] = []

    def flush() -> None:
        if para:
            blocks.append("<p>" + _inline("\n".join(s.strip() for s in para)) + "</p>")
            para.clear()

    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            flush()
            i += 1
            continue
        fence = _FENCE.match(line)
        if fence:
            flush()
            body = []
            i += 1
            while i < len(lines) and not lines[i].strip().startswith(fence[1]):
                body.append(lines[i])
                i += 1
            i += 1
            blocks.append("<pre><code>" + html.escape("\n".join(body)) + "</code></pre>")
            continue
        heading = _HEADING.match(line)
        if heading:
            flush()
            level = len(heading[1])
            blocks.append(f"<h{level}>{_inline(heading[2])}</h{level}>")
            i += 1
            continue
        if _HR.match(line) and not para:
            blocks.append("<hr>")
            i += 1
            continue
        if "|" in line and i + 1 < len(lines) and _TABLE_SEP.match(lines[i + 1]) and "-" in lines[i + 1]:
            flush()
            rows = [line, lines[i + 1]]
            i += 2
            while i < len(lines) and lines[i].strip() and "|" in lines[i]:
                rows.append(lines[i])
                i += 1
            blocks.append(_table(rows))
            continue
        if _LIST_ITEM.match(line) and not _HR.match(line):
            flush()
            items: list[tuple[int, str]] = []
            while i < len(lines) and lines[i].strip():
                m = _LIST_ITEM.match(lines[i])
                if m and not _HR.match(lines[i]):
                    items.append((len(m[1]), m[2]))
                elif lines[i].startswith(" ") and items:  # continuation of the previous item
                    items[-1] = (items[-1][0], items[-1][1] + "\n" + lines[i].strip())
                else:
                    break
                i += 1
            blocks.append(_list(items))
            continue
        if line.lstrip().startswith(">"):
            flush()
            quote = []
            while i < len(lines) and lines[i].lstrip().startswith(">"):
                quote.append(re.sub(r"^\s*>\s?", "", lines[i]))
                i += 1
            blocks.append("<blockquote>" + markdown_to_html("\n".join(quote)) + "</blockquote>")
            continue
        para.append(line)
        i += 1
    flush()
    return "\n".join(blocks)


def _normalise_list_indent(text: str) -> str:
    """Re-indent nested bullets to 4 spaces per level (Python-Markdown needs 4; ours use 2)."""
    out = []
    stack: list[int] = []  # indents of the open list levels
    in_fence = False
    for line in text.split("\n"):
        if _FENCE.match(line):
            in_fence = not in_fence
        m = None if in_fence or _HR.match(line) else _LIST_ITEM.match(line)
        if m:
            indent = len(m[1])
            while stack and indent < stack[-1]:
                stack.pop()
            if not stack or indent > stack[-1]:
                stack.append(indent)
            out.append("    " * (len(stack) - 1) + line.lstrip())
        elif stack and line.strip() and line.startswith(" ") and not in_fence:
            out.append("    " * len(stack) + line.lstrip())  # continuation of an item
        else:
            if line.strip() and not line.startswith(" "):
                stack = []
            out.append(line)
    return "\n".join(out)


def _markdown_package_html(text: str) -> str:
    import markdown  # type: ignore[import-untyped]

    md = markdown.Markdown(extensions=["tables", "fenced_code"], output_format="html")
    # escape raw HTML instead of passing it through (Markdown has no "safe mode" any more)
    md.preprocessors.deregister("html_block", strict=False)
    md.inlinePatterns.deregister("html", strict=False)
    return md.convert(_normalise_list_indent(text))


def _embed_images(body: str, base: Path) -> str:
    """Replace ``src`` of ``<img>`` tags that name local files by base64 data URIs."""

    def repl(m: re.Match[str]) -> str:
        src = html.unescape(m[2])
        if src.startswith("data:") or _SAFE_URL.match(src):
            return m[0]
        candidates = [Path(src), Path(urllib.parse.unquote(src))]
        for cand in candidates:
            path = cand if cand.is_absolute() else base / cand
            if path.is_file():
                mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
                data = base64.b64encode(path.read_bytes()).decode("ascii")
                return f"{m[1]}data:{mime};base64,{data}{m[3]}"
        warnings.warn(f"write_html: image {src!r} not found next to the report; left as a link", stacklevel=3)
        return m[0]

    return re.sub(r'(<img\b[^>]*?\bsrc=")([^"]*)(")', repl, body)


def write_html(report_md: Path, out_html: Path, *, engine: str = "auto") -> Path:
    """Write a self-contained HTML version of a Markdown report.

    Images the report references by a local path (``![alt](file.png)``, relative to the
    report's folder) are embedded as base64 data URIs, so the HTML file can be moved or
    attached alone.

    Args:
        report_md: the Markdown report.
        out_html: where to write the HTML (folders are created).
        engine: ``"markdown"`` (the ``markdown`` package, tables extension), ``"builtin"`` (a
            small converter for the subset our reports use) or ``"auto"`` (the package when
            importable). Raw HTML in the Markdown is escaped by both.

    Returns:
        ``out_html``.
    """
    report_md = Path(report_md)
    out_html = Path(out_html)
    if engine not in ("auto", "markdown", "builtin"):
        raise ValueError(f"unknown engine {engine!r}; use 'auto', 'markdown' or 'builtin'")
    text = report_md.read_text(encoding="utf-8")
    use_pkg = engine == "markdown" or (engine == "auto" and importlib.util.find_spec("markdown") is not None)
    body = _markdown_package_html(text) if use_pkg else markdown_to_html(text)
    body = _embed_images(body, report_md.parent)

    title_match = re.search(r"^#\s+(.+?)\s*#*\s*$", text, re.M)
    title = html.escape(title_match[1] if title_match else report_md.stem)
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{title}</title>\n<style>\n{_CSS}\n</style>\n</head>\n<body>\n<main>\n"
        f"{body}\n</main>\n</body>\n</html>\n"
    )
    out_html.parent.mkdir(parents=True, exist_ok=True)
    out_html.write_text(page, encoding="utf-8")
    return out_html
