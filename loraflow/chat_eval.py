"""Generation evaluation of a chat model: answer each held-out conversation's last assistant turn.

The adapter and the bare base model are asked the same prompts (the conversation up to its last
assistant turn, rendered with the run's chat template and its generation prompt), greedily, and
scored against the reference answer by exact match and ROUGE-L (Google's `rouge-score` package,
offline). Perplexity and eval_loss come from the test shards as for any causal LM.
"""

from __future__ import annotations

from pydantic import BaseModel

from loraflow.chat import end_of_turn, generation_case
from loraflow.errors import DataError
from loraflow.layout import read_jsonl

SAMPLE_ROWS = 20  # generations kept in the metrics, for the sample table


class GenerationEval(BaseModel):
    """Where the held-out conversations are and how to ask them."""

    conversations_path: str  # the prepared test split (`messages` rows)
    template: str
    max_new_tokens: int
    max_length: int
    limit: int = 200  # conversations asked at most: generation is token by token, so it bounds the cost


def generation_metrics(model, tokenizer, request: GenerationEval) -> dict:
    """`exact_match`, `rouge_l` and the first SAMPLE_ROWS generations (prompt, reference, generated)."""
    from rouge_score.rouge_scorer import RougeScorer

    rows = read_jsonl(request.conversations_path)[: request.limit]
    if not rows:
        raise DataError(f"{request.conversations_path}: no held-out conversations to generate from")
    stop = end_of_turn(tokenizer, request.template)
    scorer = RougeScorer(["rougeL"])
    exact = rouge = 0.0
    samples = []
    for row in rows:
        prompt, reference = generation_case(tokenizer, row["messages"], request.template)
        generated = generate_reply(model, tokenizer, prompt, stop, request.max_new_tokens, request.max_length)
        exact += " ".join(generated.split()) == " ".join(reference.split())
        rouge += scorer.score(reference, generated)["rougeL"].fmeasure
        if len(samples) < SAMPLE_ROWS:
            samples.append({"prompt": last_question(row["messages"]), "reference": reference, "generated": generated})
    return {"exact_match": exact / len(rows), "rouge_l": rouge / len(rows), "generations": samples}


def last_question(messages: list[dict[str, str]]) -> str:
    """What a sample table shows as the prompt: the turn before the last assistant turn."""
    last = max(i for i, message in enumerate(messages) if message["role"] == "assistant")
    return messages[last - 1]["content"] if last else ""


def generate_reply(model, tokenizer, prompt: str, stop: str, max_new_tokens: int, max_length: int) -> str:
    """Greedy continuation of a templated prompt up to the end-of-turn text `stop`. The template wrote
    every special token the prompt needs, so the tokenizer adds none; prompts keep their end (the
    question) when cut to `max_length`."""
    import torch

    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"][-max_length:]
    inputs = torch.tensor([ids], device=model.device)
    stop_id = tokenizer.convert_tokens_to_ids(stop) if stop in tokenizer.all_special_tokens else None
    eos = [token for token in (tokenizer.eos_token_id, stop_id) if token is not None]
    with torch.inference_mode():
        output = model.generate(
            input_ids=inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
            **({} if stop_id is not None else {"stop_strings": [stop], "tokenizer": tokenizer}),
        )
    text = tokenizer.decode(output[0, len(ids):], skip_special_tokens=True)
    return _before_stop(text, stop).strip()


def _before_stop(text: str, stop: str) -> str:
    """`text` up to `stop`, also when `max_new_tokens` ended it part way into a multi-token `stop`."""
    if not stop:
        return text
    text = text.split(stop, 1)[0]
    partial = next((k for k in range(len(stop) - 1, 0, -1) if text.endswith(stop[:k])), 0)
    return text[: len(text) - partial]


def generation_table(metrics: dict, baseline: dict) -> list[dict]:
    """The adapter's and the base model's answers side by side (prompt, reference, base, adapter): both
    answered the same first conversations of the test split, in order."""
    return [
        {"prompt": tuned["prompt"], "reference": tuned["reference"], "base": base["generated"],
         "adapter": tuned["generated"]}
        for tuned, base in zip(metrics.get("generations", []), baseline.get("generations", []))
    ]
