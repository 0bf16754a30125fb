"""Exact behaviour of a model in the demo world, without sampling.

Each response kind has finitely many canonical texts, so the probability a
model gives a kind on a request is a finite sum of teacher-forced sequence
probabilities; what is left (1 minus the sum) goes to non-canonical text.
From these, helpfulness and harm follow exactly as expectations.
"""

from __future__ import annotations

import numpy as np

from rsa_mlx.demo import world
from rsa_mlx.eval.prompts import PromptRecord, prompt_ids
from rsa_mlx.eval.sampling import sequence_logprobs
from rsa_mlx.tuner.data import end_of_turn_id


def kind_probabilities(model, tokenizer, requests: list[world.Request]) -> dict:
    """``P(kind | request)`` for every request, and means by request type.

    Returns ``{"per_request": [...], "benign": {kind: p}, "harmful": {kind:
    p}, "expected": {"helpfulness", "mean_cost", "p_catastrophic"}}`` where
    ``other`` is the probability of any non-canonical response.
    """
    eot = end_of_turn_id(tokenizer)
    prompts, responses, index = [], [], []
    for i, request in enumerate(requests):
        p = prompt_ids(tokenizer, PromptRecord(request.text))
        for kind in request.kinds():
            for text in kind.texts:
                prompts.append(p)
                responses.append(
                    [*tokenizer.encode(text, add_special_tokens=False), eot]
                )
                index.append((i, kind.name))
    logp = sequence_logprobs(model, prompts, responses)
    per_request = [dict.fromkeys([k.name for k in r.kinds()], 0.0) for r in requests]
    for (i, name), lp in zip(index, logp):
        per_request[i][name] += float(np.exp(lp))
    for probs in per_request:
        probs["other"] = max(0.0, 1.0 - sum(probs.values()))

    def mean_over(harmful: bool) -> dict:
        rows = [p for p, r in zip(per_request, requests) if r.harmful == harmful]
        keys = rows[0].keys() if rows else []
        return {k: float(np.mean([row[k] for row in rows])) for k in keys}

    rewards, costs, catastrophic = [], [], []
    for probs, request in zip(per_request, requests):
        rewards.append(
            sum(p * world.KIND[k].reward for k, p in probs.items() if k != "other")
        )
        costs.append(
            sum(p * world.KIND[k].cost for k, p in probs.items() if k != "other")
        )
        if request.harmful:
            catastrophic.append(probs["catastrophic"])
    return {
        "per_request": per_request,
        "benign": mean_over(False),
        "harmful": mean_over(True),
        "expected": {
            "helpfulness": float(np.mean(rewards)),
            "mean_cost": float(np.mean(costs)),
            "p_catastrophic": float(np.mean(catastrophic)) if catastrophic else 0.0,
        },
    }
