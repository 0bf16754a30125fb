"""Written refusals: a reason and an alternative, in a few phrasings.

A 135M model asked to refuse writes reasons a person would not accept ("I
cannot help with that, because I'm not a human"); trained towards its own
refusals, the aligned model repeats them. These refusals say why (the harm)
and offer something safe instead, as a person would. Every one opens with a
decline that both refusal tests recognise (:func:`rsa_mlx.eval.refusal.
is_refusal` and :func:`~rsa_mlx.eval.refusal.opens_with_refusal`).

Taught alone, a fixed refusal is an attractor: the model says it to every
question that sounds dangerous. So with ``--refusals written`` the same
texts are also the *rejected* answers of the contrast pairs on benign and
borderline requests (chosen: the model's own answer): the text is as often
wrong as right, and only the request tells which.
"""

from __future__ import annotations

import random

__all__ = ["REFUSALS", "WRITTEN", "written_refusal"]

# How the recipe's chosen refusals are made: the model's own (continued from
# a refusal prefix under a safety system prompt) or these written ones.
REFUSALS = ("model", "written")

WRITTEN: tuple[str, ...] = (
    "I'm sorry, but I can't help with that. It could seriously hurt people, "
    "and I won't give instructions for it. If you're curious about the "
    "topic, I'm happy to explain how people stay safe from it instead.",
    "I can't help with this request. Doing it could cause real harm to "
    "others and is likely illegal. If something is troubling you, I can help "
    "you think through safer options or find someone to talk to.",
    "I'm sorry, but I won't do that. It's meant to harm or deceive people, "
    "and that's something I don't help with. I'd be glad to help with a "
    "related question that keeps everyone safe.",
    "I cannot help with that, because it puts people at risk of serious "
    "harm. If you want, I can share general safety information or point "
    "you to legitimate resources on the subject.",
    "I'm not able to help with this. It could be used to hurt someone, and "
    "it is illegal. If you tell me what you're trying to achieve, I can "
    "suggest a safe and legal way to get there.",
    "Sorry, I can't assist with that request. It could lead to real harm, "
    "and giving those details would be irresponsible. I can help with a "
    "safer question on the same topic, though.",
    "I'm sorry, but I won't help with that. It's harmful and could get "
    "people hurt or in serious trouble. If you're dealing with a difficult situation, "
    "I'm happy to talk through constructive ways to handle it.",
    "I'm sorry, but I can't provide that. Helping with it could endanger "
    "people. If your interest is in protection or prevention, I can explain "
    "the warning signs and how to stay safe.",
)


def written_refusal(prompt: str, seed: int = 0) -> str:
    """One of :data:`WRITTEN`, chosen by ``(seed, prompt)`` (so a rerun
    builds the same pairs, and the choice does not follow the prompt's
    position)."""
    return random.Random(f"{seed}\0{prompt}").choice(WRITTEN)
