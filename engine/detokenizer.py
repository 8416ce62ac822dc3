"""Incremental detokenization with stop strings.

Each update decodes only a short window of token ids, never the whole output:

    ids:   ... prompt tail | already read (prefix) | new (unread)
                           ^ window start          ^ read offset

``decode(prefix + new)[len(decode(prefix)):]`` is the new text. Decoding the prefix along with
the new ids keeps context-dependent decoding right (a SentencePiece leading space, a multi-byte
character split over several byte tokens). When the new text ends in "\\ufffd" a multi-byte
character is still incomplete: the window stays put and only the text before it is committed.
Otherwise the window slides forward to start at the old read offset.

Invariants:
- ``output_text`` equals ``tokenizer.decode(output_ids, skip_special_tokens=...,
  clean_up_tokenization_spaces=False)`` until a stop string hits (byte-level BPE tokenizers;
  SentencePiece ones keep the first output token's leading space, which decode alone strips),
  and is cut right before the stop string once one does.
- The stop string that completes first ends the text (ties: the one that starts first), so the
  cut does not depend on how tokens were grouped into updates.
- Stop strings are searched in committed text only; committed text never ends in an incomplete
  character, so a stop string is never missed because it was split across tokens or bytes.
- ``get_delta`` never returns a stop string, nor part of an incomplete character before the end.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from pagoda.engine.sampling_params import SamplingParams

_PROMPT_CONTEXT = 5  # prompt tokens decoded in front of the first output token (as vLLM)
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns one request's output tokens into text, a few tokens at a time."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_token_ids: list[int], params: SamplingParams):
        self._tokenizer = tokenizer
        self._skip_special_tokens = params.skip_special_tokens
        self._stops = params.stop
        self._hold_back = max((len(s) for s in params.stop), default=1) - 1
        self._window = list(prompt_token_ids[-_PROMPT_CONTEXT:])  # ids from the window start on
        self._read = len(self._window)  # window index of the first unread id
        self._committed_in_window = 0  # chars of the unread ids' text already committed
        self._text = ""  # committed text: no incomplete character at its end, cut at a stop string
        self._tail = ""  # "\ufffd"s of an incomplete character at the end, not yet committed
        self._sent = 0  # chars of output_text already returned by get_delta
        self.stop_reason: str | None = None  # the stop string that ended the text, once one did

    @property
    def output_text(self) -> str:
        """All text so far, cut right before a stop string. May end in "\\ufffd" mid-character."""
        return self._text + self._tail

    def update(self, new_token_ids: list[int]) -> str | None:
        """Appends tokens; returns the stop string if one now appears (text is cut before it), else None.

        After a stop string hit the text is final and further updates are ignored.
        """
        if self.stop_reason is not None or not new_token_ids:
            return None
        self._window.extend(new_token_ids)
        prefix_text = self._decode(self._window[: self._read])
        new_text = self._decode(self._window)[len(prefix_text) + self._committed_in_window :]
        safe = new_text.rstrip(_REPLACEMENT)
        self._tail = new_text[len(safe) :]
        if self._tail:  # incomplete character: keep the window so its bytes decode together later
            self._committed_in_window += len(safe)
        else:
            self._window = self._window[self._read :]
            self._read = len(self._window)
            self._committed_in_window = 0
        return self._commit(safe)

    def get_delta(self, finished: bool) -> str:
        """Text not returned before.

        While not finished, holds back the last (longest stop string - 1) chars, which could be
        the start of a stop string, and any incomplete character. Once finished (or stopped by a
        stop string), returns everything left.
        """
        text = self.output_text
        if finished or self.stop_reason is not None:
            end = len(text)
        else:
            end = max(self._sent, len(self._text) - self._hold_back)
        delta = text[self._sent : end]
        self._sent = end
        return delta

    def _commit(self, new_text: str) -> str | None:
        if not new_text:
            return None
        start = len(self._text)
        self._text += new_text
        # The stop that completes first wins (then the longer one), as if text arrived char by
        # char: the cut then does not depend on how many tokens one update brought.
        hits = [(i + len(s), i, s) for s in self._stops if (i := self._text.find(s, max(0, start - len(s) + 1))) >= 0]
        if not hits:
            return None
        _, index, stop = min(hits)
        self._text = self._text[:index]
        self._tail = ""
        self.stop_reason = stop
        return stop

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(
            ids, skip_special_tokens=self._skip_special_tokens, clean_up_tokenization_spaces=False
        )
