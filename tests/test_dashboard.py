"""The live dashboard, rendered by a real headless Chromium (Debian's ``chromium``).

Each test runs real requests through a real server, loads ``/dashboard`` in
Chromium, lets its JavaScript poll for a few seconds of virtual time, and
compares the DOM it built with what the server itself reports on
``/v1/cache`` and ``/dashboard/data``. Without Chromium the tests skip locally
and fail under CI (``CI`` set): ``make test`` installs it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest

from segcache.config import ServerConfig, read_environment
from segcache.kv.hashing import segment_digest
from segcache.kv.segment_tree import SegmentTree
from tests.server_harness import running_server

CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]
KEYS = {"sk-alpha-0001": "alpha", "sk-beta-00002": "beta"}


# --------------------------------------------------------------------- Chromium


@pytest.fixture(scope="session")
def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        msg = "Debian's chromium is not installed (`make system-deps` installs it)"
        if read_environment().ci:
            pytest.fail(msg + "; CI must run the browser tests")
        pytest.skip(msg)
    return path


@dataclass
class Element:
    tag: str
    attrs: dict[str, str]
    children: list[Element] = field(default_factory=list)
    texts: list[str | Element] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(t if isinstance(t, str) else t.text for t in self.texts)

    def walk(self):
        yield self
        for c in self.children:
            yield from c.walk()

    def find_all(self, tag: str | None = None, cls: str | None = None) -> list[Element]:
        return [
            e
            for e in self.walk()
            if (tag is None or e.tag == tag)
            and (cls is None or cls in e.attrs.get("class", "").split())
        ]

    def by_id(self, id_: str) -> Element:
        (found,) = [e for e in self.walk() if e.attrs.get("id") == id_]
        return found

    def child(self, tag: str, cls: str | None = None) -> Element | None:
        kids = [
            c
            for c in self.children
            if c.tag == tag and (cls is None or cls in c.attrs.get("class", "").split())
        ]
        return kids[0] if kids else None


class _DomBuilder(HTMLParser):
    VOID = {"meta", "link", "input", "br", "img", "hr", "source", "wbr"}

    def __init__(self) -> None:
        super().__init__()
        self.root = Element("#document", {})
        self.stack = [self.root]

    def handle_starttag(self, tag, attrs):
        e = Element(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(e)
        self.stack[-1].texts.append(e)
        if tag not in self.VOID:
            self.stack.append(e)

    def handle_endtag(self, tag):
        while len(self.stack) > 1 and self.stack.pop().tag != tag:
            pass

    def handle_data(self, data):
        self.stack[-1].texts.append(data)


def render(chromium: str, url: str, profile: Path) -> Element:
    """The page's DOM after 8 s of virtual time (about 4 polls), parsed."""
    cmd = [
        chromium,
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=8000",
        "--dump-dom",
        url,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "<body" in out.stdout, out.stderr[-3000:]
    builder = _DomBuilder()
    builder.feed(out.stdout)
    return builder.root


# ----------------------------------------------------------------- expectations


def chat(url: str, segments: list[dict], key: str | None = None) -> dict:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {"messages": USER, "max_tokens": 2, "segments": segments}
    r = httpx.post(url + CHAT, json=body, headers=headers, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()["usage"]


def cache_json(url: str, key: str | None = None) -> dict:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = httpx.get(url + "/v1/cache", headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


def short(content: str) -> str:
    return segment_digest(content).removeprefix("sha256:")[:16]


def fmt_bytes(n: int) -> str:
    """The page's fmtBytes."""
    units, i, v = ["B", "KiB", "MiB", "GiB", "TiB"], 0, float(n)
    while v >= 1024 and i < len(units) - 1:
        v, i = v / 1024, i + 1
    return f"{n} B" if i == 0 else f"{v:.1f} {units[i]}"


def json_tree(node: dict) -> tuple:
    """(hash shown, tokens, TTL?, children) as /v1/cache reports it; roots show the namespace."""
    kids = tuple(json_tree(c) for c in node["children"])
    return (node["digest"], node["tokens"], node["expires_in_s"] is not None, kids)


def dom_tree(li: Element) -> tuple:
    """The same from a rendered ``li.node``: what a reader sees, nested as the DOM nests it."""
    row = li.child("div", "row")
    hash_text = row.child("code", "hash").text
    tokens = row.child("span", "tokens")
    n_tokens = int(tokens.text.removesuffix(" tok").replace(",", "")) if tokens else 0
    has_ttl = row.child("span", "ttl") is not None
    ul = li.child("ul")
    kids = tuple(dom_tree(c) for c in ul.children) if ul else ()
    return (hash_text, n_tokens, has_ttl, kids)


def rendered_roots(dom: Element) -> list[Element]:
    tree = dom.by_id("tree").child("ul", "tree")
    return tree.children if tree else []


def card_value(dom: Element, section: str, key: str) -> Element:
    (card,) = [c for c in dom.by_id(section).children if c.attrs.get("data-key") == key]
    return card.child("dd")


def digests_of(node: dict) -> set[str]:
    return {node["digest"], node["chain"]} | {d for c in node["children"] for d in digests_of(c)}


def assert_tree_matches(dom: Element, stats: dict) -> None:
    roots = rendered_roots(dom)
    assert [json_tree(r) for r in stats["tree"]] == [dom_tree(li) for li in roots]
    assert len(roots) == 1 and roots[0].attrs["data-chain"] == stats["tree"][0]["chain"]
    assert card_value(dom, "tenant-stats", "bytes").attrs["data-value"] == str(stats["bytes"])
    assert card_value(dom, "tenant-stats", "bytes").text == fmt_bytes(stats["bytes"])
    assert card_value(dom, "tenant-stats", "standalone").attrs["data-value"] == str(
        stats["standalone"]["entries"]
    )
    assert card_value(dom, "tenant-stats", "blend").text.startswith(stats["blend"]["mode"])
    assert dom.by_id("tenant-error").attrs.get("hidden") is not None


# ------------------------------------------------------------------------ tests


def test_tree_summary_reports_age_idle_and_ttl():
    now = [100.0]
    tree = SegmentTree.create_simulated(clock=lambda: now[0])
    a = tree.insert(tree.root("ns"), "sha256:" + "a" * 64, [1, 2], None, 8)
    now[0] = 103.0
    tree.insert(a, "sha256:" + "b" * 64, [3], None, 4, ttl_s=60)
    now[0] = 110.0
    tree.match("ns", ["sha256:" + "a" * 64])  # touches a only
    now[0] = 112.5
    (root,) = tree.stats("ns")["tree"]
    (node_a,) = root["children"]
    (node_b,) = node_a["children"]
    assert (node_a["age_s"], node_a["idle_s"], node_a["expires_in_s"]) == (12.5, 2.5, None)
    assert (node_b["age_s"], node_b["idle_s"], node_b["expires_in_s"]) == (9.5, 9.5, 50.5)


def test_dashboard_renders_the_tenant_tree(tiny_engine_factory, chromium, tmp_path):
    rules, planner, coder = (
        "shared rules for every agent " * 6,
        "you plan the work " * 5,
        "you write the code " * 5,
    )
    engine = tiny_engine_factory()
    with running_server(engine) as url:
        usages = [
            chat(url, [{"id": "rules", "content": rules}, {"id": "planner", "content": planner}]),
            chat(
                url,
                [{"id": "rules", "content": rules}, {"id": "coder", "content": coder, "ttl": 600}],
            ),
            chat(url, [{"id": "rules", "content": rules}, {"id": "planner", "content": planner}]),
        ]
        dom = render(chromium, url + "/dashboard", tmp_path / "profile")
        stats = cache_json(url)
        data = httpx.get(url + "/dashboard/data").json()

    assert_tree_matches(dom, stats)
    # The nesting is the order the segments were sent in: rules, then each agent under it.
    (root,) = rendered_roots(dom)
    (rules_li,) = root.child("ul").children
    assert rules_li.attrs["data-digest"] == short(rules)
    agents = {li.attrs["data-digest"]: li for li in rules_li.child("ul").children}
    assert set(agents) == {short(planner), short(coder)}
    assert agents[short(coder)].child("div", "row").child("span", "ttl") is not None
    assert agents[short(planner)].child("div", "row").child("span", "ttl") is None
    rules_hits = stats["tree"][0]["children"][0]["hits"]
    assert rules_hits >= 2
    assert rules_li.child("div", "row").child("span", "hits").text == f"{rules_hits} hits"

    # Cache-wide numbers are the server's, and its counters match the requests' usage.
    resident = card_value(dom, "global-stats", "resident_bytes")
    assert resident.attrs["data-value"] == str(data["cache"]["resident_bytes"])
    assert data["cache"]["resident_bytes"] == stats["bytes"] + stats["radix"]["bytes"] > 0
    assert resident.text == fmt_bytes(data["cache"]["resident_bytes"])
    prompt = sum(u["prompt_tokens"] for u in usages)
    cached = sum(u["prompt_tokens_details"]["cached_tokens"] for u in usages)
    assert cached > 0
    assert card_value(dom, "token-stats", "tokens.prompt").attrs["data-value"] == str(prompt)
    assert card_value(dom, "token-stats", "tokens.cached").attrs["data-value"] == str(cached)
    ratio = card_value(dom, "global-stats", "hit_ratio")
    assert ratio.text == f"{100 * cached / prompt:.1f}%"
    assert card_value(dom, "global-stats", "generations").attrs["data-value"] == "3"

    body = dom.by_id("tenant").text + dom.by_id("global").text
    assert "shared rules" not in body and "you plan" not in body  # digests only, never prompt text
    assert int(dom.find_all("body")[0].attrs["data-polls"]) >= 3  # it keeps polling
    assert dom.by_id("key-form").attrs.get("hidden") is not None  # no keys, no key form


def test_dashboard_with_api_keys_shows_only_the_keys_tenant(
    tiny_engine_factory, chromium, tmp_path
):
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": KEYS}))
    engine = tiny_engine_factory()
    with running_server(engine, ServerConfig(api_keys_file=keys)) as url:
        chat(url, [{"id": "a", "content": "alpha's private rules " * 5}], key="sk-alpha-0001")
        chat(url, [{"id": "b", "content": "beta's private rules " * 5}], key="sk-beta-00002")
        alpha = render(chromium, url + "/dashboard#key=sk-alpha-0001", tmp_path / "p1")
        bad = render(chromium, url + "/dashboard#key=sk-wrong-key-123", tmp_path / "p2")
        none = render(chromium, url + "/dashboard", tmp_path / "p3")
        alpha_stats = cache_json(url, "sk-alpha-0001")
        beta_stats = cache_json(url, "sk-beta-00002")

    assert_tree_matches(alpha, alpha_stats)
    assert alpha.by_id("key-form").attrs.get("hidden") is None
    shown = {e.text for e in alpha.find_all("code", "hash")}
    beta_only = digests_of(beta_stats["tree"][0]) - digests_of(alpha_stats["tree"][0])
    assert short("beta's private rules " * 5) in beta_only
    assert shown & digests_of(alpha_stats["tree"][0]) and not shown & beta_only

    error = bad.by_id("tenant-error")
    assert error.attrs.get("hidden") is None
    assert "HTTP 401" in error.text and "Incorrect API key provided" in error.text
    assert "sk-wrong-key-123" not in error.text  # the server masks it
    assert rendered_roots(bad) == [] and bad.find_all(cls="node") == []
    # The open, cache-wide half still renders.
    nodes = sum(
        s["nodes"] + s["radix"]["nodes"] + s["standalone"]["entries"]
        for s in (alpha_stats, beta_stats)
    )
    assert card_value(bad, "global-stats", "nodes").attrs["data-value"] == str(nodes)

    info = none.by_id("tenant-info")
    assert info.attrs.get("hidden") is None and "enter yours" in info.text
    assert none.by_id("tenant-error").attrs.get("hidden") is not None and not none.find_all(
        cls="node"
    )


@pytest.mark.slow
def test_dashboard_on_the_real_model(real_engine, chromium, tmp_path):
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": {"sk-dashboard-test": "dashboard-test"}}))
    key = "sk-dashboard-test"
    with running_server(real_engine, ServerConfig(api_keys_file=keys)) as url:
        try:
            usage = chat(url, [{"id": "sys", "content": "You are a terse assistant."}], key=key)
            dom = render(chromium, url + f"/dashboard#key={key}", tmp_path / "profile")
            stats = cache_json(url, key)
            data = httpx.get(url + "/dashboard/data").json()
        finally:
            httpx.delete(url + "/v1/cache", headers={"Authorization": f"Bearer {key}"})
    assert_tree_matches(dom, stats)
    (root,) = rendered_roots(dom)
    assert root.child("ul").children[0].attrs["data-digest"] == short("You are a terse assistant.")
    assert card_value(dom, "global-stats", "resident_bytes").attrs["data-value"] == str(
        data["cache"]["resident_bytes"]
    )
    assert card_value(dom, "token-stats", "tokens.prompt").attrs["data-value"] == str(
        usage["prompt_tokens"]
    )
