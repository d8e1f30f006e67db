"""PII redaction: real personal data goes, look-alikes stay."""
import pytest

from mmchat.privacy import Redactor, iban_ok, luhn_ok, redact

PII = [  # (text, the personal part, its tag)
    ("mail me at jane.doe+shop@example.co.uk please", "jane.doe+shop@example.co.uk", "[EMAIL]"),
    ("contact: j_smith@mail.example.org.", "j_smith@mail.example.org", "[EMAIL]"),
    ("call +1 415-555-0132 today", "415-555-0132", "[PHONE]"),
    ("my number is (415) 555-0132", "555-0132", "[PHONE]"),
    ("ring 020 7946 0958 after six", "7946 0958", "[PHONE]"),
    ("mobile +44 7700 900123", "900123", "[PHONE]"),
    ("tel. +4930123456", "4930123456", "[PHONE]"),
    ("06-12-34-56-78 is my cell", "06-12-34-56-78", "[PHONE]"),
    ("card 4111 1111 1111 1111 exp 12/29", "4111 1111 1111 1111", "[CARD]"),
    ("visa 4012888888881881", "4012888888881881", "[CARD]"),
    ("amex 3782-822463-10005", "822463", "[CARD]"),
    ("IBAN DE89 3704 0044 0532 0130 00 for the refund", "3704 0044", "[IBAN]"),
    ("GB82WEST12345698765432", "GB82WEST12345698765432", "[IBAN]"),
    ("server at 192.168.1.20 is down", "192.168.1.20", "[IP]"),
    ("from 8.8.8.8", "8.8.8.8", "[IP]"),
    ("ipv6 2001:db8:85a3::8a2e:370:7334 seen", "2001:db8", "[IP]"),
]

LOOKALIKES = [
    "order number ORD-20391 shipped",
    "version 1.2.3 is out, and 10.4.1 next",
    "the date 2024-01-15 and 15/01/2024",
    "it costs $1,234.56 or 12 345 EUR",
    "4111 1111 1111 1112 fails the checksum",  # Luhn fails
    "DE89 3704 0044 0532 0130 01",            # mod-97 fails
    "300.1.2.999 is no address",
    "meet at 10:30 in room 4",
    "ISO 9001 and RFC 2616",
    "an email-like thing: user at example dot com",
    "Python 3.11.7 and torch 2.13.0",
]


@pytest.mark.parametrize("text,secret,tag", PII)
def test_pii_is_redacted(text, secret, tag):
    out = redact(text)
    assert tag in out and secret not in out, out


@pytest.mark.parametrize("text", LOOKALIKES)
def test_lookalikes_are_kept(text):
    assert redact(text) == text


def test_names_given_by_the_user():
    r = Redactor(names=["Alice Martin", "Bob"])
    out = r.redact("Alice Martin wrote to bob and Bobby; alice martin again.")
    assert out == "[NAME] wrote to [NAME] and Bobby; [NAME] again."


def test_messages_keep_their_shape():
    msgs = [{"role": "user", "content": "I am at 10.0.0.7, mail x@y.io"}, {"role": "assistant", "content": "ok"}]
    out = Redactor().redact_messages(msgs)
    assert out == [{"role": "user", "content": "I am at [IP], mail [EMAIL]"}, {"role": "assistant", "content": "ok"}]
    assert msgs[0]["content"].startswith("I am at 10.0.0.7")  # the input is not changed


def test_checksums():
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert iban_ok("GB82 WEST 1234 5698 7654 32") and not iban_ok("GB82 WEST 1234 5698 7654 33")
