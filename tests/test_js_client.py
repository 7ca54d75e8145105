"""The JavaScript package `clients/js`: its own tests (node's test runner against a real
`collab serve` each test file starts), run from here so that the suite's one command runs them.
"""

from __future__ import annotations

import os
import subprocess
import sys

import httpx

from collab.app import STATIC, create_app
from collab.settings import Settings
from tests.jstools import JS, require_js_tools


def test_the_package_tests_pass_against_a_real_server() -> None:
    node = require_js_tools()
    env = {k: v for k, v in os.environ.items() if not k.startswith("COLLAB_")}
    env["COLLAB_PYTHON"] = sys.executable  # the servers the tests start run this Python
    done = subprocess.run(
        [node, "--test", "test/"],
        cwd=JS,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert "# fail 0" in done.stdout


def test_the_server_serves_the_package_file() -> None:
    """`/static/collab.js` is the package's `collab.js`, byte for byte (a copy, because a
    Python wheel and an npm package each need the file inside themselves)."""
    package = (JS / "collab.js").read_bytes()
    assert (STATIC / "collab.js").read_bytes() == package, (
        "collab/static/collab.js differs from clients/js/collab.js: copy the package's file"
    )


async def test_collab_js_is_served_at_static() -> None:
    app = create_app(
        Settings(env="test", database_url="sqlite+aiosqlite:///:memory:", secret_key="j" * 40)
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        response = await http.get("/static/collab.js")
    assert response.status_code == 200
    assert response.content == (JS / "collab.js").read_bytes()
