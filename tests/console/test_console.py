"""The web console in a real browser (Debian's chromium through Playwright) against the real stack.

Registry, trainer (real workers) and inference (the session's vLLM engine) with authentication on;
the console is served by inference's HTTP port and calls the same OpenAI-compatible API on its
origin (the trainer's paths forwarded, as `tunedock up` arranges). One browser for the module.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from urllib.parse import urlsplit

import openai
import pytest

from tests.support.fine_tuning import openai_client
from tests.trainer.conftest import memorization_jsonl
from tunedock.client import RegistryClient

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


SHOTS = os.environ.get("TUNEDOCK_CONSOLE_SHOTS", "")
"""A folder for full-page screenshots of the pages the tests reach (to look at them); empty: none."""


def shot(page, name: str) -> None:
    if SHOTS:
        page.screenshot(path=os.path.join(SHOTS, f"{name}.png"), full_page=True)


@pytest.fixture(scope="module")
def stack(fine_tuning_stack):
    return fine_tuning_stack


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
    assert alice.text_content("[data-testid=ignored]") == "no column ignored"
    assert alice.get_attribute("[data-testid=progress]", "value") == "100"
    alice.wait_for_selector("[data-testid=files] >> text=pirate.jsonl")


def test_a_dataset_previews_as_the_model_will_see_it(alice):
    """The upload above, through the default base's chat template: the trained tokens highlighted, the
    token histogram, and how many records a job's max length would cut."""
    alice.click("text=Datasets")
    alice.click("[data-testid=files] tr.link >> text=pirate.jsonl")
    alice.wait_for_selector("[data-testid=preview-record]", timeout=120_000)  # the first loads the tokenizer
    records = alice.query_selector_all("[data-testid=preview-record]")
    assert len(records) == 3
    trained = " ".join(m.text_content() for m in records[0].query_selector_all("mark"))
    context = " ".join(s.text_content() for s in records[0].query_selector_all("pre span"))
    assert "Arr, ship 0 be mine!" in trained and "What does the pirate say" not in trained
    assert "What does the pirate say about ship 0?" in context
    assert "Of all 8 records, 0 would be cut at 512 tokens" in alice.text_content("[data-testid=truncation]")
    assert alice.get_attribute("[data-testid=histogram]", "data-bins") == "20"
    alice.wait_for_selector("[data-testid=histogram] canvas")
    shot(alice, "dataset-preview")
    alice.fill("#max_length", "20")
    alice.click("[data-testid=preview-apply]")
    alice.wait_for_selector("[data-testid=truncation]:has-text('cut at 20 tokens')")
    assert "8 would be cut at 20 tokens" in alice.text_content("[data-testid=truncation]")
    assert "cut at 20" in alice.text_content("[data-testid=preview-record]")


def test_the_new_job_form_shows_the_memory_plan_as_the_knobs_change(alice):
    alice.click("text=New job")
    plan = "document.querySelector('[data-testid=plan]')?"
    alice.wait_for_function(f"{plan}.dataset.method === 'lora'", timeout=120_000)  # the first measures the runtime
    assert "LoRA: about" in alice.text_content("[data-testid=plan-chosen]")
    lora = int(alice.get_attribute("[data-testid=plan]", "data-peak"))
    alice.click(".method[data-method=full]")
    alice.wait_for_function(f"{plan}.dataset.method === 'full'")
    full = int(alice.get_attribute("[data-testid=plan]", "data-peak"))
    assert full > lora  # Full trains every weight
    alice.fill("#batch_size", "16")
    alice.wait_for_function(f"Number({plan}.dataset.peak) > {full}")  # more activations
    assert alice.query_selector("[data-testid=plan] tr.chosen[data-plan=full]") is not None
    shot(alice, "new-job")


def test_a_job_from_the_form_shows_live_curves_and_serves_at_once(alice):
    alice.click("text=New job")
    alice.click(".method[data-method=qlora]")
    assert "LoRA adapter" in alice.text_content("[data-testid=publishes]")
    alice.click(".method[data-method=freeze]")
    assert "extracts the LoRA adapter" in alice.text_content("[data-testid=publishes]")
    alice.click(".method[data-method=lora]")
    alice.fill("#suffix", "console-pirate")
    alice.fill("#max_steps", "12")
    alice.fill("#r", "4")
    alice.fill("#lr_multiplier", "25")  # learns the pirate's answers: the playground tells it from the base
    alice.click("[data-testid=submit]")
    alice.wait_for_selector("[data-testid=status]:text('succeeded')", timeout=300_000)
    alice.wait_for_selector("[data-testid=fine-tuned-model]")
    assert alice.text_content("[data-testid=fine-tuned-model]") == "console-pirate:1"
    assert alice.get_attribute("[data-testid='chart-loss']", "data-points") == "12"
    assert alice.get_attribute("[data-testid='chart-tokens/s']", "data-points") == "12"
    alice.wait_for_selector("[data-testid='chart-loss'] canvas")
    assert "Step 12/12: training loss=" in alice.text_content("[data-testid=events]")
    shot(alice, "job")
    alice.click("text=Jobs")
    alice.wait_for_selector("[data-testid=jobs] >> text=console-pirate:1")
    alice.click("text=Models")
    alice.wait_for_selector("[data-testid=models] >> text=console-pirate:1")


