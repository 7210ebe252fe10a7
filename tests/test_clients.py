"""The client guides work as written, and the reference pages name everything swapd has.

``docs/clients.md``: every ``python`` and ``sh`` block carries a title
(```` ```python title="openai-chat" ````) and runs here, against swapd in-process with fake
llama-server children whose profiles have the example config's names, with only the URL
changed; its output must contain what :data:`EXPECTED` says. A block with a title that
:data:`EXPECTED` does not know fails the test, so the page cannot grow an unchecked
example. ``yaml`` blocks must load as (part of) a config.

``docs/http.md``, ``docs/operations.md``, ``docs/troubleshooting.md`` and ``docs/index.md``:
every route, proxied path, error code, metric, status field, event kind and start-failure
hint that the code has is named on its page, and the index links every page.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
import yaml

from swapd import config as cfg
from swapd import errors
from swapd.config import parse_config
from swapd.config.schema import config_schema
from swapd.core import process
from swapd.http import proxy
from swapd.http.app import create_app
from swapd.serve import Running, open_server
from tests.support.fake_config import fake_config
from tests.test_schema import mini_problems

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
CLIENTS = (DOCS / "clients.md").read_text()
DOC_URL = "http://127.0.0.1:9001"
API_KEY = "sk-swapd-test-key"

BLOCK = re.compile(r'^```(\w+)(?: title="([^"]+)")?\n(.*?)^```$', re.M | re.S)


@attrs.frozen
class Block:
    lang: str
    title: str | None
    code: str


def blocks(text: str) -> list[Block]:
    return [Block(lang, title or None, code) for lang, title, code in BLOCK.findall(text)]


def titled(lang: str) -> list[Block]:
    found = [b for b in blocks(CLIENTS) if b.lang == lang]
    assert all(b.title for b in found), f"every {lang} block in clients.md needs a title"
    return found


EXPECTED: dict[str, list[str]] = {
    "openai-chat": ["fake:qwen3.6-27b-balanced:"],
    "openai-stream": ["[swapd] loading qwen3.6-27b-balanced", "fake:qwen3.6-27b-balanced:"],
    "openai-models": ["qwen3.6-27b-balanced 8192 unloaded", "qwen3-embed 8192 unloaded"],
    "openai-key": ["qwen3.6-27b-balanced"],
    "ollama": ["qwen3.6-27b-balanced", "qwen3-embed", "num_ctx 8192",
               "'llama.context_length': 8192"],
    "ollama-chat": ["[swapd] ", "fake:qwen3.6-27b-balanced:"],
    "curl-models": ['"id": "qwen3.6-27b-balanced"', '"context_length": 8192'],
    "curl-chat": ["fake:qwen3.6-27b-balanced:"],
    "curl-stream": [": swapd loading qwen3.6-27b-balanced", "[swapd] ", "data: [DONE]"],
    "curl-key": ['"object": "list"'],
    "curl-router-load": ['{"success": true}'],
}
"""What each runnable example must print."""

NOT_RUN = {"schema-cli": "writes to /etc/swapd"}


def doc_config(tmp_path: Path, **extra: Any) -> str:
    """The example config's profile names, with fake children."""
    return fake_config(tmp_path, {
        "qwen3.6-27b-balanced": {
            "model": "qwen.gguf", "aliases": ["qwen"],
            "flags": {"ctx-size": 8192, "jinja": True, "fake-load-ms": 100}},
        "qwen3-embed": {
            "model": "embed.gguf",
            "flags": {"ctx-size": 8192, "embedding": True, "fake-load-ms": 20}},
    }, **extra)


@asynccontextmanager
async def doc_swapd(tmp_path: Path, **extra: Any) -> AsyncIterator[Running]:
    config = parse_config(doc_config(tmp_path, **extra), base_dir=tmp_path)
    async with open_server(config) as running:
        yield running


def run_python(code: str) -> str:
    """Run an example in this process (in a worker thread); what it printed."""
    printed: list[str] = []

    def capture(*args: Any, sep: str = " ", end: str = "\n", **_: Any) -> None:
        printed.append(sep.join(str(a) for a in args) + end)

    exec(compile(code, "<docs/clients.md>", "exec"), {"print": capture, "__name__": "doc"})
    return "".join(printed)


