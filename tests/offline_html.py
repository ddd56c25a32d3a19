"""What an HTML page would load: the URLs its tags, stylesheets and scripts point at, so a test can tell whether the
page draws without a network.

Only loads count, not every URL-like string: the vega libraries inlined in a page hold schema and documentation
URLs as plain strings, which a browser never fetches.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

# attributes whose value a browser fetches (or navigates to) as a URL
URL_ATTRS = {"src", "href", "data", "poster", "action", "formaction", "background", "manifest", "xlink:href"}
_CSS_URL = re.compile(r"""(?:url\(\s*["']?|@import\s+["'])([^"')\s]+)""", re.I)
# dynamic import(), importScripts() and a module's static `import ... from "..."` with a literal URL
_JS_URL = re.compile(
    r"""(?:\bimport\s*\(\s*|\bimportScripts\s*\(\s*|\bimport\s+(?:[\w*{}$,\s]+?\s+from\s*)?)["'`]([^"'`]+)["'`]"""
)
_REMOTE = re.compile(r"^\s*(?:[a-z][a-z0-9+.-]*:)?//", re.I)  # http(s)://, ws://, ftp://, protocol-relative //


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.refs: list[tuple[str, str]] = []  # (where, url)
        self._element: str | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if value is None:
                continue
            if name in URL_ATTRS:
                self.refs.append((f"<{tag} {name}>", value))
            elif name in ("srcset", "imagesrcset"):
                self.refs += [(f"<{tag} {name}>", c.split()[0]) for c in value.split(",") if c.strip()]
            elif name == "style":
                self.refs += [(f"<{tag} style>", u) for u in _CSS_URL.findall(value)]
        if tag in ("script", "style"):
            self._element, self._text = tag, []

    def handle_data(self, data: str) -> None:
        if self._element is not None:
            self._text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == self._element:
            text = "".join(self._text)
            pattern = _CSS_URL if tag == "style" else _JS_URL
            self.refs += [(f"<{tag}> text", u) for u in pattern.findall(text)]
            self._element = None


def resource_refs(html: str) -> list[tuple[str, str]]:
    """Every URL the page would load, as (where it is, the URL)."""
    parser = _Refs()
    parser.feed(html)
    parser.close()
    return parser.refs


def remote_loads(html: str) -> list[tuple[str, str]]:
    """The URLs the page would fetch from another machine (any scheme with '//', or a protocol-relative one)."""
    return [(where, url) for where, url in resource_refs(html) if _REMOTE.match(url)]
