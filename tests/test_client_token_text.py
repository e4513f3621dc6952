"""Token files whose text is no valid bearer token (a BOM, a second line). Over the real TCP transport (the in-process WSGITransport encodes headers differently)."""
from __future__ import annotations

import numpy as np
import pytest

import accel
from tests.test_client_token import OLD, _client, _noop_works, rotation  # noqa: F401 - rotation: a fixture


def test_a_token_file_with_a_utf8_bom_still_gives_its_token(rotation):  # noqa: F811
    """A secret made from a file saved with a BOM (Windows editors, PowerShell's UTF8 encoding).
    ``_read_file`` decodes with "utf-8", so U+FEFF stays in front of the token; the transport cannot
    encode it (latin-1) and every call raises a bare UnicodeEncodeError: not an AccelError (index.py
    answers 500), nothing logged, no 401, so the file is never read again even once it is fixed."""
    secret, shim = rotation
    secret.rotate("\ufeff" + OLD + "\n")
    client, _ = _client(shim)
    assert _noop_works(client)


def test_a_token_file_with_a_second_line_is_a_problem_named_by_the_401_and_fixed_without_restart(rotation):  # noqa: F811
    """``strip()`` leaves the newline inside the text, the Authorization header carries it, and the shim
    answers 400 "Invalid header" (InvalidInput, which index.py passes on to the function's caller as a
    400, as if the caller's input were wrong). No 401, so no renewal: the fixed secret is never read,
    and the docs' "logged once and named in the Unauthorized error" does not hold. A token file whose
    text is no bearer token (RFC 6750 b64token) should be a problem like an empty file: no token sent,
    logged once, named in the 401, read again at the next refusal."""
    secret, shim = rotation
    secret.rotate(OLD + "\nsecond-line\n")
    client, wire = _client(shim)
    with pytest.raises(accel.Unauthorized) as refused:
        client.noop(x=np.arange(3))
    assert str(secret.path) in refused.value.message
    secret.rotate(OLD)  # the secret fixed in place
    assert _noop_works(client)


def test_the_token_never_comes_back_in_an_error_when_the_file_holds_two_lines(rotation):  # noqa: F811
    """Worse than the 400 itself: waitress's parser error quotes the whole header line ('Bare CR or LF
    found in header line "Authorization: Bearer <token>..."'), the shim's _JsonErrorTask passes that
    text on as the error, the client makes it InvalidInput's message, and index.py logs it and sends it
    to the function's caller in its JSON error. The token must be in neither."""
    secret, shim = rotation
    secret.rotate(OLD + "\nsecond-line\n")
    client, _ = _client(shim)
    with pytest.raises(accel.AccelError) as raised:
        client.noop(x=np.arange(3))
    assert OLD not in raised.value.message and OLD not in str(raised.value), raised.value.message


def test_a_token_of_other_visible_characters_from_a_file_is_sent(tmp_path, monkeypatch):
    """The shim takes any token without spaces; the file's check must not refuse more than that."""
    from tests.test_client_token import Shim
    token = "Xq7!pZ@4#r%9&k*2"
    secret = tmp_path / "secret"
    secret.write_text(token + "\n")
    monkeypatch.delenv("ACCEL_TOKEN", raising=False)
    monkeypatch.setenv("ACCEL_TOKEN_FILE", str(secret))
    shim = Shim(tmp_path)
    try:
        shim.start(token)
        client, _ = _client(shim)
        assert _noop_works(client)
    finally:
        shim.stop()


def test_an_accel_token_variable_with_a_second_line_is_a_named_401_without_the_token(rotation, monkeypatch):  # noqa: F811
    """``$ACCEL_TOKEN`` is checked as a file's token is: not sent (a header cannot carry it), and the
    401 names the variable, never its value."""
    _, shim = rotation
    monkeypatch.setenv("ACCEL_TOKEN", OLD + "\nsecond-line")
    client, _ = _client(shim)
    with pytest.raises(accel.Unauthorized) as refused:
        client.noop(x=np.arange(3))
    assert "$ACCEL_TOKEN" in refused.value.message and OLD not in refused.value.message
