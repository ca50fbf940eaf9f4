"""The Prefect UI as a person uses it: headless Chromium opens the build deployment, starts a custom run
with a parameter changed in the form, and the run completes on a real worker.

Chromium is Debian's ``chromium`` package (installed by :func:`tests.support.prefect_server.ensure_chromium`
when missing), driven by playwright against /usr/bin/chromium; the server and deployments are the session's
shared stack (see ``tests/test_prefect_server.py``).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from realfake.data.card import verify_version
from realfake.data.storage import version_store
from tests.support.prefect_server import (
    close_shared_stack,
    deployment,
    ensure_chromium,
    miniature_params,
    shared_stack,
    write_tiny_models,
)

pytestmark = [pytest.mark.slow, pytest.mark.prefect_server, pytest.mark.browser]

LAUNCH_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update"]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    executable = ensure_chromium()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, args=LAUNCH_FLAGS)
        yield b
        b.close()


def test_custom_run_from_the_deployment_form_completes(browser, tmp_path_factory, request):
    stack = shared_stack(tmp_path_factory.mktemp("prefect"))
    request.session.addfinalizer(close_shared_stack)
    root = tmp_path_factory.mktemp("ui-datasets")
    models = write_tiny_models(tmp_path_factory.mktemp("models") / "tiny-sd")
    build = deployment(stack, "build")
    # The team's defaults for this deployment: the miniature config (a person then changes one field).
    stack.api("PATCH", f"/deployments/{build['id']}",
              {"parameters": {"params": miniature_params(root, models, "ui-default", measure=False)}})
    worker = stack.start_worker("realfake-process", "ui", queue="default", limit=1)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    failed: list[str] = []  # API requests the server answered with 5xx, as the page saw them
    page.context.on("response", lambda r: failed.append(f"{r.status} {r.request.method} {r.url}")
                    if r.status >= 500 and "/api/" in r.url else None)
    try:
        page.goto(f"{stack.ui_url}/deployments", wait_until="networkidle")
        page.get_by_role("link", name="build", exact=True).first.click()
        page.wait_for_url(f"**/deployments/deployment/{build['id']}**")
        run_button = page.get_by_role("button", name="Run", exact=True)
        run_button.wait_for(timeout=30_000)  # the deployment page has rendered
        run_button.click()
        page.get_by_text("Custom run", exact=True).click()
        page.wait_for_url(re.compile(r"/deployment/[0-9a-f-]+/run(\?|$)"))

        label = page.get_by_text("Version (Optional)", exact=True)
        label.wait_for()
        prop = label.locator("xpath=ancestor::*[contains(concat(' ', normalize-space(@class), ' '),"
                             " ' schema-form-property ')][1]")
        field = prop.locator("textarea, input[type=text]").first
        assert field.input_value() == "ui-default"  # the form shows the deployment's defaults
        field.fill("ui-run")
        page.screenshot(path=str(tmp_path_factory.getbasetemp() / "ui-form.png"), full_page=True)
        # The UI creates the run (then returns to the deployment page): wait for the run itself through the API,
        # not for the page to navigate, which a loaded 2-core machine can render later than a browser timeout.
        # The test server keeps its state in SQLite, which under load answers some requests 503 ("busy, retry");
        # Prefect's Python client retries those, the UI shows "Something went wrong" and stays on the form. A
        # person then submits again: so does this test, only after a 5xx and while no run exists (3 tries at most).
        submits, created = 0, []
        while not created and submits < 3:
            errors_before, error_at = len(failed), None
            page.get_by_role("button", name="Submit").click()
            submits += 1
            deadline = time.monotonic() + 90
            while not created and time.monotonic() < deadline:
                runs = stack.api("POST", "/flow_runs/filter", {"deployments": {"id": {"any_": [build["id"]]}}})
                created = [r for r in runs if r["parameters"]["params"].get("version") == "ui-run"]  # the change
                if not created and len(failed) > errors_before:
                    error_at = error_at or time.monotonic()
                    if time.monotonic() - error_at > 5:  # the page's requests have had their answers: submit again
                        break
                page.wait_for_timeout(500)  # (sync playwright hands over the page's events only inside its calls)
            if not created and error_at is None:
                break  # no server error: a form that does not submit is the failure to report
        if not created:
            page.screenshot(path=str(tmp_path_factory.getbasetemp() / "ui-after-submit.png"), full_page=True)
        assert len(created) == 1, (f"the form created {len(created)} run(s) after {submits} submit(s); the page is "
                                   f"at {page.url}; server errors the page met: {failed}")
        print(f"\nUI: {submits} submit(s); server errors the page met: {failed}")
        run_id = created[0]["id"]
        stack.wait_flow_run(run_id, timeout=300)
        assert worker.ran(run_id)
        assert verify_version(version_store(str(root), "mini", "ui-run")) == []
        assert not Path(root, "mini", "ui-default").exists()

        # The run page shows the final state once the UI polls it.
        deadline = time.monotonic() + 30
        page.goto(f"{stack.ui_url}/runs/flow-run/{run_id}", wait_until="networkidle")
        while time.monotonic() < deadline and not page.get_by_text("Completed").first.is_visible():
            time.sleep(1)
            page.reload(wait_until="networkidle")
        assert page.get_by_text("Completed").first.is_visible()
    finally:
        page.close()
        stack.stop_worker(worker)
