"""Dataset previews and memory plans: the records as the base sees them, and each method's peak memory.

The unit tests drive the helper process and the stored-record reader alone; the HTTP tests go
through the session's fine-tuning stack (`/v1/files/{id}/preview`, `/v1/fine_tuning/plan`, what the
console calls), with the rendering checked against the tokenizer's own chat template.
"""

from __future__ import annotations

import json

import httpx
import pytest

from services.trainer.data.stored import stored_records
from services.trainer.previewer import Previewer
from services.trainer.worker.preview import length_summary
from tests.trainer.conftest import memorization_jsonl
from tunedock.errors import FailedPrecondition

PIRATE = [json.loads(line) for line in memorization_jsonl().decode().splitlines()]


def template_ids(tokenizer, record: dict) -> list[int]:
    """The record rendered by the tokenizer's own chat template, then tokenized (with the tokenizer's BOS)."""
    chat = [{"role": "user", "content": record["instruction"]}, {"role": "assistant", "content": record["output"]}]
    return tokenizer(tokenizer.apply_chat_template(chat, tokenize=False), add_special_tokens=True)["input_ids"]


def test_stored_records_read_jsonl_and_json_arrays_lazily_across_chunk_edges():
    lines = b'\xef\xbb\xbf{"a": 1}\n\n{"a": 2}\n'
    assert list(stored_records([lines[:5], lines[5:11], lines[11:]])) == [("line 1", {"a": 1}), ("line 3", {"a": 2})]
    array = json.dumps([{"n": i} for i in range(1000)]).encode()
    read = stored_records(array[i : i + 7] for i in range(0, len(array), 7))
    assert next(read) == ("record 0", {"n": 0}) and next(read) == ("record 1", {"n": 1})


def test_length_summary_counts_what_a_job_would_cut_and_bins_every_record():
    summary = length_summary([10, 20, 30, 600], [1, 2, 3, 4], max_length=512)
    assert summary["truncated"] == 1 and summary["sampled"] == 4 and summary["max"] == 600
    assert sum(summary["histogram"]["counts"]) == 4 and summary["histogram"]["edges"][-1] >= 600
    assert length_summary([], [], 512)["sampled"] == 0


def test_the_helper_marks_the_trained_tokens_and_keeps_its_tokenizer(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    previewer = Previewer()
    try:
        records = [(f"line {i + 1}", r) for i, r in enumerate(PIRATE)]
        request = {"records": records, "format": "alpaca", "base": str(tiny_model_dir), "show": 2}
        answer = previewer.preview(request | {"max_length": 512})
        first = answer["records"][0]
        # The spans put together are the chat template's rendering of the record, token for token.
        ids = template_ids(tokenizer, PIRATE[0])
        assert "".join(s["text"] for s in first["spans"]) == tokenizer.decode(ids)
        assert sum(s["tokens"] for s in first["spans"]) == first["tokens"] == len(ids)
        trained = "".join(s["text"] for s in first["spans"] if s["trained"])
        assert PIRATE[0]["output"] in trained and PIRATE[0]["instruction"] not in trained
        assert answer["lengths"]["truncated"] == 0 and answer["lengths"]["sampled"] == len(PIRATE)
        process = previewer._child
        cut = previewer.preview(request | {"max_length": 20})  # the same helper answers, its tokenizer kept
        assert previewer._child is process
        assert cut["lengths"]["truncated"] == len(PIRATE) and cut["records"][0]["truncated"]
        assert sum(s["tokens"] for s in cut["records"][0]["spans"]) == 20
        # A record training would refuse is listed with its position; the others still preview.
        mixed = previewer.preview(
            request | {"records": [["line 1", {"nothing": "useful"}], *records], "max_length": 64}
        )
        assert mixed["refused_count"] == 1 and mixed["refused"][0]["where"] == "line 1"
        assert mixed["lengths"]["sampled"] == len(PIRATE)
        with pytest.raises(FailedPrecondition, match="dataset preview"):
            previewer.preview(request | {"base": str(tmp_path), "max_length": 64})
        assert previewer.running  # a bad request does not cost the helper
    finally:
        previewer.close()
    assert not previewer.running


# ------------------------------------------------------------------------------------ over HTTP


@pytest.fixture(scope="module")
def http(fine_tuning_stack):
    def get(path: str, user: str = "alice", **params):
        token = fine_tuning_stack.user_tokens[user]
        return httpx.get(
            f"{fine_tuning_stack.base_url}{path}",
            params=params,
            headers={"Authorization": f"Bearer {token}"},
            timeout=300,
        )

    return get


@pytest.mark.vllm
@pytest.mark.slow
def test_a_file_previews_through_the_default_base_and_only_for_its_project(http, training_file, tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    file, _ = training_file
    answer = http(f"/files/{file.id}/preview", max_length=24, records=3)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["num_records"] == 8 and len(body["records"]) == 3 and body["max_length"] == 24
    lengths = [len(template_ids(tokenizer, r)) for r in PIRATE]
    assert body["lengths"]["sampled"] == 8 and body["lengths"]["max"] == max(lengths)
    assert body["lengths"]["truncated"] == sum(n > 24 for n in lengths)
    whole = http(f"/files/{file.id}/preview").json()  # max length 512: nothing cut, every answer trained
    assert whole["lengths"]["truncated"] == 0
    assert all(any(s["trained"] for s in r["spans"]) for r in whole["records"])
    assert http(f"/files/{file.id}/preview", user="bob").status_code == 404
    bad = http(f"/files/{file.id}/preview", max_length="lots")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_length"
    assert http(f"/files/{file.id}/preview", max_length=8).status_code == 400


@pytest.mark.vllm
@pytest.mark.slow
def test_the_plan_orders_the_methods_by_memory_and_follows_the_knobs(http):
    small = http("/fine_tuning/plan", batch_size=2, max_seq_length=128, r=4)
    assert small.status_code == 200, small.text
    peaks = {m["method"]: m["peak_bytes"] for m in small.json()["methods"]}
    trainable = {m["method"]: m["trainable_params"] for m in small.json()["methods"]}
    assert set(peaks) == {"full", "freeze", "lora", "qlora"} and small.json()["device"] == "cpu"
    assert trainable["lora"] == trainable["qlora"] < trainable["freeze"] < trainable["full"]
    assert peaks["lora"] < peaks["full"]
    doubled = {m["method"]: m["trainable_params"] for m in http("/fine_tuning/plan", r=8).json()["methods"]}
    assert doubled["lora"] == 2 * trainable["lora"]

    def activations(answer) -> int:
        return next(m["parts"]["activations"] for m in answer.json()["methods"] if m["method"] == "lora")

    assert activations(http("/fine_tuning/plan", batch_size=2, max_seq_length=512, r=4)) > activations(small)
    refused = http("/fine_tuning/plan", device="tpu")
    assert refused.status_code == 400 and "cpu or cuda" in refused.json()["error"]["message"]
