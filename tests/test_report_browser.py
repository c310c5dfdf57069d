"""report.html in a real browser: it loads without errors, fetches nothing, and shows its plots.

Needs Debian's chromium (``apt-get install -y chromium``); skipped only when it is absent.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cdp import CHROMIUM, load_page
from tests.fake_run import make_run
from tunepilot.report import build_report


@pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium not installed")
def test_report_renders_in_headless_chromium(tmp_path: Path):
    run = make_run(tmp_path / "run", tmp_path / "no-model", weights=False)
    report = build_report(run)
    page = load_page(report.resolve().as_uri(), tmp_path / "profile")
    assert page["errors"] == []
    assert page["title"].startswith("run")
    assert len(page["images"]) >= 6
    assert all(complete and width > 0 for complete, width in page["images"]), page["images"]
    # the page itself and its data: URIs, nothing else
    assert all(u.startswith(("file:", "data:")) for u in page["requests"]), page["requests"]