def test_a_running_jobs_curve_gains_points_and_the_page_cancels_it(alice, stack, training_file):
    with openai_client(stack) as api:
        method = {"type": "lora", "lora": {"hyperparameters": {"max_steps": 3000, "batch_size": 1}}}
        job = api.fine_tuning.jobs.create(model="auto", training_file=training_file[0].id, method=method)
    alice.goto(f"{stack.origin}/console/#/jobs/{job.id}")
    points = "document.querySelector(\"[data-testid='chart-loss']\")?.dataset.points"
    alice.wait_for_function(f"Number({points}) >= 1", timeout=120_000)
    first = int(alice.evaluate(points))
    alice.wait_for_function(f"Number({points}) > {first}", timeout=60_000)  # redrawn as events arrive
    assert alice.text_content("[data-testid=status]") == "running"
    alice.once("dialog", lambda dialog: dialog.accept())
    alice.click("[data-testid=cancel]")
    alice.wait_for_selector("[data-testid=status]:text('cancelled')")


def test_the_playground_asks_base_and_adapters_side_by_side(alice, stack, four_methods):
    alice.click("text=Playground")
    alice.select_option("[data-testid=model-1]", "console-pirate:1")
    alice.select_option("[data-testid=model-2]", four_methods[0]["qlora"].fine_tuned_model)
    alice.click("[data-testid=run]")
    for pane in range(3):
        alice.wait_for_selector(f"[data-testid=answer-{pane}][data-done=true]")
    answers = [alice.text_content(f"[data-testid=answer-{pane}]") for pane in range(3)]
    assert all(answers) and answers[1] != answers[0], answers  # the tuned adapter answers otherwise
    shot(alice, "playground")
    alice.click("[data-testid=copy-curl]")
    snippet = alice.text_content("[data-testid=copy-as]")
    assert f"{stack.origin}/v1/chat/completions" in snippet and '"model":"console-pirate:1"' in snippet
    alice.click("[data-testid=copy-openai-python]")
    assert 'model="console-pirate:1"' in alice.text_content("[data-testid=copy-as]")

    # Chat mode keeps a conversation per pane: the second question goes with each model's own first answer.
    alice.fill("#system", "You are a pirate.")
    alice.fill("#prompt", "And ship 5?")
    alice.click("[data-testid=run]")
    for pane in range(3):
        alice.wait_for_selector(f"[data-testid=answer-{pane}][data-done=true]")
    assert "What does the pirate say about ship 3?" in alice.text_content("[data-testid=turns-1]")
    assert answers[1] in alice.text_content("[data-testid=turns-1]")
    alice.click("[data-testid=copy-curl]")
    sent = json.loads(alice.text_content("[data-testid=copy-as]").split("-d '", 1)[1].rsplit("'", 1)[0])
    assert [m["role"] for m in sent["messages"]] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert sent["messages"][2]["content"] == answers[1]

    # Prompt mode sends raw text to /v1/completions.
    alice.select_option("[data-testid=mode]", "prompt")
    alice.fill("#prompt", "Once upon a time")
    alice.click("[data-testid=run]")
    alice.wait_for_selector("[data-testid=answer-0][data-done=true]")
    assert alice.text_content("[data-testid=answer-0]") and not alice.text_content("[data-testid=turns-0]")
    alice.click("[data-testid=copy-curl]")
    assert f"{stack.origin}/v1/completions" in alice.text_content("[data-testid=copy-as]")

    alice.click("text=Serving")
    alice.wait_for_selector("[data-testid=loaded] >> text=console-pirate:1")  # loaded by the playground's request
    assert "LoRA slots" in alice.text_content("[data-testid=replica]")
    throughput = alice.text_content("[data-testid=throughput]")  # the playground's tokens, within the minute
    assert float(throughput.split("Throughput ")[1].split(" tokens/s")[0]) >= 0
    assert float(throughput.split(", ")[1].split(" over 60 s")[0]) > 0, throughput


def test_every_page_loads_quickly(alice, stack, capsys):
    """Prints how long each page takes to show its content on the tiny stack (not asserted: machines vary)."""
    pages = {
        "jobs": "[data-testid=jobs]",
        "new": "[data-testid=submit]",
        "compare": "[data-testid=compare]",
        "datasets": "[data-testid=files]",
        "models": "[data-testid=models]",
        "registry": "[data-testid=artifacts]",
        "playground": "[data-testid=run]",
        "serving": "[data-testid=loaded]",
    }
    took = {}
    for page, ready in pages.items():
        alice.goto("about:blank")
        started = time.perf_counter()
        alice.goto(f"{stack.origin}/console/#/{page}")
        alice.wait_for_selector(ready)
        took[page] = time.perf_counter() - started
        if page not in ("compare", "registry", "playground"):  # shot where their tests filled them
            shot(alice, page)
    with capsys.disabled():  # in the run's output, not only on failure
        print("\nconsole page load, s:", {k: round(v, 3) for k, v in took.items()})
    assert set(took) == set(pages)


