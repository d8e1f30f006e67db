"""PII redaction for logs, stored conversations and training data.

Each kind of personal data has a pattern and, where one exists, a checksum that tells a real number from a
look-alike: card numbers must pass the Luhn check, IBANs the ISO 13616 mod-97 check, IPv4 octets must be <= 255.
Matches are replaced by a tag such as [EMAIL], so the text stays readable.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b")
CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?!\d|\.\d)")  # a full stop may follow
IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{1,4}:){2,7}[0-9A-Fa-f]{0,4}(?:::?[0-9A-Fa-f]{1,4})*(?![\w:])")
PHONE = re.compile(r"(?<![\w+/.-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]\d{2,6}){1,4}(?![\w/-]|\.\w)"
                   r"|(?<![\w+])\+\d{8,14}\b")
DATE = re.compile(r"^(?:\d{4}[-./]\d{1,2}[-./]\d{1,2}|\d{1,2}[-./]\d{1,2}[-./]\d{2,4})$")


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_ok(text: str) -> bool:
    s = text.replace(" ", "")
    if not 15 <= len(s) <= 34:
        return False
    rearranged = s[4:] + s[:4]
    return int("".join(str(int(ch, 36)) for ch in rearranged)) % 97 == 1


def _is_card(m: str) -> bool:
    digits = re.sub(r"\D", "", m)
    return 13 <= len(digits) <= 19 and luhn_ok(digits)


def _is_ipv4(m: str) -> bool:
    return all(int(part) <= 255 for part in m.split("."))


def _is_ipv6(m: str) -> bool:
    try:
        ipaddress.IPv6Address(m)
        return True
    except ValueError:
        return False


def _is_phone(m: str) -> bool:
    digits = re.sub(r"\D", "", m)
    if not 7 <= len(digits) <= 15 or DATE.match(m):
        return False
    # bare groups of digits separated by single spaces ("12 345 678") are amounts, unless marked as a phone
    return m.startswith(("+", "(")) or bool(re.search(r"[.-]", m)) or len(m.split()) >= 3


RULES = [  # (tag, pattern, check) in the order they apply
    ("EMAIL", EMAIL, None),
    ("IBAN", IBAN, iban_ok),
    ("CARD", CARD, _is_card),
    ("IP", IPV4, _is_ipv4),
    ("IP", IPV6, _is_ipv6),
    ("PHONE", PHONE, _is_phone),
]


@dataclass
class Redactor:
    """Replaces personal data with tags. `names` are extra words to hide (e.g. the user's own name)."""
    names: list[str] = field(default_factory=list)

    def redact(self, text: str) -> str:
        for tag, pattern, check in RULES:
            text = pattern.sub(lambda m: f"[{tag}]" if check is None or check(m.group(0)) else m.group(0), text)
        for name in sorted(self.names, key=len, reverse=True):
            if name.strip():
                text = re.sub(rf"(?<!\w){re.escape(name.strip())}(?!\w)", "[NAME]", text, flags=re.IGNORECASE)
        return text

    def redact_messages(self, messages: list[dict]) -> list[dict]:
        out = []
        for m in messages:
            m = dict(m)
            if isinstance(m.get("content"), str):
                m["content"] = self.redact(m["content"])
            out.append(m)
        return out


def redact(text: str, names: list[str] | None = None) -> str:
    return Redactor(names or []).redact(text)
