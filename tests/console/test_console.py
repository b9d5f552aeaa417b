"""The web console in a real browser (Debian's chromium through Playwright) against the real stack.

Registry, trainer (real workers) and inference (the session's vLLM engine) with authentication on;
the console is served by inference's HTTP port and calls the same OpenAI-compatible API on its
origin (the trainer's paths forwarded, as `tunedock up` arranges). One browser for the module.
"""

from __future__ import annotations

import shutil
from urllib.parse import urlsplit

import pytest

from tests.common.secured import SecuredServices
from tests.trainer.conftest import memorization_jsonl

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
ROLES = ["trainer.submit", "trainer.read", "registry.read", "inference.generate"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_model_dir, inference_stack):
    users = {"alice": (ROLES, ["team-a"]), "bob": (ROLES, ["team-b"])}
    services = SecuredServices(
        tmp_path_factory.mktemp("console"), tiny_model_dir, inference_stack, users, trainer_http=True, http_port=0
    )
    services.origin = f"http://127.0.0.1:{services.inference.server.http_port}"
    yield services
    services.stop()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    assert chromium, "the console tests need Debian's chromium (.ci/run installs it: apt-get install chromium)"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        yield browser
        browser.close()


def signed_in(browser, stack, user: str):
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.requests = []
    page.on("request", lambda r: page.requests.append(r.url))
    page.goto(stack.origin + "/")
    page.fill("#token", stack.user_tokens[user])
    page.click("button[type=submit]")
    page.wait_for_selector("[data-testid=jobs]")
    return page


@pytest.fixture(scope="module")
def alice(browser, stack):
    page = signed_in(browser, stack, "alice")
    yield page
    page.context.close()


def test_sign_in_refuses_a_token_it_does_not_know(browser, stack):
    page = browser.new_page()
    page.goto(stack.origin + "/console/")
    page.fill("#token", "td-not-a-token")
    page.click("button[type=submit]")
    assert "unknown, revoked or expired" in page.text_content("[data-testid=error]")
    assert page.is_hidden("#nav")
    page.close()


def test_an_upload_shows_the_validation_report_or_the_line_at_fault(alice, tmp_path):
    good, bad = tmp_path / "pirate.jsonl", tmp_path / "broken.jsonl"
    good.write_bytes(memorization_jsonl())
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n')
    alice.click("text=Datasets")
    alice.set_input_files("[data-testid=file-input]", str(bad))
    alice.wait_for_selector("[data-testid=report] .error")
    assert "line 2" in alice.text_content("[data-testid=report]")
    alice.set_input_files("[data-testid=file-input]", str(good))
    alice.wait_for_selector("[data-testid=report] .card")
    assert "8 records, alpaca format" in alice.text_content("[data-testid=report]")
    assert alice.get_attribute("[data-testid=progress]", "value") == "100"
    alice.wait_for_selector("[data-testid=files] >> text=pirate.jsonl")


def test_a_job_from_the_form_shows_live_curves_and_serves_at_once(alice):
    alice.click("text=New job")
    alice.click(".method[data-method=qlora]")
    assert "LoRA adapter" in alice.text_content("[data-testid=publishes]")
    alice.click(".method[data-method=freeze]")
    assert "extracts the LoRA adapter" in alice.text_content("[data-testid=publishes]")
    alice.click(".method[data-method=lora]")
    alice.fill("#suffix", "console-pirate")
    alice.fill("#max_steps", "3")
    alice.fill("#r", "4")
    alice.click("[data-testid=submit]")
    alice.wait_for_selector("[data-testid=status]:text('succeeded')", timeout=300_000)
    alice.wait_for_selector("[data-testid=fine-tuned-model]")
    assert alice.text_content("[data-testid=fine-tuned-model]") == "console-pirate:1"
    assert alice.get_attribute("[data-testid='chart-loss']", "data-points") == "3"
    assert alice.get_attribute("[data-testid='chart-tokens/s']", "data-points") == "3"
    assert "Step 3/3: training loss=" in alice.text_content("[data-testid=events]")
    alice.click("text=Jobs")
    alice.wait_for_selector("[data-testid=jobs] >> text=console-pirate:1")
    alice.click("text=Models")
    alice.wait_for_selector("[data-testid=models] >> text=console-pirate:1")


def test_the_playground_asks_base_and_adapter_side_by_side(alice):
    alice.click("text=Playground")
    alice.select_option("#right", "console-pirate:1")
    alice.click("[data-testid=run]")
    alice.wait_for_selector("[data-testid=answer-left][data-done=true]")
    alice.wait_for_selector("[data-testid=answer-right][data-done=true]")
    assert alice.text_content("[data-testid=answer-left]") and alice.text_content("[data-testid=answer-right]")


def test_another_project_sees_none_of_it_and_nothing_leaves_the_stack(browser, stack, alice):
    bob = signed_in(browser, stack, "bob")
    assert "console-pirate" not in bob.text_content("[data-testid=jobs]")
    bob.click("text=Datasets")
    bob.wait_for_selector("[data-testid=files]")
    assert "pirate.jsonl" not in bob.text_content("[data-testid=files]")
    bob.context.close()
    origins = {urlsplit(url).netloc for url in alice.requests}
    assert origins == {urlsplit(stack.origin).netloc}  # assets shipped in the package: no CDN