async def run_example(block: Block, url: str) -> str:
    code = block.code.replace(DOC_URL, url)
    if block.lang == "python":
        return await trio.to_thread.run_sync(run_python, code)
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    with trio.fail_after(30):
        done = await trio.run_process(["bash", "-euo", "pipefail", "-c", code],
                                      capture_stdout=True, capture_stderr=True, check=False)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode()


RUNNABLE = [b for b in titled("python") + titled("sh") if b.title not in NOT_RUN]


@pytest.mark.parametrize("block", RUNNABLE, ids=[b.title for b in RUNNABLE])
async def test_every_example_in_clients_md_runs(block: Block, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    assert block.title in EXPECTED, f"add what {block.title!r} must print to EXPECTED"
    extra: dict[str, Any] = {}
    if block.title.endswith("-key"):
        monkeypatch.setenv("SWAPD_API_KEY", API_KEY)
        extra["security"] = {"api_key_env": "SWAPD_API_KEY"}
    async with doc_swapd(tmp_path, **extra) as running:
        output = await run_example(block, running.url)
        if block.title.endswith("-key"):  # and the key is what let it in
            async with httpx.AsyncClient(base_url=running.url) as client:
                assert (await client.get("/v1/models")).status_code == 401
    for text in EXPECTED[block.title]:
        assert text in output, f"{block.title}: {text!r} not in:\n{output}"


async def test_hide_progress_hides_it(tmp_path: Path) -> None:
    (fragment,) = [b for b in blocks(CLIENTS) if b.title == "hide-progress"]
    stream = next(b for b in RUNNABLE if b.title == "openai-stream")
    hidden = yaml.load(fragment.code, Loader=cfg.StrictLoader)
    async with doc_swapd(tmp_path, **hidden) as running:
        assert running.supervisor.config.progress.reasoning is False
        output = await run_example(stream, running.url)
    assert "[swapd]" not in output and "fake:qwen3.6-27b-balanced:" in output


def test_yaml_examples_are_valid_config() -> None:
    for block in blocks(CLIENTS):
        if block.lang != "yaml":
            continue
        assert block.title, "every yaml block in clients.md needs a title"
        data = yaml.load(block.code, Loader=cfg.StrictLoader)
        data.setdefault("profiles", {"a": {"model": "a.gguf"}})
        parse_config(json.dumps(data))
        assert mini_problems(config_schema(), data) == [], block.title


def test_the_openai_error_shapes_in_clients_md_are_the_sdks() -> None:
    import openai

    for name in re.findall(r"`(\w+Error)`", CLIENTS):
        assert hasattr(openai, name), name


# --- the reference pages -------------------------------------------------------------

HTTP = (DOCS / "http.md").read_text() if (DOCS / "http.md").exists() else ""
OPERATIONS = (DOCS / "operations.md").read_text() if (DOCS / "operations.md").exists() else ""
TROUBLESHOOTING = (DOCS / "troubleshooting.md").read_text() if (
    DOCS / "troubleshooting.md").exists() else ""


def doc_path(rule: str) -> str:
    """``/v1/models/<path:model_id>`` -> ``/v1/models/{model_id}``, as the docs write it."""
    return re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule)


async def test_every_route_and_status_field_is_documented(tmp_path: Path) -> None:
    async with doc_swapd(tmp_path) as running, httpx.AsyncClient(
            base_url=running.url) as client:
        rules = [rule for rule in create_app(running.frontend).url_map.iter_rules()
                 if rule.endpoint != "static"]
        status = (await client.get("/swapd/status")).json()
        metrics = (await client.get("/metrics")).text
    assert len(rules) > 20
    for rule in rules:
        path = doc_path(rule.rule)
        assert f"`{path}`" in HTTP or f" {path}`" in HTTP, f"{path} is not in docs/http.md"
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            assert re.search(rf"`{method} {re.escape(path)}(?:\?[^`]*)?`", HTTP), (method, path)
    for field in status:
        assert f"`{field}`" in OPERATIONS, f"/swapd/status field {field!r} not documented"
    for field in status["last_error"] or {}:
        assert f"`{field}`" in OPERATIONS, field
    names = set(re.findall(r"^# TYPE (\w+) ", metrics, re.M))
    names = {name for name in names if not name.endswith("_created")}
    assert len(names) > 15
    for name in sorted(names):
        assert f"`{name}" in OPERATIONS, f"metric {name} is not in docs/operations.md"


