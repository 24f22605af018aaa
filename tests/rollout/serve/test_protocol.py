"""TextStream: streamed deltas add up to the final text, are never taken back, hold back what could still be a
stop string, and end before the stop."""

from rollout.serve.protocol import TextStream


class CharTok:
    """Token i is chr(i)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def _stream(text, stops, chunk):
    st, out = TextStream(CharTok(), stops), []
    ids = [ord(c) for c in text]
    for i in range(0, len(ids), chunk):
        out.append(st.push(ids[i : i + chunk], finished=i + chunk >= len(ids)))
    return out, st


def test_deltas_add_up_and_end_before_the_stop():
    for chunk in (1, 2, 3, 7):
        out, st = _stream("hello STOP", ("STOP",), chunk)  # the engine stops at the token completing it
        assert "".join(out) == "hello " == st.final_text()


def test_the_last_characters_are_held_back_until_the_next_tokens_decide():
    st = TextStream(CharTok(), ("STOP",))
    assert st.push([ord(c) for c in "abcST"], finished=False) == "ab"  # "cST" could still become "STOP"
    assert st.push([ord(c) for c in "x"], finished=False) == "c"  # the last len(stop) - 1 chars wait
    assert st.push([], finished=True) == "STx"


def test_a_stop_found_only_in_sent_text_is_not_taken_back():
    st = TextStream(CharTok(), ("ab",))
    st.hold = 0  # as if the stop had been missed by the engine: the text past it is already out
    assert st.push([ord("a"), ord("b"), ord("c")], finished=False) == "abc"
    assert st.push([ord("d")], finished=True) == ""
