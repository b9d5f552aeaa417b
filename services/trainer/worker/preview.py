"""A dataset as the model will see it: records through the base's chat template, the tokens the loss
covers marked, and the token lengths of a sample against a job's max length.

The tokens come from `ChatFormatter`, the code a worker tokenizes with, so a preview shows what
training would learn from, and refuses what training would refuse. Loading a tokenizer imports
transformers and torch, which the trainer server never does: it runs this module as a helper
process (`services.trainer.previewer`) that answers one JSON request per line on stdin, keeping
the tokenizers it loaded for the next preview.

    python -m services.trainer.worker.preview   # then {"base": ..., "records": [...], ...} per line
"""

from __future__ import annotations

import json
import statistics
import sys
from functools import lru_cache

from services.trainer.data.records import to_example
from services.trainer.worker.training.formatting import IGNORE, ChatFormatter, FormattingError
from tunedock.errors import InvalidArgument

HISTOGRAM_BINS = 20
SHOWN_REFUSALS = 20


@lru_cache(maxsize=4)
def formatter_for(base_dir: str) -> ChatFormatter:
    from transformers import AutoTokenizer

    return ChatFormatter(AutoTokenizer.from_pretrained(base_dir))


def preview(records: list[tuple[str, object]], fmt: str, base_dir: str, max_length: int, show: int) -> dict:
    """The first `show` records as token spans (trained or not), and the token lengths of all of `records`."""
    formatter = formatter_for(base_dir)
    shown: list[dict] = []
    lengths: list[int] = []
    trained: list[int] = []
    refused: list[dict] = []
    for index, (where, record) in enumerate(records):
        try:
            tokenized = formatter(to_example(record, fmt, where), max_length)
        except (FormattingError, InvalidArgument) as exc:
            refused.append({"index": index, "where": where, "error": str(exc)})
            continue
        lengths.append(tokenized.full_length)
        trained.append(tokenized.loss_tokens)
        if len(shown) < show:
            shown.append(
                {
                    "index": index,
                    "where": where,
                    "tokens": tokenized.full_length,
                    "trained_tokens": tokenized.loss_tokens,
                    "truncated": tokenized.full_length > max_length,
                    "spans": spans(formatter.tokenizer, tokenized.input_ids, tokenized.labels),
                }
            )
    return {
        "records": shown,
        "refused": refused[:SHOWN_REFUSALS],
        "refused_count": len(refused),
        "lengths": length_summary(lengths, trained, max_length),
    }


def spans(tokenizer, ids: list[int], labels: list[int]) -> list[dict]:
    """Runs of tokens with the same loss flag, decoded: what the template added, and what the model learns."""
    out: list[dict] = []
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or (labels[i] != IGNORE) != (labels[start] != IGNORE):
            trained = labels[start] != IGNORE
            out.append({"text": tokenizer.decode(ids[start:i]), "trained": trained, "tokens": i - start})
            start = i
    return out


def length_summary(lengths: list[int], trained: list[int], max_length: int) -> dict:
    """Token lengths: quantiles, how many records a job at max_length would cut, and a histogram."""
    if not lengths:
        return {"sampled": 0, "truncated": 0, "histogram": {"edges": [], "counts": []}}
    top = max(max(lengths), max_length)
    width = max(1, -(-top // HISTOGRAM_BINS))
    counts = [0] * HISTOGRAM_BINS
    for n in lengths:
        counts[min(n // width, HISTOGRAM_BINS - 1)] += 1
    ordered = sorted(lengths)
    return {
        "sampled": len(lengths),
        "truncated": sum(1 for n in lengths if n > max_length),
        "min": ordered[0],
        "p50": int(statistics.median(ordered)),
        "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
        "max": ordered[-1],
        "trained_tokens_mean": round(sum(trained) / len(trained), 1),
        "histogram": {"edges": [i * width for i in range(HISTOGRAM_BINS + 1)], "counts": counts},
    }


def main() -> None:
    """Answer preview requests, one JSON object per line each way, until stdin closes."""
    answers, sys.stdout = sys.stdout, sys.stderr  # whatever a library prints must not break the protocol
    for line in sys.stdin:
        try:
            request = json.loads(line)
            answer = preview(
                [tuple(r) for r in request["records"]],
                request["format"],
                request["base"],
                int(request["max_length"]),
                int(request["show"]),
            )
        except Exception as exc:  # the server turns it into a status; this process goes on serving
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        answers.write(json.dumps(answer) + "\n")
        answers.flush()


if __name__ == "__main__":
    main()