def test_every_proxied_route_is_documented() -> None:
    for route in sorted(proxy.KNOWN_ROUTES):
        assert f"`POST {route}`" in HTTP or f"`{route}`" in HTTP, route


def error_codes() -> dict[str, int | None]:
    """Every OpenAI error ``code`` swapd can answer with, and its status where fixed."""
    codes: dict[str, int | None] = {}
    for cls in _subclasses(errors.LeaseError):
        codes[cls.code] = cls.status
    code_at = {"fail": 3, "_openai_error": 3, "send_error": 4, "RequestError": 2}
    for module in ("http/fastpath.py", "http/proxy.py", "http/app.py"):
        tree = ast.parse((ROOT / "swapd" / module).read_text())
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or _name(node.func) not in code_at:
                continue
            position = code_at[_name(node.func)]
            if len(node.args) <= position:
                continue
            code = node.args[position]
            if isinstance(code, ast.Constant) and isinstance(code.value, str):
                status = next((a.value for a in node.args if isinstance(a, ast.Constant)
                               and isinstance(a.value, int)), None)
                codes.setdefault(code.value, status)
    return codes


def _name(func: ast.expr) -> str:
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def _subclasses(cls: type) -> list[type[errors.LeaseError]]:
    found = []
    for sub in cls.__subclasses__():
        found += [sub, *_subclasses(sub)]
    return found


def test_every_error_code_is_documented_with_its_status() -> None:
    codes = error_codes()
    assert {"model_not_found", "queue_full", "invalid_json", "body_too_large",
            "invalid_api_key", "model_failed", "circuit_open"} <= set(codes)
    for code, status in codes.items():
        row = re.search(rf"^\|.*`{code}`.*$", HTTP, re.M)
        assert row, f"error code {code!r} is not in docs/http.md's table"
        if status is not None:
            assert f"| {status} |" in row.group(0) or f"{status}" in row.group(0), (code, status)


def test_every_event_kind_is_documented() -> None:
    source = (ROOT / "swapd" / "core" / "supervisor.py").read_text()
    kinds = set(re.findall(r'_publish\("([a-z_]+)"', source)) | {"status"}
    assert len(kinds) > 10
    for kind in sorted(kinds):
        assert f"`{kind}`" in OPERATIONS, f"event kind {kind!r} is not in docs/operations.md"


def squash(text: str) -> str:
    return " ".join(text.split())


def test_every_start_failure_hint_is_explained() -> None:
    page = squash(TROUBLESHOOTING)
    for _needles, hint in process._DIAGNOSES:
        assert squash(hint) in page, f"hint not in docs/troubleshooting.md: {hint}"
    for cls in _subclasses(errors.LeaseError):
        assert cls.__name__ in TROUBLESHOOTING or str(cls.status) in TROUBLESHOOTING


def test_the_index_links_every_page() -> None:
    index = (DOCS / "index.md").read_text()
    linked = set(re.findall(r"\]\(([\w-]+\.md)(?:#[\w-]+)?\)", index))
    pages = {page.name for page in DOCS.glob("*.md")} - {"index.md"}
    assert pages - linked == set(), "pages missing from docs/index.md"
    assert linked - pages == set(), "docs/index.md links pages that do not exist"


def test_links_between_pages_resolve() -> None:
    for page in DOCS.glob("*.md"):
        for target, anchor in re.findall(r"\]\(([\w-]+\.md)(?:#([\w-]+))?\)",
                                         page.read_text()):
            assert (DOCS / target).exists(), f"{page.name} links {target}"
            if anchor:
                headings = re.findall(r"^#+ (.+)$", (DOCS / target).read_text(), re.M)
                slugs = {_slug(h) for h in headings}
                assert anchor in slugs, f"{page.name} links {target}#{anchor}"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")

