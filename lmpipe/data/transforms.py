"""Per-document text transforms ``(text) -> text``: :func:`fix_text`, :class:`PIIMasker`.

(Project Gutenberg boilerplate is cut from whole files before they are split: ``lmpipe.data.gutenberg``.)

Each is pure and built once from its config section; the cleaning pipeline
(``lmpipe.data.clean``) runs them before the quality filters (``lmpipe.data.filters``),
except PII masking, which runs last so the filters judge the text as written.
"""

from __future__ import annotations

import ipaddress
import re

import ftfy

from lmpipe.config.data import PIIConfig

# ---------------------------------------------------------------------------
# transforms

# Repair only what is broken (mojibake, HTML entities in plain text, terminal escapes, surrogates).
# Everything that merely *normalises* is left to the steps that own it, so turning fix_text on does
# not silently change their behaviour: Unicode normalisation (normalization=None, and no ligature
# or full-width folding, which are what NFKC does), line endings (fix_line_breaks=False: the
# strip_control step turns \r\n and \r into \n). Curly quotes stay curly: they are valid text.
# remove_control_chars drops C0 controls other than \t \n \f \r (as strip_control would) and a
# few invisible format characters (byte order mark, U+FFF9-FFFC) that strip_control keeps.
_FTFY_CONFIG = ftfy.TextFixerConfig(
    unescape_html="auto",
    remove_terminal_escapes=True,
    fix_encoding=True,
    restore_byte_a0=True,
    replace_lossy_sequences=True,
    decode_inconsistent_utf8=True,
    fix_c1_controls=True,
    fix_latin_ligatures=False,
    fix_character_width=False,
    uncurl_quotes=False,
    fix_line_breaks=False,
    fix_surrogates=True,
    remove_control_chars=True,
    normalization=None,
    explain=False,
)
# For pure ASCII text ftfy could only unescape entities (&), remove terminal escapes (\x1b) or
# drop control characters; without any of these it returns the text unchanged, so skip it.
_ASCII_FTFY_WORK = re.compile(r"[&\x00-\x08\x0b\x0e-\x1f\x7f]")


def fix_text(text: str) -> str:
    """Repair mojibake and broken Unicode with ftfy (see _FTFY_CONFIG for what it may change)."""
    if text.isascii() and _ASCII_FTFY_WORK.search(text) is None:
        return text
    return ftfy.fix_text(text, _FTFY_CONFIG)


_EMAIL = re.compile(
    r"(?<![\w.+%-])[A-Za-z0-9_%+-]+(?:\.[A-Za-z0-9_%+-]+)*@"
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}(?![\w-]|\.\w)"
)
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\w.])(?:{_OCTET}\.){{3}}{_OCTET}(?![\w]|\.\d)")
# Candidates only: ipaddress decides what is a valid IPv6 address (so "12:30:45" is not).
_IPV6 = re.compile(
    r"(?<![\w:.])(?:[0-9A-Fa-f]{1,4}|:)?(?::[0-9A-Fa-f]{0,4}){2,7}(?:\.\d{1,3}){0,3}(?![\w:])"
)
# International: "+" and country code, then groups split by space, dot or hyphen, an optional
# "(0)" or "(area)"; 8 to 15 digits in all (E.164 allows at most 15).
_PHONE_INTL = re.compile(r"(?<![\w+])\+\d{1,3}(?:[ .\-]?(?:\(\d{1,4}\)|\d{1,5})){1,7}(?![\w]|[.\-]\d)")
# North American: optional "1 " / "+1 " handled above or "1-" here, area code 2xx-9xx (in
# parentheses or followed by a separator), exchange 2xx-9xx, a separator, 4 digits.
_PHONE_NANP = re.compile(
    r"(?<![\w+.\-/])(?:1[ .\-])?(?:\([2-9]\d\d\)[ ]?|[2-9]\d\d[ .\-])[2-9]\d\d[ .\-]\d{4}(?![\w]|[.\-/]\d)"
)

_EMAIL_HINT = re.compile(r"@[A-Za-z0-9]")
_IPV4_HINT = re.compile(r"\d\.\d+\.\d+\.\d")
_NANP_HINT = re.compile(r"\d\d\d[ .\-]\d\d\d\d")


def _is_global_ip(candidate: str) -> bool:
    try:
        return ipaddress.ip_address(candidate).is_global
    except ValueError:
        return False


class PIIMasker:
    """Replace e-mail addresses, public IP addresses and phone numbers with fixed placeholders.

    What counts:

    * e-mail: ``local@domain.tld`` with a dotted domain and a 2-63 letter top-level domain
      (``user@localhost`` is not masked);
    * IP address: a valid IPv4 (dotted quad, not preceded by a letter, so ``v1.2.3.4`` stays) or
      IPv6 address (full or ``::``-compressed, checked by ``ipaddress``) that is globally routable.
      Private, loopback, link-local and documentation ranges (192.168.x.x, 127.0.0.1, ::1,
      2001:db8::) identify nobody and are common in technical text, so they stay, as in datatrove;
    * phone number: ``+<country code>`` followed by groups (8-15 digits in all), or a North
      American number with separators: ``(555) 234-5678``, ``555-234-5678``, ``555.234.5678``,
      ``1-800-234-5678``.

    Not masked: years, dates (2021-03-04, 12/05/2020), times, version numbers, decimals, amounts
    with thousands separators, and digit runs without separators (ids, ISBNs), as well as
    7-digit local numbers (``234-5678``), which cannot be told apart from ranges and codes.
    """

    def __init__(self, cfg: PIIConfig) -> None:
        self.emails = cfg.emails
        self.ip_addresses = cfg.ip_addresses
        self.phone_numbers = cfg.phone_numbers
        self.email_replacement = cfg.email_replacement
        self.ip_replacement = cfg.ip_replacement
        self.phone_replacement = cfg.phone_replacement

    def _ip(self, m: re.Match[str]) -> str:
        return self.ip_replacement if _is_global_ip(m.group(0)) else m.group(0)

    def _intl_phone(self, m: re.Match[str]) -> str:
        digits = sum(c.isdigit() for c in m.group(0))
        return self.phone_replacement if 8 <= digits <= 15 else m.group(0)

    def __call__(self, text: str) -> str:
        # Each full pattern runs only when a cheap one, with a literal or digit to scan for, finds
        # what every match must contain: most documents hold no personal data at all.
        if self.emails and _EMAIL_HINT.search(text):
            text = _EMAIL.sub(self.email_replacement, text)
        if self.ip_addresses:
            if "::" in text or text.count(":") >= 7:
                text = _IPV6.sub(self._ip, text)
            if _IPV4_HINT.search(text):
                text = _IPV4.sub(self._ip, text)
        if self.phone_numbers:
            if "+" in text:
                text = _PHONE_INTL.sub(self._intl_phone, text)
            if _NANP_HINT.search(text):
                text = _PHONE_NANP.sub(self.phone_replacement, text)
        return text
