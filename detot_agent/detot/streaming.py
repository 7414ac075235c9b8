"""DETOT under `dspy.streamify`: the voted fields reach the stream listeners before the final prediction.

DETOT decides by voting over several samples, so no single sample's tokens are the answer while they are being
drawn: the samples are drawn with DSPy's stream switched off (one request's chunks would be mistaken for the
answer), and once the vote is in, each output field a `dspy.streaming.StreamListener` listens to on DETOT's
predictor is sent as `StreamResponse` chunks (word by word, the last one marked), then DSPy sends the
prediction. A listener for another predictor, or no `streamify`, sends nothing.

Example:
    >>> chunks("The answer is 7.")
    ['The ', 'answer ', 'is ', '7.']
"""

from __future__ import annotations

import re
from typing import Any

import dspy
from dspy.streaming.messages import StreamResponse, sync_send_to_stream

__all__ = ["chunks", "stream_fields"]


def chunks(text: str) -> list[str]:
    """`text` cut after each run of whitespace (joined, they are `text` again)."""
    return re.findall(r"\S+\s*|\s+", text) or [""]


def stream_fields(predictor: Any, fields: dict[str, Any]) -> int:
    """Send `fields` (the prediction's output fields) to the listeners on `predictor`; returns the chunks sent."""
    stream = dspy.settings.send_stream
    listeners = dspy.settings.stream_listeners or []
    if stream is None:
        return 0
    sent = 0
    for listener in listeners:
        if listener.predict is not predictor or fields.get(listener.signature_field_name) is None:
            continue
        pieces = chunks(str(fields[listener.signature_field_name]))
        for i, piece in enumerate(pieces):
            sync_send_to_stream(stream, StreamResponse(predict_name=listener.predict_name or "",
                                                       signature_field_name=listener.signature_field_name,
                                                       chunk=piece, is_last_chunk=i == len(pieces) - 1))
            sent += 1
        listener.stream_start = True  # streamify then yields the prediction after the chunks
    return sent