def test_compare_shows_the_four_methods_side_by_side_and_runs_them(alice, four_methods, stack):
    done, _ = four_methods
    alice.click("text=Compare")
    alice.wait_for_selector("[data-testid=compare] tr[data-method=qlora]")
    table = alice.text_content("[data-testid=compare]")
    for method in ("full", "freeze", "lora", "qlora"):
        assert alice.is_visible(f"[data-testid=compare] tr[data-method={method}]"), method
    assert done["full"].fine_tuned_model in table and "% agreement" in table
    assert "Least memory:" in alice.text_content("[data-testid=recommendation]")
    shot(alice, "compare")
    assert alice.get_attribute("[data-testid='bars-tensor memory']", "data-bars") == "4"
    assert alice.get_attribute("[data-testid='bars-artifact size']", "data-bars") == "4"  # sizes from the registry
    full = alice.text_content("[data-testid=compare] tr[data-method=full] [data-testid=artifact-size]")
    lora = alice.text_content("[data-testid=compare] tr[data-method=lora] [data-testid=artifact-size]")
    assert full.endswith("MiB") and lora.endswith(("KiB", "MiB")) and full != lora
    alice.wait_for_selector("[data-testid='bars-tensor memory'] canvas")  # drawn by uPlot
    # The button starts the four methods on a file (with 1 step each here; they are cancelled at once).
    alice.fill("#steps", "1")
    alice.fill("#prefix", "console-four")
    alice.click("[data-testid=run-four]")
    with openai_client(stack) as api:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the page creates them one after the other
            listed = api.fine_tuning.jobs.list(limit=100).data
            started = [j for j in listed if j.user_provided_suffix.startswith("console-four-")]
            if len(started) == 4:
                break
            time.sleep(0.3)
        methods = sorted(j.model_extra["tunedock"]["method"] for j in started)
        assert methods == ["freeze", "full", "lora", "qlora"], alice.text_content("main")[:600]
        alice.wait_for_function(
            "ids => ids.every(id => document.querySelector(`[data-testid=compare] a[href='#/jobs/${id}']`))",
            arg=sorted(j.id for j in started),
        )
        for job in started:  # not needed further: free the worker slots
            with contextlib.suppress(openai.BadRequestError):  # one that ended meanwhile
                api.fine_tuning.jobs.cancel(job.id)


def test_the_registry_draws_lineage_and_only_an_admin_moves_an_alias(browser, stack, alice, four_methods):
    done, _ = four_methods
    full = done["full"]  # pirate-full:1, extracted into pirate-full-lora:1
    alice.click("text=Registry")
    alice.click("[data-testid=artifacts] tr[data-artifact=pirate-full]")
    alice.wait_for_selector("[data-testid=lineage-1]")
    lineage = alice.text_content("[data-testid=lineage-1]")
    shot(alice, "registry")
    assert full.id in lineage and full.training_file in lineage and "pirate-full-lora:1 (extracted adapter" in lineage
    alice.on("dialog", lambda dialog: dialog.accept())
    alice.fill("[data-testid=new-alias]", "prod")
    alice.click("[data-testid=move-new]")
    alice.wait_for_selector("[data-testid=alias-message] .error")
    assert "registry.admin" in alice.text_content("[data-testid=alias-message]")
    carol = signed_in(browser, stack, "carol")
    carol.on("dialog", lambda dialog: dialog.accept())
    carol.goto(stack.origin + "/console/#/registry/pirate-full")
    carol.wait_for_selector("[data-testid=new-alias]")
    carol.fill("[data-testid=new-alias]", "prod")
    carol.click("[data-testid=move-new]")
    carol.wait_for_selector("[data-testid=alias-message] >> text=pirate-full@prod → version 1")
    carol.wait_for_selector("[data-testid=aliases] select[data-alias=prod]")
    carol.context.close()
    with RegistryClient(stack.registry.address, token=stack.user_tokens["carol"]) as registry:
        assert registry.get("pirate-full@prod").version == 1


def test_another_project_sees_none_of_it_and_nothing_leaves_the_stack(browser, stack, alice):
    bob = signed_in(browser, stack, "bob")
    assert "console-pirate" not in bob.text_content("[data-testid=jobs]")
    bob.click("text=Datasets")
    bob.wait_for_selector("[data-testid=files]")
    assert "pirate.jsonl" not in bob.text_content("[data-testid=files]")
    bob.click("text=Serving")
    bob.wait_for_selector("[data-testid=loaded]")
    assert "console-pirate" not in bob.text_content("[data-testid=loaded]")  # another tenant's adapter stays out
    bob.context.close()
    origins = {urlsplit(url).netloc for url in alice.requests}
    assert origins == {urlsplit(stack.origin).netloc}  # assets shipped in the package: no CDN
