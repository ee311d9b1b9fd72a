"""Behaviour as the prompt track sees it: each conversation state and each action tag the language model may put in
its reply (FlowAct-R1 plans actions with its MLLM) becomes a caption the models were trained on
(``world/behaviour.py``'s captions), given to the chunks it covers through ``StreamEngine.set_prompt``."""

from __future__ import annotations

import re

STATES = ("idle", "listening", "thinking", "speaking")

STATE_CAPTIONS = {
    "idle": "idles, breathing calmly and blinking",
    "listening": "nods while listening",
    "thinking": "thinks, looking up to the left",
    "speaking": "speaks calmly",
}

ACTION_CAPTIONS = {
    "smile": "smiles and speaks calmly",
    "nod": "speaks calmly",  # the world has no nodding speaker: a nod tag keeps the plain speaking caption
    "think": "thinks, looking up to the left",
    "calm": "speaks calmly",
}

# [smile], (smiles), *nods*, <think>: a tag's word, with its -s / -ing forms
_TAG = re.compile(r"[\[(*<]\s*(smil|nod|think|calm)[a-z]*\s*[\])*>]", re.IGNORECASE)


def split_action(text: str) -> tuple[str | None, str]:
    """A reply sentence -> (its first action tag or None, the text with every tag removed)."""
    tags = _TAG.findall(text)
    clean = re.sub(r"\s{2,}", " ", _TAG.sub(" ", text)).strip()
    if not tags:
        return None, clean
    word = tags[0].lower()
    return {"smil": "smile"}.get(word, word), clean


def caption_for(action: str | None) -> str:
    return ACTION_CAPTIONS.get(action or "", STATE_CAPTIONS["speaking"])


__all__ = ["ACTION_CAPTIONS", "STATES", "STATE_CAPTIONS", "caption_for", "split_action"]
