"""OpenAI `stop` strings, matched on the detokenized text at the gateway.

Text that could still turn out to be the start of a stop string is held back (at most
the longest stop's length minus one characters), so a streamed delta never shows text
that a later token reveals to be part of a stop.
"""

from __future__ import annotations


class StopStrings:
    def __init__(self, stops: tuple[str, ...] = ()):
        if any(not stop for stop in stops):
            raise ValueError("stop strings must not be empty")
        self.stops = stops
        self.hold_back = max((len(stop) for stop in stops), default=1) - 1

    def scan(self, text: str, emitted: int, final: bool) -> tuple[int, bool]:
        """(end of the text that may be shown, whether a stop string was found)."""
        start = max(0, emitted - self.hold_back)  # a stop may straddle the held-back tail
        found = [i for i in (text.find(stop, start) for stop in self.stops) if i != -1]
        if found:
            return max(min(found), emitted), True
        return (len(text) if final else max(emitted, len(text) - self.hold_back)), False
