"""/mxdeliv's checks alone: the envelope from header fields, the DATA form piece by piece."""

from __future__ import annotations

import random

import pytest

from chatmaild.web.mxdeliv import DataForm, Envelope, parse_envelope, smtp_answer


def check(body: bytes, cut: list[int]) -> str | None:
    form = DataForm()
    last = 0
    for at in [*cut, len(body)]:
        problem = form.feed(body[last:at])
        if problem:
            return problem
        last = at
    return form.end()[1]


GOOD = b"Subject: hi\r\n\r\n..stuffed\r\nline\r\n\r\n"
BAD = [
    b"Subject: hi\n\nbare LF\r\n",
    b"Subject: hi\r\n\r\nbare\rCR\r\n",
    b"Subject: hi\r\n\r\nend\r\n.\r\nMAIL FROM:<x@y.z>\r\n",
    b".\r\nstarts with the end\r\n",
    b"Subject: hi\r\n\r\n" + b"y" * 2049 + b"\r\n",
    b"Subject: hi\r\n\r\nends in a dot\r\n.",
    b"Subject: hi\r\n\r\nends in CR\r",
]


def test_good_body_in_any_pieces():
    for at in range(len(GOOD) + 1):
        assert check(GOOD, [at]) is None, at
    rng = random.Random(25)
    for _ in range(200):
        cuts = sorted(rng.sample(range(len(GOOD) + 1), rng.randint(1, 6)))
        assert check(GOOD, cuts) is None, cuts


@pytest.mark.parametrize("body", BAD)
def test_bad_body_found_in_any_pieces(body):
    for at in range(len(body) + 1):
        assert check(body, [at]) is not None, at


def test_end_of_data():
    form = DataForm()
    assert form.feed(GOOD) is None and form.end() == (b".\r\n", None)
    form = DataForm()
    assert form.feed(b"Subject: x\r\n\r\nno final CRLF") is None
    assert form.end() == (b"\r\n.\r\n", None)
    assert DataForm().end()[1] == "an empty body"


def test_envelope():
    assert parse_envelope((("x-mail-from", "a@b.example"), ("x-mail-to", "c@d.example"),
                           ("x-mail-to", " e@d.example "))) == Envelope(
        "a@b.example", ("c@d.example", "e@d.example"))  # fmt: skip
    assert parse_envelope((("x-mail-to", "c@[192.0.2.1]"),)) == Envelope("", ("c@[192.0.2.1]",))
    for bad in (
        (),
        (("x-mail-from", "a@b.example"),),
        (("x-mail-from", "a@b.example"), ("x-mail-from", "a@b.example"), ("x-mail-to", "c@d.e")),
        (("x-mail-to", "c@d.example>"),),
        (("x-mail-to", "<c@d.example>"),),
        (("x-mail-to", "c@d.example SIZE=1"),),
        (("x-mail-to", "no-at-sign"),),
        (("x-mail-from", "x y@b.example"), ("x-mail-to", "c@d.e")),
        tuple(("x-mail-to", f"u{i}@d.example") for i in range(101)),
    ):
        assert isinstance(parse_envelope(bad), str), bad


def test_smtp_replies_become_http_answers():
    ok = smtp_answer(250, "2.0.0 Ok: queued as ABC")
    assert (ok.status, ok.headers["X-Mxdeliv"]) == (200, "delivered")
    temp = smtp_answer(451, "4.7.1 try later")
    assert (temp.status, temp.headers["X-Mxdeliv"], temp.headers["Retry-After"]) == (
        503, "temporary", "300")  # fmt: skip
    assert smtp_answer(552, "5.3.4 too big").status == 413
    perm = smtp_answer(554, "5.7.1 No DKIM signature found")
    assert (perm.status, perm.body) == (422, b"554 5.7.1 No DKIM signature found\n")
