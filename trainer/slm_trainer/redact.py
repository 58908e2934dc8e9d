"""Remove PII and secrets from captured agent calls before anyone trains on them (S2 "Curate").

Why this module exists: a fine-tuned SLM memorises what it is trained on, so an e-mail address,
a card number or an API key that reached the training set can come back out of the model. The
same redactor runs in two places: the gateway's capture path (S1, before a call is written to
the log) and the trainer's curate stage (S2, again, in case a log came from elsewhere). It must
therefore stay light: no torch, one analyzer built once per process and reused (see
:func:`default_redactor`), and nothing that touches the network.

How: Microsoft Presidio's analyzer with a blank spaCy pipeline (tokens only; no model is
downloaded) and these recognizers:

- Presidio's own pattern recognizers for ``EMAIL_ADDRESS`` (its top-level-domain check is
  pointed at tldextract's bundled suffix snapshot, never the network; an address glued to a
  file name's ``-cv.pdf`` is cut back to its valid domain; one whose "@" a URL spells
  ``%40`` is found too, with the placeholder of its plain spelling), ``PHONE_NUMBER``
  (python-phonenumbers, several regions, plus a pattern for formatted North American numbers
  such as ``(555) 123-4567`` that libphonenumber rejects as unassigned), ``CREDIT_CARD`` (Luhn
  checked), ``IP_ADDRESS`` (v4 and v6, parsed by :mod:`ipaddress`) and ``IBAN_CODE`` (ISO 7064
  checksum and per-country format);
- our own recognizers for secrets, which Presidio does not ship: ``API_KEY`` (OpenAI,
  Anthropic, GitHub, GitLab, AWS key ids, Slack tokens (app-level ``xapp-`` too) and
  webhooks, Google, Stripe, Hugging Face, SendGrid, npm, Shopify, Databricks, Discord webhook
  URLs and bot tokens, PyPI, Twilio, Square, DigitalOcean, Vault and ~40 more fixed-prefix
  formats (:data:`_PREFIXED_TOKENS`), generic ``api_key=...`` / ``token: ...`` /
  ``Bearer ...`` assignments whose value is long and random-looking (random mixed-case
  letters without a digit too; in a URL's query the value ends at the next ``&`` or the
  ``#``), the signature of an Azure SAS or GCS signed URL (``sig=``,
  ``SharedAccessSignature=``, ``X-Goog-Signature=``), shorter letter-and-digit credentials
  after ``Bearer`` or an ``Authorization:`` header's scheme, HTTP Basic credentials
  ``Basic <base64>`` whose base64 decodes to ``user:password``, and the password of a URL's
  ``scheme://user:password@host`` and of curl's ``-u user:password``, also across continued
  lines), ``JWT`` (three base64url segments whose header decodes to a JSON object) and
  ``PRIVATE_KEY`` (PEM ``-----BEGIN ... PRIVATE KEY-----`` blocks, also when cut off before
  their END line).

JSON values under a key named like a secret (``password``, ``client_secret``, ``secret_key``,
``AccountKey``, ``passphrase``, ``pwd``, ``Authorization``, ``Proxy-Authorization``...) are
redacted whatever they look like (the ``value`` of an object under such a key too; and
under a password's, a PIN's, a secret's or an API key's, a number or a spaced passphrase of
two to eight words), also in JSON encoded inside a string; under an
authorization key only the credential after its scheme (``Basic <API_KEY_1>``), under a
``Cookie`` key each cookie's value. In text, a value after a
``password``/``passwd``/``passphrase``/``pwd``/``pw`` label and the cookie values of a
``Cookie:`` header follow the same rule; so does a password stated in a sentence ("my password
is hunter2xyz", "the password for the db is Kx9!mm2p", "use password S3cret!x", "'S3cret!x' as
the password", "login with admin / P@ssw0rd"), but only one token holding a digit or a symbol,
or letters alone when quoted or a long passphrase, since prose says "the password is required"
far more often (:func:`stated_password`).

A few plausibility filters then drop the matches that most often turn out not to be PII in
agent traffic: bare digit runs and dotted ``ddd.dddd`` taken for phone numbers with no phone
word nearby (order ids, timestamps, prices), runs of small numbers (``1 2 3 4 5``, page lists
and scores), numbers glued to identifiers (``INV-2024-000123``) and four-part version numbers
read as IPv4 addresses (``version 10.2.1.3``), and ``user@host`` that is a URL's user and
host (``ftp://anonymous@ftp.example.org``) or an scp-style remote (``git@github.com:org/r.git``)
rather than a mailbox. A JSON integer is judged by its key too: under an identifier's or a
time's key (``order_id``, ``created_us``, ``contactId``) it is no card or phone number,
unless the key also speaks of payment or calls (``payment_method_id``, ``caller_id``); and a
four-part version under a key whose last word names a version (``app_version``,
``firmware``) is no IP address.

Replacement is consistent within one record: the same value always becomes the same
placeholder (``<EMAIL_ADDRESS_1>``), a second distinct value gets the next number
(``<EMAIL_ADDRESS_2>``), so a fine-tuned model still learns that "the address in the question
is the one passed to the tool". Placeholders already present (from an earlier pass, e.g. the
gateway's) are respected, so running the redactor twice is harmless.

A value is often recognisable in one place only: the phone number next to "call me at", the
key after ``api_key=``, the password after ``password:``, while the tool call that uses it has
just ``{"to": "4155550132"}``. So once a record has been scanned, every value given a
placeholder anywhere in it is also replaced wherever else it occurs in that record, tool-call
arguments and JSON keys included (:class:`KnownValues`); but a secret known only by its key
or label that is a word or a short number (``{"auth": "required"}``, ``{"pin": 2024}``,
``password: welcome``) is replaced only where its key or label is, since elsewhere in the
record it is far more often the word or the number (:func:`_strong_secret`). Everything a
message carries is scanned: text, the strings of image, audio and file parts (not base64
payloads, see :func:`opaque_payload`), every tool-call kind, the keys of JSON objects (see
:meth:`Redactor.redact_json_value` for keys that redact alike) and a participant's ``name``
(see :func:`participant_name`). Text that keeps its JSON escapes (a tool result that is a JSON
string literal, JSON-lines logs, a repr'd request body) is scanned as if ``\\n``, ``\\t``
and the like were decoded, offsets unchanged (:func:`escape_view`): a value right after an
escaped line break is found, and so is a secret under an escaped key
(``\\"password\\":\\"...\\"``). Likewise the letters of scripts written without spaces
(Chinese, Japanese, Thai) and Korean's glued particles are scanned as spaces where they touch
a value (:func:`spaced_view`): ``メールはjane.doe@example.comです`` holds an address.

What is NOT detected: names of people, organisations and places. That needs a named-entity
model and none can be downloaded in this project's environments; a blank spaCy pipeline only
tokenises. Postal addresses, dates of birth, national ID numbers, user names (also a URL's
user or an scp remote's, as in ``git@github.com``), and passwords that are short, a common
word, or have no password label, URL, curl ``-u`` or login pair next to them ("my password is
hunter", "passcode 1234", "my pass is ...", "it's hunter2 for the wifi") are not detected
either, nor is anything
inside a base64 payload (the text of an attached PDF or screenshot), nor a number split over
lines ("415\n555\n0123" reads as a list of three numbers, as it most often is). Treat the output as
"known identifiers and secrets removed", not as anonymised.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import dataclasses
import functools
import hashlib
import ipaddress
import itertools
import json
import math
import re
import sys
import urllib.parse
from bisect import bisect_right
from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from slm_contract import CallRecord

try:
    import orjson as _orjson
except ImportError:  # optional: only speed depends on it
    _orjson = None  # type: ignore[assignment]
try:
    import phonenumbers  # Presidio's phone recognizer brings it
except ImportError:  # then phone_forms falls back to a North American rule
    phonenumbers = None  # type: ignore[assignment]

# spaCy's thinc and Presidio's optional Hugging Face engine import torch and transformers
# whenever they are installed (as in the trainer image). We only use spaCy's tokenizer, and
# paying ~6 s and hundreds of MB for torch in the gateway's capture path is not acceptable,
# so both are hidden while these packages load; later `import torch` elsewhere still works.
_HIDDEN = [m for m in ("torch", "transformers") if m not in sys.modules]
for _name in _HIDDEN:
    sys.modules[_name] = None  # type: ignore[assignment]  # makes `import` raise ImportError
try:
    import spacy
    import tldextract
    from presidio_analyzer import (
        AnalyzerEngine,
        EntityRecognizer,
        Pattern,
        PatternRecognizer,
        RecognizerRegistry,
        RecognizerResult,
    )
    from presidio_analyzer.context_aware_enhancers import LemmaContextAwareEnhancer
    from presidio_analyzer.nlp_engine import NlpArtifacts, SpacyNlpEngine
    from presidio_analyzer.predefined_recognizers import (
        CreditCardRecognizer,
        EmailRecognizer,
        IbanRecognizer,
        IpRecognizer,
        PhoneRecognizer,
    )
    from spacy.tokens import Doc
finally:
    for _name in _HIDDEN:
        if sys.modules.get(_name, "") is None:
            del sys.modules[_name]

EMAIL_ADDRESS = "EMAIL_ADDRESS"
PHONE_NUMBER = "PHONE_NUMBER"
CREDIT_CARD = "CREDIT_CARD"
IP_ADDRESS = "IP_ADDRESS"
IBAN_CODE = "IBAN_CODE"
API_KEY = "API_KEY"
JWT = "JWT"
PRIVATE_KEY = "PRIVATE_KEY"

#: Every kind the redactor can find, in the order used to break ties between overlapping
#: matches of equal score and length (the more specific kind first).
KINDS: tuple[str, ...] = (
    PRIVATE_KEY,
    JWT,
    API_KEY,
    CREDIT_CARD,
    IBAN_CODE,
    EMAIL_ADDRESS,
    IP_ADDRESS,
    PHONE_NUMBER,
)

#: Regions whose national formats (no ``+country`` prefix) are recognised as phone numbers.
#: Each region is one more pass of libphonenumber's matcher, so the list is kept short.
DEFAULT_PHONE_REGIONS: tuple[str, ...] = ("US", "GB", "DE", "FR", "IN", "AU")

SECRET_KINDS = frozenset({PRIVATE_KEY, JWT, API_KEY})

PLACEHOLDER_RE = re.compile(r"<(" + "|".join(KINDS) + r")_(\d+)>")
# A name field in json.dumps's spelling, and a placeholder as a name holds it (no brackets).
_NAME_FIELD_RE = re.compile(r'"name": "([A-Za-z0-9_-]+)"')
_NAME_PLACEHOLDER_RE = re.compile(r"(?<![A-Za-z0-9])(" + "|".join(KINDS) + r")_(\d+)(?!\d)")

# Regex flags for our own recognizers: case matters for key prefixes (AKIA, ghp_, sk-).
_CASE_SENSITIVE = re.DOTALL | re.MULTILINE

# Suffixes that tldextract's public list lacks but that do carry real mailboxes.
_PRIVATE_EMAIL_SUFFIXES = ("internal", "local", "corp", "lan", "intranet", "localdomain")

# Words that make a bare digit run ("4155550132") a phone number rather than an id. Not
# "number": "order number 4155550132" is far more common in agent traffic than the phone kind.
_PHONE_CONTEXT_RE = re.compile(
    r"\b(?:phone|call|tel\b|telephone|mobile|cell|fax|sms|text me|whatsapp|dial|contact"
    r"|reach me|hotline|msisdn)",
    re.IGNORECASE,
)
_VERSION_CONTEXT_RE = re.compile(
    r"(?:\bv|\bversion|\bver\.?|\bbuild|\brelease|\bfirmware|\bfw|\bchrome)\s*[:=]?\s*$",
    re.IGNORECASE,
)
# Dotted phone formats in use: 415.555.0199 (North America), 01.42.68.53.00 (France).
_DOTTED_PHONE_RE = re.compile(r"(?:\(?\d{3}\)?\.)?\d{3}\.\d{4}|0\d(?:\.\d{2}){4}")
# What ends a phone number's digits and punctuation: its extension's label ("ext.", "x", "#"),
# whose "." is no version's or decimal's.
_PHONE_EXTENSION_LABEL_RE = re.compile(r"[^\d\s()+./-]")
# Phone-number matches that count only with a phone word nearby: a bare digit run (an order
# id, a timestamp) and a dotted local number, shaped like a price or a measurement (169.7162).
_NEEDS_PHONE_CONTEXT_RE = re.compile(r"\d+|\d{3}\.\d{4}")
# A JSON key whose value is a secret whatever it looks like. The name may carry any prefix
# (``aws_secret_key``, ``DB_PWD``, ``Set-Cookie``) but must end with the secret's word, so
# ``secret_key_rotation_days`` or ``password_hint`` do not count; ``pass`` only as a word of
# its own (``db_pass``, not ``bypass`` or ``compass``).
_SECRET_FIELD_WORDS = (  # also a bare field's name: _BARE_SECRET_FIELD_RE
    r"api[_-]?key|apikey|secret|token|password|passwd|passphrase|pwd|credentials?"
    r"|access[_-]?key|private[_-]?key|auth|authorization"
)
_SECRET_KEY_NAME_RE = re.compile(
    rf"[\w.-]*?(?:{_SECRET_FIELD_WORDS}|cookies?"
    r"|(?:secret|encryption|signing|master|account|shared|storage)[_-]?key)"
    r"|(?:[\w.-]*[_.-])?pass|(?:[\w.-]*[_.-])?pw",
    re.IGNORECASE,
)
# A value that is nothing but a secret field's own name ("password", "api_key"): not spread
# through its record by KnownValues, where the same word names the field. A bare name only:
# a real secret that merely ends in such a word ("Xq7zLm2Rw9secret") is spread as any other.
_BARE_SECRET_FIELD_RE = re.compile(rf"(?:{_SECRET_FIELD_WORDS}|pass|pw)", re.IGNORECASE)
# Keys named like a working directory's (``pwd``, ``OLDPWD``) whose value is a path are not
# passwords: ``{"PWD": "/home/jane/app"}`` in an environment dump.
_PWD_KEY_RE = re.compile(r".*pwd", re.IGNORECASE)
_PATH_VALUE_RE = re.compile(r"(?:/|~/|\.{1,2}/|[A-Za-z]:\\)\S*")
# ``Cookie`` / ``Set-Cookie`` values: ``name=value`` pairs separated by ";". Group 1 the name,
# group 2 the value; attributes of Set-Cookie (Path, Expires...) are no secrets.
_COOKIE_PAIR_RE = re.compile(r"(?:^|(?<=;))[ \t]*([^=;\s\"'\\]{1,256})=([^;\s\"'\\]{1,4096})")
_COOKIE_ATTRIBUTES = frozenset(
    {
        "path",
        "domain",
        "expires",
        "max-age",
        "samesite",
        "secure",
        "httponly",
        "priority",
        "partitioned",
        "version",
        "comment",
    }
)
# An HTTP authorization value: the scheme, then the credential. Under a secret-named key only
# the credential is replaced, so the model still sees which scheme the API takes.
_AUTH_SCHEME_VALUE_RE = re.compile(
    r"(\s*(?:basic|bearer|token|bot|apikey|api-key|negotiate|ntlm)\s+)(\S+)\s*",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Span:
    """One detected entity: ``text[start:end]`` is of ``kind``."""

    kind: str
    start: int
    end: int
    score: float
    value: str
    #: Whether the value is also replaced wherever else it occurs in the record
    #: (:class:`KnownValues`). False for a finding that is only a secret where it was found: a
    #: URL's password ``root`` is one, the word "root" in the rest of the record is not.
    record_wide: bool = True


@dataclass
class RedactionState:
    """Placeholder numbering and counts shared by every string of one record.

    Keep one per record (or per conversation): sharing it is what makes the same e-mail in the
    prompt and in the tool-call arguments become the same ``<EMAIL_ADDRESS_1>``.
    """

    placeholders: dict[tuple[str, str], str] = field(default_factory=dict)
    last_index: Counter[str] = field(default_factory=Counter)
    counts: Counter[str] = field(default_factory=Counter)
    #: Decoded JSON whose placeholders :meth:`seed` reserves just before the first new one is
    #: numbered. Deferred because most records have nothing to redact, and serialising a whole
    #: record to look for placeholders was a fifth of the capture worker's time per record.
    seed_from: Any = None
    #: Every value given a placeholder, as it appeared in the text, and its kind: what
    #: :class:`KnownValues` replaces in the rest of the record.
    values: dict[str, str] = field(default_factory=dict)

    def seed(self, text: str) -> None:
        """Reserve the numbers of placeholders already in ``text`` so new ones don't collide.

        Also those of a redacted participant name (``"name": "EMAIL_ADDRESS_1"``, see
        :func:`participant_name`): without them a second pass could give ``<EMAIL_ADDRESS_1>``
        to another address, and the name would seem to be that one.
        """
        found = list(PLACEHOLDER_RE.finditer(text))
        for name in _NAME_FIELD_RE.finditer(text):
            found += _NAME_PLACEHOLDER_RE.finditer(name.group(1))
        for m in found:
            kind, index = m.group(1), int(m.group(2))
            self.last_index[kind] = max(self.last_index[kind], index)

    def placeholder(self, kind: str, value: str, record_wide: bool = True) -> str:
        """The placeholder for ``value``: the same one each time, a new number for a new value.

        ``record_wide``: also replace ``value`` elsewhere in the record (see :class:`Span`).
        """
        if self.seed_from is not None:
            source, self.seed_from = self.seed_from, None
            self.seed(json.dumps(source, ensure_ascii=False))
        key = (kind, normalize_value(kind, value))
        found = self.placeholders.get(key)
        if found is None:
            self.last_index[kind] += 1
            found = f"<{kind}_{self.last_index[kind]}>"
            self.placeholders[key] = found
        if record_wide:
            self.values.setdefault(value, kind)
        self.counts[kind] += 1
        return found


def normalize_value(kind: str, value: str) -> str:
    """The identity of a value for numbering: formatting differences don't make a new entity."""
    if kind == EMAIL_ADDRESS:
        # jane.doe%40example.com in a URL is the jane.doe@example.com of the prose around it
        address = value.strip()
        if "@" not in address:
            address = urllib.parse.unquote(address)
        return address.lower()
    if kind == PHONE_NUMBER:
        return phone_forms(value)[0]
    if kind == CREDIT_CARD:
        return re.sub(r"[^0-9+]", "", value)
    if kind == IBAN_CODE:
        return re.sub(r"[^0-9A-Za-z]", "", value).upper()
    if kind == IP_ADDRESS:
        try:
            return str(ipaddress.ip_interface(value))
        except ValueError:
            return value
    return value


@functools.lru_cache(maxsize=4096)
def phone_forms(value: str) -> tuple[str, ...]:
    """A phone number's identity, then the digit strings it may be written as elsewhere.

    The identity is its E.164 form (``+14155550132``) when libphonenumber reads the number,
    with a ``+`` as given or in the first of :data:`DEFAULT_PHONE_REGIONS` where it is valid,
    else its digits (and ``+``): so ``(415) 555-0132``, ``+1 415 555 0132`` and
    ``14155550132`` are one number with one placeholder. The other forms are what a tool
    call spells the same number as: E.164 with and without ``+``, the national number alone
    (``4155550132``) and with its trunk prefix (``07911123456`` for ``+44 7911 123456``).
    Without python-phonenumbers, a North American rule: 10 digits are also ``1`` + 10 digits,
    and the reverse.
    """
    digits = re.sub(r"[^0-9+]", "", value)
    bare = digits.lstrip("+")
    forms = [digits, bare]
    canonical = digits
    number = _parse_phone(value)
    if number is not None:
        e164 = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
        national = str(number.national_number)
        with_trunk = re.sub(
            r"\D",
            "",
            phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.NATIONAL).split(
                " ext", 1
            )[0],
        )
        canonical = e164 + (f"x{number.extension}" if number.extension else "")
        forms += [e164, e164.lstrip("+"), national, with_trunk]
    elif re.fullmatch(r"1?[2-9]\d{2}[2-9]\d{6}", bare):
        national = bare[-10:]
        canonical = "+1" + national
        forms += [canonical, "1" + national, national]
    # National numbers under 7 digits would turn up as other numbers in the record.
    unique = dict.fromkeys(f for f in forms if len(f.lstrip("+")) >= 7 or f == digits)
    return (canonical, *unique)


def _parse_phone(value: str) -> Any:
    """``value`` as a libphonenumber number (None: not a number it reads, or not installed)."""
    if phonenumbers is None:
        return None
    regions: tuple[str | None, ...] = (
        (None,) if value.lstrip().startswith("+") else DEFAULT_PHONE_REGIONS
    )
    for region in regions:
        try:
            number = phonenumbers.parse(value, region)
        except phonenumbers.NumberParseException:
            continue
        if phonenumbers.is_valid_number(number) or (
            region is None and phonenumbers.is_possible_number(number)
        ):
            return number
    return None


def shannon_entropy(value: str) -> float:
    """Bits per character; random keys score above ~3.5, words and repeated digits below 3."""
    if not value:
        return 0.0
    n = len(value)
    return -sum(c / n * math.log2(c / n) for c in Counter(value).values())


def looks_random(
    value: str, min_length: int = 16, min_entropy: float = 3.0, letters_only: bool = False
) -> bool:
    """Whether a labelled value looks like a generated credential rather than a word or number.

    ``letters_only``: also accept a value with no digit when its letters are random
    (:func:`random_letters`). Only where a label already says "secret" (``api_key=...``,
    ``Bearer ...``): a random base62 token of 24 characters has no digit about 1 time in 70,
    and those leaked, while a bare letter run with no label is far more often an identifier.
    """
    core = value.strip("\"'=")
    if PLACEHOLDER_RE.search(core) or len(core) < min_length:
        return False
    if letters_only and random_letters(core):
        return True
    return (
        any(c.isdigit() for c in core)
        and any(c.isalpha() for c in core)
        and shannon_entropy(core) >= min_entropy
    )


# A run of capitals then lower-case letters, or of lower-case letters: the "words" of a
# camelCase or PascalCase identifier (``access``, ``Token``, ``XMLHttp``).
_CASE_RUN_RE = re.compile(r"[A-Z]+[a-z]*|[a-z]+")
#: The fewest letters a token without digits must have to count as random (see random_letters).
RANDOM_LETTERS_MIN_CHARS = 20


def random_letters(value: str) -> bool:
    """Whether ``value`` (letters, maybe ``-``/``_``) is a random mixed-case token, not a name.

    Why: :func:`looks_random` wants a digit, so the ~1.4 % of random base62 tokens of 24
    characters that have none leaked even after ``api_key=``. Random mixed-case letters switch
    case every couple of characters; identifiers (``accessTokenFromSecretsManager``,
    ``XMLHttpRequestHandler``) switch once per word of 4+ letters, and prose or a constant
    is one case. So: 20+ letters, both cases, at most 4.5 letters per case run on average,
    and the entropy of a random string (3.5 bits). About 9 in 10 random 20-letter tokens pass;
    none of the identifiers in the unit tests does.
    """
    letters = value.replace("-", "").replace("_", "")
    if len(letters) < RANDOM_LETTERS_MIN_CHARS or not (letters.isascii() and letters.isalpha()):
        return False
    if letters.islower() or letters.isupper():
        return False
    runs = len(_CASE_RUN_RE.findall(letters))
    return len(letters) / runs <= 4.5 and shannon_entropy(letters) >= 3.5


def _jwt_header_ok(token: str) -> bool:
    header = token.split(".", 1)[0]
    try:
        decoded = base64.urlsafe_b64decode(header + "=" * (-len(header) % 4))
        return isinstance(json.loads(decoded), dict)
    except (binascii.Error, ValueError):
        return False


#: The longest string the redactor analyses (characters); a longer one raises
#: :class:`TextTooLong`, and its record is dropped and counted, never written unredacted.
MAX_TEXT_CHARS = 10_000_000


class TextTooLong(ValueError):
    """A string over :data:`MAX_TEXT_CHARS`: its record cannot be redacted (curate counts it as
    malformed, ``too_long``, and goes on)."""


class BlankSpacyNlpEngine(SpacyNlpEngine):
    """spaCy's rule-based English tokenizer and nothing else: no model, so nothing to download.

    A blank pipeline has no lemmatizer; lower-cased token text stands in for lemmas so that
    Presidio's context words ("phone", "card", "iban") still raise scores next to a match.
    """

    #: Lexemes the tokenizer's vocabulary may hold before a fresh pipeline replaces it.
    #: spaCy keeps every distinct token it has ever seen, and a capture worker sees new text
    #: on nearly every call: without a bound its memory grew for as long as it ran, about 1.6
    #: KB per new string (``bench/redactor_memory.py``: +101 MiB after 60,000 strings; with
    #: the bound, +43 MiB at most at its checkpoints). A blank pipeline loads in about 70 ms,
    #: once per ~25,000 new strings at this bound; what it finds does not change.
    max_lexemes = 100_000

    def __init__(self) -> None:
        super().__init__(models=[{"lang_code": "en", "model_name": "blank:en"}])

    def load(self) -> None:
        nlp = spacy.blank("en")
        # spaCy refuses texts over 1,000,000 characters by default, for its parser and NER
        # (about 1 GB per 100,000 characters); a blank tokenizer needs a few hundred bytes per
        # token. Without this, a document that long in a call (the gateway's body limit can be
        # raised) could never be redacted, so the call was never captured.
        nlp.max_length = MAX_TEXT_CHARS
        self.nlp = {"en": nlp}  # type: ignore[assignment]  # base declares None

    def process_text(self, text: str, language: str) -> NlpArtifacts:
        nlp = (self.nlp or {}).get(language)
        if nlp is not None and len(nlp.vocab) > self.max_lexemes:
            self.load()  # the old vocabulary goes with the old pipeline
        return super().process_text(text, language)

    def _doc_to_nlp_artifact(self, doc: Doc, language: str) -> NlpArtifacts:
        return NlpArtifacts(
            entities=[],
            tokens=doc,
            tokens_indices=[t.idx for t in doc],
            lemmas=[t.lower_ for t in doc],
            nlp_engine=self,
            language=language,
            scores=[],
        )


def _from_built(name: str) -> Any:
    """A read-only attribute of :class:`LazyNlpArtifacts`, read from the built artifacts."""
    return property(lambda self: getattr(self._artifacts(), name))


class LazyNlpArtifacts(NlpArtifacts):
    """Presidio's NLP artifacts for ``text``, tokenized only when something reads them.

    Why: Presidio tokenizes every text before running its recognizers, but with a blank
    pipeline (no NER) the tokens serve one purpose: the context words around a match
    (:class:`LinearContextEnhancer`). Most strings a capture worker analyses match nothing,
    and spaCy's tokenizer was about a third of a worker's CPU on new text
    (``bench/capture_cost.py``). Built here, the artifacts are the engine's own, so the
    scores of what is found do not change.
    """

    def __init__(self, engine: BlankSpacyNlpEngine, text: str, language: str = "en") -> None:
        # The base __init__ would tokenize; the attributes it sets are properties here.
        self._engine = engine
        self._text = text
        self._language = language
        self._built: NlpArtifacts | None = None
        self.nlp_engine = engine

    def _artifacts(self) -> NlpArtifacts:
        if self._built is None:
            self._built = self._engine.process_text(self._text, self._language)
        return self._built

    entities = _from_built("entities")
    tokens = _from_built("tokens")
    tokens_indices = _from_built("tokens_indices")
    lemmas = _from_built("lemmas")
    keywords = _from_built("keywords")
    scores = _from_built("scores")

    @property
    def tokenized(self) -> bool:
        """Whether anything has read the tokens yet (for tests)."""
        return self._built is not None


class LinearContextEnhancer(LemmaContextAwareEnhancer):
    """Presidio's context enhancer (the same context words, the same scores) in linear time.

    Why: for every match the stock enhancer walks the text's tokens from the start to find the
    match's token, and looks each neighbouring lemma up in a list of all the text's keywords:
    time grows with matches x tokens. A 184,000-character tool result with 320 findings took
    1.9 s, a 900,000-character one would take most of a minute, and a capture worker stalls
    that long. Here the token is found by bisection over token ends and keywords are a set,
    both built once per text.

    The context words are the nearest keyword tokens on either side (stop words and
    punctuation are skipped, not counted). The stock walk steps over every token that is no
    keyword until it has enough, so where none is (``"::1 " * 25000``: a colon splits a
    keyword, and "::1" yields none) each match walked to the text's ends: 146 s for 100 KB.
    Here the positions of the keyword tokens are listed once per text, and each match's are
    a slice of that list, found by bisection.
    """

    def _extract_surrounding_words(
        self, nlp_artifacts: NlpArtifacts, word: str, start: int
    ) -> list[str]:
        if not nlp_artifacts.tokens:
            return [""]
        index = getattr(nlp_artifacts, "_slm_context_index", None)
        if index is None:
            index = self._context_index(nlp_artifacts)
            nlp_artifacts._slm_context_index = index  # type: ignore[attr-defined]
        ends, positions, words = index
        # The first token that ends after the match starts: the stock loop's condition
        # ("starts at it, or covers it"), since tokens are ordered and never empty.
        token = bisect_right(ends, start)
        if token == len(ends):
            raise ValueError(f"Did not find word {word!r} in the list of tokens")
        # The stock walk's words, in its order: from the match's token back, then forward;
        # each takes one keyword more than its count, the match's own token included.
        at = bisect_right(positions, token)
        backward = words[max(0, at - self.context_prefix_count - 1) : at][::-1]
        at = bisect.bisect_left(positions, token)
        forward = words[at : at + self.context_suffix_count + 1]
        return list(set(backward + forward))

    @staticmethod
    def _context_index(nlp_artifacts: NlpArtifacts) -> tuple[list[int], list[int], list[str]]:
        """Token ends, and the positions and lower-cased lemmas of the keyword tokens."""
        ends = [
            i + len(t)
            for i, t in zip(nlp_artifacts.tokens_indices, nlp_artifacts.tokens, strict=True)
        ]
        keywords = frozenset(nlp_artifacts.keywords)
        lowered = [lemma.lower() for lemma in nlp_artifacts.lemmas]
        positions = [i for i, lemma in enumerate(lowered) if lemma in keywords]
        return ends, positions, [lowered[i] for i in positions]


class OfflineEmailRecognizer(EmailRecognizer):
    """Presidio's e-mail recognizer with its domain check on tldextract's bundled snapshot.

    The stock recognizer calls ``tldextract.extract``, whose first use downloads the public
    suffix list; in a pod without egress that hangs until a timeout. ``suffix_list_urls=()``
    and no cache directory make tldextract read only the snapshot shipped in its wheel.
    """

    _extract = tldextract.TLDExtract(
        suffix_list_urls=(),
        cache_dir=None,
        fallback_to_snapshot=True,
        extra_suffixes=_PRIVATE_EMAIL_SUFFIXES,
    )

    def validate_result(self, pattern_text: str) -> bool:
        return bool(self._extract(pattern_text.rsplit("@", 1)[-1]).fqdn)


# An address's "@", or the "%40" that spells it in a URL (``?email=jane.doe%40example.com``).
_AT_SIGN_RE = re.compile(r"@|%40")


def at_sign_written(value: str) -> str:
    """An address found with its "@" percent-encoded (``jane.doe%40example.com``, in a URL's
    query or a signed URL's credential) with that "@" written as one; other values unchanged.

    The "%40" that stands for the "@" is the last one: no domain holds a "%". Nothing else is
    decoded, so every character but the "@" keeps its offset.
    """
    if "@" in value or "%40" not in value:
        return value
    local, _, domain = value.rpartition("%40")
    return local + "@" + domain


# The longest local part (RFC 5321: 64) and domain (RFC 1035: 253, so 255 with slack) that an
# address found in text may have. Beyond these only the last 64 characters before the "@" and
# the first 255 after it are read: enough for every real address, and the bound that keeps the
# search linear (see GluedEmailRecognizer).
EMAIL_LOCAL_MAX_CHARS = 64
EMAIL_DOMAIN_MAX_CHARS = 255
# Presidio's local-part characters (its e-mail pattern's character class, dot included).
_EMAIL_LOCAL_CHAR_RE = re.compile(r"[!#$%&'*+\-/=?^_`{|}~.\w]")
# The same without what separates a URL's parts ("/", "?", "&", "=", "#"; ":" is in neither):
# a "%40" occurs only inside a URL, so an address spelt with one starts after the last of them.
_URL_EMAIL_LOCAL_CHAR_RE = re.compile(r"[!$%'*+\-^_`{|}~.\w]")


class GluedEmailRecognizer(OfflineEmailRecognizer):
    """:class:`OfflineEmailRecognizer` in linear time, also finding an address glued to what
    follows it.

    Why not Presidio's own search: its pattern (``\\b`` then a local part of any length, "@",
    a domain) is tried at every word boundary of the text, and from each it runs to the end of
    the local-part characters before failing: quadratic time. A 100 KB base64 blob beside one
    address took 48 s, ``"a." * 10000 + "@x"`` 40 s, in a capture worker (a denial of service;
    the ``regex`` module's timeout is a minute). Here the same pattern is matched only around
    each "@": from the start of the local-part characters before it (at most
    :data:`EMAIL_LOCAL_MAX_CHARS`) to at most :data:`EMAIL_DOMAIN_MAX_CHARS` after it, and only
    where a domain follows. The matches are Presidio's (a unit test compares them on the
    labelled set), but for an over-long local part, of which the last 64 characters are taken,
    and for an address whose "@" a URL spells "%40" (``?email=jane.doe%40example.com``), which
    Presidio never finds and is matched here as if its "@" were written.
    """

    NAME = "GluedEmailRecognizer"
    #: Presidio's e-mail patterns, compiled with the flags it applies to them by default.
    _COMPILED: tuple[tuple[Pattern, re.Pattern[str]], ...] = tuple(
        (p, re.compile(p.regex, re.DOTALL | re.MULTILINE | re.IGNORECASE))
        for p in EmailRecognizer.PATTERNS
    )
    # What must follow the "@" for any of them to match (their domain, without the \b).
    _DOMAIN_RE = re.compile(r"\w+(?:-+\w+)*(?:\.\w+(?:-+\w+)*)+", re.IGNORECASE)

    def __init__(self) -> None:
        super().__init__(name=self.NAME)

    def analyze(
        self,
        text: str,
        entities: list[str],
        nlp_artifacts: NlpArtifacts | None = None,
        regex_flags: int | None = None,
    ) -> list[RecognizerResult]:
        """Presidio's matches, plus addresses glued to what follows them.

        The pattern is greedy, so a file named ``jane.doe@example.com-cv.pdf`` matches whole
        and fails the domain check (``.pdf`` is no suffix): the address was lost. A failed
        match is cut back at each ``-`` or ``.`` of its domain, and the longest cut whose
        domain passes is the address.
        """
        results: list[RecognizerResult] = []
        for pattern, regex in self._COMPILED:
            for start, end in self._matches(text, regex):
                value = text[start:end]
                address = at_sign_written(value)
                if not self.validate_result(address):
                    cut = self._glued_address_end(address)
                    if cut == 0:
                        continue
                    end = start + cut + len(value) - len(address)  # a "%40" is 2 longer
                explanation = self.build_regex_explanation(
                    self.NAME, pattern.name, pattern.regex, pattern.score, True, 0
                )
                results.append(
                    RecognizerResult(
                        entity_type=EMAIL_ADDRESS,
                        start=start,
                        end=end,
                        score=EntityRecognizer.MAX_SCORE,
                        analysis_explanation=explanation,
                        recognition_metadata={
                            RecognizerResult.RECOGNIZER_NAME_KEY: self.NAME,
                            RecognizerResult.RECOGNIZER_IDENTIFIER_KEY: self.id,
                        },
                    )
                )
        return EntityRecognizer.remove_duplicates(results)

    def _matches(self, text: str, regex: re.Pattern[str]) -> Iterable[tuple[int, int]]:
        """The spans ``regex.finditer(text)`` would give, each found from its "@", and those
        it would give if each "%40" were an "@".

        A match holds exactly one "@" (neither part of the pattern allows one), so each "@"
        is tried once: the pattern is matched at the candidate starts in the run of local-part
        characters before it, leftmost first as a search would, never before the end of the
        previous match. The text is sliced to the bounded window, so a start cut by the bound
        counts as a word boundary. Work per "@" is bounded by the two limits.

        A "%40" is only ever inside a URL, so its local part stops at the URL's separators:
        read with all of Presidio's characters, ``https://api.example.com/v1/users/jane%40x.io``
        was an address from the host on, and its placeholder was not the one of the
        ``jane@x.io`` elsewhere in the record.
        """
        last_end = 0
        for sign in _AT_SIGN_RE.finditer(text):
            at, after = sign.span()
            lo = max(last_end, at - EMAIL_LOCAL_MAX_CHARS)
            hi = min(len(text), after + EMAIL_DOMAIN_MAX_CHARS)
            if at > lo and self._DOMAIN_RE.match(text, after, hi):
                start = at
                url = sign.group() != "@"
                local_char = _URL_EMAIL_LOCAL_CHAR_RE if url else _EMAIL_LOCAL_CHAR_RE
                while start > lo and local_char.match(text, start - 1):
                    start -= 1
                # A "%40" is read as the "@" it encodes; past it, offsets shift by two.
                window = text[start:at] + "@" + text[after:hi]
                for offset in range(at - start):
                    match = regex.match(window, offset)
                    if match is not None and match.end() > at - start:
                        last_end = start + match.end() + (after - at - 1)
                        yield start + match.start(), last_end
                        break

    def _glued_address_end(self, value: str) -> int:
        """The length of the longest valid address ``value`` starts with (0: none)."""
        at = value.find("@")
        for end in range(len(value) - 1, at, -1):
            if value[end] in ".-" and "." in value[at:end] and self.validate_result(value[:end]):
                return end
        return 0


class _SecretRecognizer(PatternRecognizer):
    """Case-sensitive patterns whose matches must also pass a plausibility check."""

    def __init__(
        self,
        entity: str,
        patterns: Sequence[Pattern],
        context: list[str],
        name: str,
        min_length: int = 16,
        letters_only: bool = False,
    ) -> None:
        super().__init__(
            supported_entity=entity,
            patterns=list(patterns),
            context=context,
            supported_language="en",
            name=name,
            global_regex_flags=_CASE_SENSITIVE,
        )
        self.min_length = min_length
        #: Accept random letters without a digit (only for labelled values: see looks_random).
        self.letters_only = letters_only

    def invalidate_result(self, pattern_text: str) -> bool:
        if self.supported_entities[0] == JWT:
            return not _jwt_header_ok(pattern_text)
        if self.supported_entities[0] == API_KEY:
            # Generated keys mix letters and digits; slugs such as "sk-my-long-branch-name" don't.
            return not looks_random(
                pattern_text.rstrip(".,:"),
                min_length=self.min_length,
                letters_only=self.letters_only,
            )
        return False


class _DiscordBotTokenRecognizer(_SecretRecognizer):
    """:data:`DISCORD_BOT_TOKEN_PATTERNS`, kept when the first part decodes to a user id."""

    def __init__(self) -> None:
        super().__init__(
            API_KEY,
            DISCORD_BOT_TOKEN_PATTERNS,
            ["discord", "token"],
            "SlmDiscordBotTokenRecognizer",
        )

    def invalidate_result(self, pattern_text: str) -> bool:
        return not discord_bot_token(pattern_text)


class _VendorKeyRecognizer(_SecretRecognizer):
    """:data:`VENDOR_KEY_PATTERNS`: every match counts (no :func:`looks_random` test)."""

    def __init__(self) -> None:
        super().__init__(API_KEY, VENDOR_KEY_PATTERNS, ["key", "token"], "SlmVendorKeyRecognizer")

    def invalidate_result(self, pattern_text: str) -> bool:
        return False


# The name may carry any prefix (OPENAI_API_KEY, x-api-key, github_token) but must end right
# before the separator, so "max_tokens: 1024" or "password_hint=..." do not count. A signed
# URL's signature is its credential: Azure SAS's ``sig=`` (and a connection string's
# ``SharedAccessSignature=``, the whole SAS token), GCS's ``X-Goog-Signature=``.
_SECRET_NAMES = (
    r"(?i:api[_-]?key|apikey|secret|token|password|passwd|passphrase|access[_-]?key"
    r"|(?:secret|encryption|signing|master|account|shared|storage)[_-]?key|sig|signature)"
)

# Keys whose pattern alone could match a slug or a word: kept only if random-looking.
API_KEY_PATTERNS: tuple[Pattern, ...] = (
    # OpenAI (sk-, sk-proj-, sk-svcacct-), Anthropic (sk-ant-api03-), DeepSeek and similar.
    Pattern("sk-style key", r"(?<![\w-])sk-[A-Za-z0-9_-]{20,}", 0.95),
    # Runs of letters and digits joined by single dashes. Possessive runs: the nested
    # "(?:[A-Za-z0-9]+-?){2,}" this replaces split a long run every possible way before
    # failing ("xoxb-" + "a" * 20000 + "_" took 10 s).
    Pattern("Slack token", r"\bxox[abposre]-[A-Za-z0-9]++(?:-[A-Za-z0-9]++)*\b", 0.95),
)

# More tokens whose fixed prefix is the evidence, one regex for all (Presidio runs each
# Pattern as its own search over the text, so ~50 patterns would be ~50 passes). Every body
# has a bounded length, and each prefix is literal, so a search fails at once almost
# everywhere. Where the body alone could be letters, "_" and "-" (a plain JSON key, see
# Redactor._redact_key), a lookahead wants the digit that all but a sliver of real ones have,
# as for Shopify; a prefix with a digit or a dot in it needs none.
_TELEGRAM_BOT_TOKEN = r"[0-9]{8,10}:AA[A-Za-z0-9_-]{33}"
_PREFIXED_TOKENS: tuple[tuple[str, str], ...] = (
    ("PyPI upload token", r"pypi-AgE(?:IcHlwaS5vcmc|NdGVzdC5weXBpLm9yZw)[A-Za-z0-9_-]{40,1000}"),
    ("Twilio API key SID", r"SK(?=[a-f]{0,31}[0-9])[0-9a-f]{32}"),
    ("Square token", r"sq0(?:atp|csp)-[A-Za-z0-9_-]{22,60}"),
    ("Stripe webhook secret", r"whsec_(?=[A-Za-z]{0,63}[0-9])[A-Za-z0-9]{32,64}"),
    ("DigitalOcean token", r"do[opr]_v1_[a-f0-9]{64}"),
    ("Linear API key", r"lin_(?:api|oauth)_(?=[A-Za-z]{0,39}[0-9])[A-Za-z0-9]{40}"),
    ("Atlassian API token", r"ATATT3[A-Za-z0-9_=-]{150,250}"),
    (
        "GitLab token",
        r"gl(?:ptt|rt|rtr|dt|ft|soat|cbt|imt|oas|agent|wt)-(?=[A-Za-z_-]{0,63}[0-9])[A-Za-z0-9_-]{20,64}",
    ),
    ("Groq key", r"gsk_(?=[A-Za-z]{0,51}[0-9])[A-Za-z0-9]{52}"),
    ("Replicate token", r"r8_[A-Za-z0-9]{37}"),
    ("xAI key", r"xai-(?=[A-Za-z]{0,79}[0-9])[A-Za-z0-9]{80}"),
    ("Perplexity key", r"pplx-(?=[A-Za-z]{0,63}[0-9])[A-Za-z0-9]{48,64}"),
    ("LangSmith key", r"lsv2_(?:pt|sk)_[a-f0-9]{32}_[a-f0-9]{10}"),
    ("Pinecone key", r"pcsk_(?=[A-Za-z_]{0,119}[0-9])[A-Za-z0-9_]{60,120}"),
    ("Tavily key", r"tvly-(?:dev-|prod-)?(?=[A-Za-z]{0,31}[0-9])[A-Za-z0-9]{32}"),
    ("NVIDIA key", r"nvapi-(?=[A-Za-z_-]{0,63}[0-9])[A-Za-z0-9_-]{64}"),
    ("HashiCorp Vault token", r"hv[sbr]\.[A-Za-z0-9_-]{24,512}"),
    ("Pulumi token", r"pul-[a-f0-9]{40}"),
    (
        "Tailscale key",
        r"tskey-(?:auth|api|client|scim|webhook)-(?=[A-Za-z-]{0,96}[0-9])[A-Za-z0-9]{6,32}-[A-Za-z0-9]{16,64}",
    ),
    ("Sentry token", r"sntry[su]_(?=[A-Za-z+/=_-]{0,511}[0-9])[A-Za-z0-9+/=_-]{40,512}"),
    ("Figma token", r"figd_(?=[A-Za-z_-]{0,63}[0-9])[A-Za-z0-9_-]{40,64}"),
    ("Postman key", r"PMAK-[a-f0-9]{24}-[a-f0-9]{34}"),
    ("Netlify token", r"nfp_(?=[A-Za-z]{0,35}[0-9])[A-Za-z0-9]{36,40}"),
    ("Notion token", r"ntn_[0-9]{11}[A-Za-z0-9]{35}"),
    ("Google OAuth access token", r"ya29\.[A-Za-z0-9_-]{30,2048}"),
    ("Google OAuth client secret", r"GOCSPX-(?=[A-Za-z_-]{0,27}[0-9])[A-Za-z0-9_-]{28}"),
    (
        "1Password service account token",
        r"ops_eyJ(?=[A-Za-z+/=_-]{0,4095}[0-9])[A-Za-z0-9+/=_-]{100,4096}",
    ),
    ("Heroku key", r"HRKU-(?=[A-Za-z_-]{0,63}[0-9])[A-Za-z0-9_-]{40,64}"),
    ("Doppler token", r"dp\.(?:pt|st|sa|ct|scim|audit)\.[A-Za-z0-9]{40,44}"),
    (
        "Grafana token",
        r"glsa_(?=[A-Za-z]{0,31}[0-9])[A-Za-z0-9]{32}_[A-Fa-f0-9]{8}"
        r"|glc_(?=[A-Za-z+/]{0,399}[0-9])[A-Za-z0-9+/]{32,400}={0,2}",
    ),
    ("New Relic key", r"NR(?:AK|JS|II)-(?=[A-Z]{0,31}[0-9])[A-Z0-9]{19,32}"),
    ("Supabase key", r"sbp_[a-f0-9]{40}|sb_secret_(?=[A-Za-z_-]{0,63}[0-9])[A-Za-z0-9_-]{20,64}"),
    (
        "PlanetScale token",
        r"pscale_(?:tkn|pw|oauth)_(?=[A-Za-z_.-]{0,63}[0-9])[A-Za-z0-9_.-]{32,64}",
    ),
    ("Docker Hub token", r"dckr_pat_(?=[A-Za-z_-]{0,26}[0-9])[A-Za-z0-9_-]{27}"),
    ("Terraform Cloud token", r"[A-Za-z0-9]{14}\.atlasv1\.[A-Za-z0-9_=-]{60,80}"),
    ("RubyGems key", r"rubygems_[a-f0-9]{48}"),
    ("age secret key", r"AGE-SECRET-KEY-1[QPZRY9X8GF2TVDW0S3JN54KHCE6MUA7L]{58}"),
    ("Telegram bot token", _TELEGRAM_BOT_TOKEN),
    ("Brevo key", r"xkeysib-[a-f0-9]{64}-[A-Za-z0-9]{16}"),
    ("Mapbox secret token", r"sk\.eyJ[A-Za-z0-9_-]{20,200}\.[A-Za-z0-9_-]{20,100}"),
    ("Contentful token", r"CFPAT-(?=[A-Za-z_-]{0,42}[0-9])[A-Za-z0-9_-]{43}"),
    ("Fly.io token", r"fo1_[A-Za-z0-9_-]{43}"),
    ("Buildkite token", r"bkua_[a-f0-9]{40}"),
    ("Sourcegraph token", r"sgp_(?:[a-f0-9]{16}_)?[a-f0-9]{40}"),
    ("Prefect key", r"pnu_(?=[A-Za-z]{0,35}[0-9])[A-Za-z0-9]{36}"),
    (
        "HubSpot private app token",
        r"pat-(?:na|eu)1-[a-f0-9]{8}-[a-f0-9]{4}-[a-f0-9]{4}-[a-f0-9]{4}-[a-f0-9]{12}",
    ),
    ("Dynatrace token", r"dt0c01\.[A-Z0-9]{24}\.[A-Z0-9]{64}"),
    ("Shippo token", r"shippo_(?:live|test)_[a-f0-9]{40}"),
    ("EasyPost key", r"EZ[AT]K(?=[A-Za-z]{0,53}[0-9])[A-Za-z0-9]{54}"),
    ("Flutterwave secret key", r"FLWSECK(?:_TEST)?-[a-h0-9]{32}-X"),
    ("Alibaba Cloud key id", r"LTAI(?=[A-Za-z]{0,19}[0-9])[A-Za-z0-9]{20}"),
    ("JFrog key", r"AKCp(?=[A-Za-z]{0,68}[0-9])[A-Za-z0-9]{69}"),
    ("Airtable token", r"pat[A-Za-z0-9]{14}\.[a-f0-9]{64}"),
    ("Hugging Face org token", r"api_org_(?=[A-Za-z]{0,33}[0-9])[A-Za-z0-9]{34}"),
    ("Anyscale key", r"esecret_(?=[A-Za-z_]{0,63}[0-9])[A-Za-z0-9_]{20,64}"),
    ("ElevenLabs key", r"sk_(?=[a-f]{0,47}[0-9])[a-f0-9]{48}"),
    ("Cerebras key", r"csk-(?=[a-z]{0,47}[0-9])[a-z0-9]{48}"),
    (
        "Facebook access token",
        r"EAA(?:CEdEose0cBA|[A-Z](?=[A-Za-z]{0,999}[0-9]))[A-Za-z0-9]{90,1000}",
    ),
    ("Twitter bearer token", r"A{21}(?=[A-Za-z]{0,999}[0-9%])[A-Za-z0-9%]{30,1000}"),
    ("Mailchimp key", r"[0-9a-f]{32}-us[0-9]{1,2}"),
)
# Not inside a longer token on the left ("=" may precede: ``KEY=...``; base64 has it only at
# the end), nor on the right (a "/" may follow: a URL's path goes on); a Telegram token also
# right after its URL's "/bot".
PREFIXED_TOKEN_PATTERN = Pattern(
    "vendor token (fixed prefix)",
    r"(?:(?<![A-Za-z0-9_.+/-])(?:"
    + "|".join(regex for _, regex in _PREFIXED_TOKENS)
    + r")|(?<=/bot)"
    + _TELEGRAM_BOT_TOKEN
    + r")(?![A-Za-z0-9_-])",
    0.95,
)

# Keys with a vendor's fixed prefix and a fixed or long minimum length: the format is the
# evidence, so no randomness test (:func:`looks_random` wants a digit, and about 4 % of real
# AWS key ids, 16 random base-32 characters, have none).
VENDOR_KEY_PATTERNS: tuple[Pattern, ...] = (
    Pattern("GitHub token", r"\b(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{36,255}\b", 0.95),
    Pattern("GitHub fine-grained PAT", r"\bgithub_pat_[A-Za-z0-9_]{22,255}\b", 0.95),
    Pattern("GitLab PAT", r"\bglpat-[A-Za-z0-9_-]{20,}\b", 0.95),
    Pattern("AWS access key id", r"\b(?:AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{16}\b", 0.95),
    Pattern(
        "Slack webhook",
        r"https://hooks\.slack\.com/services/T[A-Z0-9]+/B[A-Z0-9]+/[A-Za-z0-9]{16,}",
        0.95,
    ),
    Pattern("Google API key", r"\bAIza[0-9A-Za-z_-]{35}(?![0-9A-Za-z_-])", 0.95),
    Pattern("Stripe key", r"\b(?:sk|rk|pk)_(?:live|test)_[0-9A-Za-z]{16,}\b", 0.95),
    Pattern("Hugging Face token", r"\bhf_[A-Za-z0-9]{30,}\b", 0.95),
    Pattern("SendGrid key", r"\bSG\.[A-Za-z0-9_-]{16,}\.[A-Za-z0-9_-]{20,}", 0.95),
    Pattern("npm token", r"\bnpm_[A-Za-z0-9]{36}\b", 0.95),
    # Slack app-level token: xapp-<version>-<app id>-<digits>-<hex secret>.
    Pattern(
        "Slack app-level token",
        r"\bxapp-\d{1,2}-[A-Z0-9]{6,32}-\d{6,32}-[A-Za-z0-9]{16,256}\b",
        0.95,
    ),
    # Shopify admin/custom-app/private-app access tokens and shared secrets: 32 hex. The
    # lookahead wants a digit among them (all but ~1e-14 of real ones), so a string of letters,
    # "_" and "-" still holds nothing to find (see Redactor._redact_key).
    Pattern(
        "Shopify token",
        r"\bshp(?:at|ca|pa|ss)_(?=[a-fA-F]{0,31}[0-9])[a-fA-F0-9]{32}\b",
        0.95,
    ),
    # Databricks personal access token: dapi + 32 of [a-h0-9] (gitleaks' alphabet), with the
    # "-2"-style suffix newer workspaces append; a digit required as above.
    Pattern("Databricks token", r"\bdapi(?=[a-h]{0,31}[0-9])[a-h0-9]{32}(?:-\d{1,2})?\b", 0.95),
    # Discord webhook URL: like a Slack webhook, the URL is the credential (anyone holding it
    # can post), so the whole URL is the match.
    Pattern(
        "Discord webhook",
        r"https://(?:(?:ptb|canary)\.)?discord(?:app)?\.com/api/(?:v\d{1,2}/)?webhooks/"
        r"\d{17,20}/[A-Za-z0-9_-]{60,100}(?![A-Za-z0-9_-])",
        0.95,
    ),
    PREFIXED_TOKEN_PATTERN,
)


# A Discord bot token: base64 of the bot's numeric user id (a 17-20 digit snowflake), a
# timestamp, an HMAC. No fixed prefix, so the first part must decode to such an id
# (:class:`_DiscordBotTokenRecognizer`): a random dotted string never does.
DISCORD_BOT_TOKEN_PATTERNS: tuple[Pattern, ...] = (
    Pattern(
        "Discord bot token",
        r"(?<![A-Za-z0-9_.+/-])[MNO][A-Za-z0-9_-]{22,26}\.[A-Za-z0-9_-]{6}\.[A-Za-z0-9_-]{27,38}"
        r"(?![A-Za-z0-9_+/=-])",
        0.95,
    ),
)


def discord_bot_token(token: str) -> bool:
    """Whether ``token``'s first part is the base64 of a Discord snowflake (17-20 digits)."""
    head = token.split(".", 1)[0]
    try:
        decoded = base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)).decode("ascii")
    except (binascii.Error, ValueError):
        return False
    return decoded.isdigit() and 17 <= len(decoded) <= 20


# A value whose only hint is its label. Lower score: a vendor pattern or a JWT covering the
# same value wins. Passwords may hold any printable character except quotes and brackets.
# The quotes may be escaped (``\"api_key\":\"...\"``: JSON inside a JSON string, a log
# line's request body), and the value ends at an escaped quote. The value of a URL query's
# field (``?api_key=...&q=red+shoes``) ends at the next field's "&" or the fragment's "#",
# which elsewhere may be a secret's own characters (Django's SECRET_KEY holds both).
_QUERY_FIELD_BEFORE = r"[?&][\w.-]{1,64}="
# What ends the value of a URL query's field: the next field, or the fragment.
_QUERY_VALUE_END_RE = re.compile(r"[&#]")
ASSIGNED_SECRET_PATTERNS: tuple[Pattern, ...] = (
    Pattern(
        "assigned secret",
        r"(?<=" + _SECRET_NAMES + r"(?:\\?[\"'])?\s*[:=]\s*(?:\\?[\"'])?)"
        r"(?:(?<=" + _QUERY_FIELD_BEFORE + r")[^\s\"'`,;<>(){}\[\]\\&#]{12,}"
        r"|(?<!" + _QUERY_FIELD_BEFORE + r")(?:[^\s\"'`,;<>(){}\[\]\\]|\\(?![\"'])){12,})",
        0.6,
    ),
    Pattern("bearer token", r"(?<=\b(?i:bearer)\s+)[A-Za-z0-9_\-.~+/]{20,}=*", 0.6),
)

# HTTP Basic credentials (``Authorization: Basic dXNlcjpwYXNz``): base64 of ``user:password``,
# i.e. the password itself, only encoded. The value alone is the match, so "Basic <API_KEY_1>"
# stays readable; :class:`_BasicCredentialsRecognizer` keeps only values that decode to text
# with a ":", which "Basic setup" or "basic usage" never do.
BASIC_AUTH_PATTERNS: tuple[Pattern, ...] = (
    Pattern(
        "HTTP Basic credentials",
        r"(?<=\b(?i:basic)\s+)[A-Za-z0-9+/]{8,}={0,2}(?![A-Za-z0-9+/=_-])",
        0.8,
    ),
)

JWT_PATTERNS: tuple[Pattern, ...] = (
    Pattern(
        "JWT",
        r"(?<![\w-])eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.(?:[A-Za-z0-9_-]{8,})?(?![\w-])",
        0.9,
    ),
)

_PEM_LABEL = r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----"
PRIVATE_KEY_PATTERNS: tuple[Pattern, ...] = (
    Pattern(
        "PEM private key",
        _PEM_LABEL + r".*?-----END [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----",
        1.0,
    ),
    # A key cut off by truncation or a max-length log field: the header and base64 lines.
    Pattern(
        "truncated PEM private key",
        _PEM_LABEL + r"(?:(?:\s|\\n|\\r)*[A-Za-z0-9+/=:,-]{16,})*",
        0.9,
    ),
)

# libphonenumber only accepts numbers in assigned ranges, so it misses the (555) 123-4567 of
# examples and tests, reserved ranges, and numbers assigned after its metadata was cut. A
# clearly formatted number is a phone number whoever owns the range; these patterns score
# below libphonenumber's 0.4 so that its (more exact) span wins where both match.
PHONE_PATTERNS: tuple[Pattern, ...] = (
    Pattern(
        "formatted North American number",
        r"(?<![\w+\-.])(?:\+?1[\s.-]?)?\(\d{3}\)\s?\d{3}[\s.-]\d{4}(?![\w-])"
        r"|(?<![\w+\-.])(?:\+?1[\s.-])?\d{3}-\d{3}-\d{4}(?![\w-])",
        0.35,
    ),
    Pattern(
        "international format",
        r"(?<![\w+])\+[1-9]\d{0,2}(?:\s?\(0\))?(?:[\s.-]\(?\d{1,8}\)?){2,5}(?![\w-]|[.,]\d)",
        0.3,
    ),
)


# Presidio's card pattern predates Mastercard's 2221-2720 range (issued since 2017), and
# takes only one "-" or " " between groups: a number typed with two spaces, a tab (pasted from
# a spreadsheet), a non-breaking space (what word processors and chat clients put between
# digit groups) or dots was missed. The same separator throughout, so "2024.0101 1200-0000"
# is no card. Never a newline: numbers one per line are a list.
_CARD_SEPARATOR = r"(?P<sep>[ \u00a0\u2007\u202f]{2,3}|[\u00a0\u2007\u202f.])"
# Tabs separate a table's columns more often than a card's groups: a tab-separated card must
# have no digit group with that separator right before or after it, so a row of numbers in
# a table ("2019\t2020\t2021\t2022\t2023") is no card. (Not for the other separators: a card
# typed with two spaces and then its CVV, "4111  1111  1111  1111  123", is one.)
_TAB_SEPARATOR = r"(?P<sep>\t{1,3})"
_CARD_4444_ALONE = r"(?!(?P=sep)\d)(?<!\d(?P=sep)\d{4}(?P=sep)\d{4}(?P=sep)\d{4}(?P=sep)\d{4})"
_CARD_465_ALONE = r"(?!(?P=sep)\d)(?<!\d(?P=sep)\d{4}(?P=sep)\d{6}(?P=sep)\d{5})"
_CARD_4444 = r"\b[2-6]\d{3}{sep}\d{4}(?P=sep)\d{4}(?P=sep)\d{4}\b"
_CARD_465 = r"\b3[47]\d{2}{sep}\d{6}(?P=sep)\d{5}\b"
CARD_PATTERNS: tuple[Pattern, ...] = (
    Pattern(
        "Mastercard 2-series",
        r"\b2(?:22[1-9]|2[3-9]\d|[3-6]\d{2}|7[01]\d|720)[- ]?\d{4}[- ]?\d{4}[- ]?\d{4}\b",
        0.3,
    ),
    Pattern(
        "card in 4-digit groups, other separators",
        _CARD_4444.replace("{sep}", _CARD_SEPARATOR),
        0.3,
    ),
    Pattern(
        "card in 4-digit groups, tabs",
        _CARD_4444.replace("{sep}", _TAB_SEPARATOR) + _CARD_4444_ALONE,
        0.3,
    ),
    Pattern("Amex 4-6-5, other separators", _CARD_465.replace("{sep}", _CARD_SEPARATOR), 0.3),
    Pattern("Amex 4-6-5, tabs", _CARD_465.replace("{sep}", _TAB_SEPARATOR) + _CARD_465_ALONE, 0.3),
)
# What Presidio's Luhn check strips from a match before reading its digits.
_CARD_REPLACEMENT_PAIRS = [
    ("-", ""),
    (" ", ""),
    ("\t", ""),
    (".", ""),
    ("\u00a0", ""),
    ("\u2007", ""),
    ("\u202f", ""),
]

# Presidio's IBAN pattern takes one " " or "-" between groups: an IBAN typed with two spaces,
# a tab or a non-breaking space (pasted from a statement or a table) was missed. A run of up
# to four of them, never a newline; the ISO 7064 checksum and the country's format still
# decide. Three groups as Presidio's, which tries the longest that validates.
_IBAN_SEPARATOR = r"(?:[ \t\u00a0\u2007\u202f]{1,4}|-)?"
IBAN_PATTERNS: tuple[Pattern, ...] = (
    Pattern(
        "IBAN, spaces or tabs between groups",
        rf"(?<![A-Z0-9])([A-Z]{{2}}[0-9]{{2}}(?:{_IBAN_SEPARATOR}[A-Z0-9]{{4}}){{2,6}})"
        rf"((?:{_IBAN_SEPARATOR}[A-Z0-9]{{4}})?)((?:{_IBAN_SEPARATOR}[A-Z0-9]{{1,3}})?)(?![A-Z0-9])",
        0.5,
    ),
)
_IBAN_REPLACEMENT_PAIRS = [
    ("-", ""),
    (" ", ""),
    ("\t", ""),
    ("\u00a0", ""),
    ("\u2007", ""),
    ("\u202f", ""),
]


def basic_credentials(value: str) -> bool:
    """Whether ``value`` is the base64 of printable ``user:password`` text (RFC 7617)."""
    try:
        decoded = base64.b64decode(value + "=" * (-len(value) % 4), validate=True)
        text = decoded.decode("utf-8")
    except (binascii.Error, ValueError):  # UnicodeDecodeError is a ValueError
        return False
    return ":" in text and text.isprintable()


class _BasicCredentialsRecognizer(_SecretRecognizer):
    """:data:`BASIC_AUTH_PATTERNS`, kept only when the value decodes to ``user:password``.

    Not :func:`looks_random`: base64 of a short or dictionary password often fails that test,
    and the decoded ":" is a far stronger sign than entropy.
    """

    def __init__(self) -> None:
        super().__init__(API_KEY, BASIC_AUTH_PATTERNS, ["authorization"], "SlmBasicAuthRecognizer")

    def invalidate_result(self, pattern_text: str) -> bool:
        return not basic_credentials(pattern_text)


# A URL's userinfo with a password: ``scheme://user:password@host`` (RFC 3986; the user may be
# empty, as in ``redis://:password@cache``). Group 1 is the password, up to the last "@" of the
# authority as URL parsers read it (``p@ss`` in ``ftp://u:p@ss@host``). Quotes, brackets,
# backslashes and whitespace end it, so a URL in JSON or shell text never runs into the next
# field. The scheme is bounded so that a long dotted run cannot make the search quadratic.
_URL_CREDENTIALS_RE = re.compile(
    r"(?<![A-Za-z0-9+.-])[A-Za-z][A-Za-z0-9+.-]{0,30}://"
    r"[^\s/?#@:\"'<>`\\]*:"
    r"([^\s/?#\"'<>`\\]+)@(?=[\w\[])"
)
# Passwords that are not one: masks (``****``), template references (``${DB_PASSWORD}``,
# ``{{ pw }}``, ``%(password)s``, ``$PGPASSWORD``) and the word itself, as in documentation's
# ``postgres://user:password@localhost/db``.
_URL_PASSWORD_STAND_IN_RE = re.compile(
    r"\*+|\u2022+|(?i:x{3,})|\$\{[^}]*\}|\$[A-Za-z_]\w*|\{\{.*\}\}|\{[A-Za-z_]\w*\}"
    r"|%\([^)]*\)s|%[A-Za-z_]\w*%|(?i:\[?redacted\]?|(?:your|my)?[_-]?(?:password|passwd|pass|pwd))"
)
# What any URL password match needs (for :func:`possible_kinds`; implied by the regex above).
_URL_CREDENTIALS_HINT = r"://[^\s/?#@:]*:[^\s/?#]+@"
# recognition_metadata key: False when a finding must not be replaced record-wide (Span).
_RECORD_WIDE_KEY = "slm_record_wide"


def _strong_secret(password: str) -> bool:
    """Whether a secret found by its label or key alone (a URL's password, ``password=...``,
    ``{"auth": ...}``, a cookie's value) is distinctive enough to replace wherever else it
    occurs.

    ``mysql://root:root@localhost`` is a credential in the URL, but replacing "root" all over
    the record ("run as root", the user name) would garble text that holds no secret; so would
    ``{"auth": "required"}`` in "Authentication is required", ``{"pin": 2024}`` in "the 2024
    audit" or ``{"otp": "5555", "qty": 5555}`` in the quantity. Eight characters mixing
    letters with digits or symbols are not a word or a number, nor are random mixed-case
    letters (:func:`random_letters`). A weak one is replaced only where its label is.
    """
    if random_letters(password):
        return True
    return len(password) >= 8 and not password.isalpha() and not password.isdigit()


class _CredentialSpanRecognizer(EntityRecognizer):
    """An API_KEY recognizer that finds exact credential spans with its own rules (:meth:`spans`)
    rather than one pattern: the label or syntax around a secret decides, and only the secret
    itself is replaced. ``SCORE`` ranks it against the pattern recognizers where both match."""

    NAME = ""
    SCORE = 0.5

    def __init__(self) -> None:
        super().__init__(supported_entities=[API_KEY], name=self.NAME, supported_language="en")

    def load(self) -> None:
        """Nothing to load: compiled regexes."""

    def spans(self, text: str) -> list[tuple[int, int, bool]]:
        """(start, end, replaced record-wide) of each credential in ``text``."""
        raise NotImplementedError

    def analyze(
        self,
        text: str,
        entities: list[str],
        nlp_artifacts: NlpArtifacts | None = None,
        regex_flags: int | None = None,
    ) -> list[RecognizerResult]:
        return [
            RecognizerResult(
                entity_type=API_KEY,
                start=start,
                end=end,
                score=self.SCORE,
                recognition_metadata={
                    RecognizerResult.RECOGNIZER_NAME_KEY: self.NAME,
                    RecognizerResult.RECOGNIZER_IDENTIFIER_KEY: self.id,
                    _RECORD_WIDE_KEY: record_wide,
                },
            )
            for start, end, record_wide in self.spans(text)
        ]


class _UrlCredentialsRecognizer(_CredentialSpanRecognizer):
    """The password in a URL's ``user:password@`` (:data:`_URL_CREDENTIALS_RE`), as API_KEY.

    Why a recognizer of its own: connection strings (``postgres://admin:S3cr3tPw@db...``,
    ``mongodb+srv://...``, ``redis://:pw@cache``) are pasted into agent prompts and tool
    calls all the time, and no other pattern holds them: a short password is no key, and the
    e-mail pattern took ``S3cr3tPw@db.internal`` for an address, so the placeholder said
    "e-mail" and swallowed the host. Only the password is the match, so the model still sees
    ``postgres://admin:<API_KEY_1>@db.internal:5432/app``: the scheme, user and host. Any
    password counts, however short (its label is the URL syntax itself); only a strong one
    is also replaced elsewhere in the record (:func:`_strong_secret`).
    """

    NAME = "SlmUrlCredentialsRecognizer"
    SCORE = 0.95

    def spans(self, text: str) -> list[tuple[int, int, bool]]:
        return [
            (match.start(1), match.end(1), _strong_secret(match.group(1)))
            for match in _URL_CREDENTIALS_RE.finditer(text)
            if not _URL_PASSWORD_STAND_IN_RE.fullmatch(match.group(1))
        ]


# A password after its label in text, by the rule the JSON path applies to a value under a
# key of that name: ``password=CorrectHorseBatteryStaple``, ``Password=S3cr3tPw!;`` in an
# ADO.NET string, ``&password=...`` in a JDBC URL, ``pwd: hunter2``, ``"passphrase": "..."``,
# and JSON inside a JSON string (``\"password\":\"hunter2xyz\"``: a log line's request body).
# The label may carry a prefix (DB_PASSWORD, PGPASSWORD) and must end right before the
# separator. Group ``quote`` opens a double-quoted value (escaped or not; the same quote
# closes it), group 3 is that value, 4 a single-quoted one, 5 a bare one (";", ",", quotes,
# brackets, backslashes and whitespace end it, and "&" in a URL's query). Lengths are
# bounded so the search stays linear.
_LABELLED_PASSWORD_RE = re.compile(
    r"(?P<label>(?i:password|passwd|passphrase|pwd|(?<![A-Za-z])pw))"
    r"(?:\\?[\"'])?[ \t]*[:=][ \t]*"
    r"(?:(?P<quote>\\?\")([^\"\\\n]{1,256})(?P=quote)|'([^'\\\n]{1,256})'"
    r"|([^\s\"'`,;<>(){}\[\]\\]{1,256}))"
)
# The label's prefix (DB_ in DB_PASSWORD), to see what precedes the whole name.
_LABEL_PREFIX_RE = re.compile(r"[\w.-]{0,64}$")
# What a label is followed by in code and documentation rather than a password: a type
# (``password: string``, ``password: str = Field(...)``), a keyword, or a word about it.
_NOT_A_PASSWORD = frozenset(
    {
        "string",
        "str",
        "number",
        "int",
        "integer",
        "bool",
        "boolean",
        "bytes",
        "secretstr",
        "optional",
        "required",
        "none",
        "null",
        "nil",
        "undefined",
        "true",
        "false",
        "hidden",
        "masked",
        "redacted",
        "empty",
        "unset",
        "omitted",
        "sensitive",
        "secret",
        "varchar",
        "text",
        "char",
        "object",
        "any",
        "unknown",
    }
)
# An identifier that names where a password comes from (``settings.DB_PASSWORD``,
# ``os.environ``; ``db_password``, ``PGPASSWORD``): code, not the secret. The second form only
# without a digit or in capitals: ``secure_pass123`` and ``MyPassword1`` are passwords.
_PASSWORD_REFERENCE_RE = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+")
_PASSWORD_NAME_RE = re.compile(r"[A-Za-z_]\w*(?i:pass|pwd|secret|key|token)\w*")
# A ``Cookie:`` or ``Set-Cookie:`` header line; group 1 its value, to the end of the line or
# a quote.
_COOKIE_HEADER_RE = re.compile(r"(?i:\b(?:set-)?cookie)[ \t]*:[ \t]*([^\r\n\"'`]{1,8192})")
# What either needs (for :func:`possible_kinds`).
_LABELLED_SECRET_HINT = (
    r"(?i:password|passwd|passphrase|pass[ \t](?:phrase|code)|passcode|pw|cookie"
    r"|log[ -]?in|sign[ -]?in|cred|user(?:name)?[ \t]{0,4}/[ \t]{0,4}pass)"
)


def labelled_password(value: str, label: str, after: str) -> bool:
    """Whether ``value``, found after a password ``label`` and followed by ``after``, is one.

    The JSON path's rule (:func:`_secret_value`: 6+ characters, no whitespace), less what is
    plainly not a password in text: a stand-in (``****``, ``${DB_PASSWORD}``, the word
    itself), a type or keyword (``password: string``), a reference in code
    (``password=settings.DB_PASSWORD``, ``password=get_secret(...)``), and a path after a
    ``pwd`` label (a working directory).
    """
    if not _secret_value(value) or after[:1] in ("(", "["):
        return False
    if _URL_PASSWORD_STAND_IN_RE.fullmatch(value) or value.lower() in _NOT_A_PASSWORD:
        return False
    if _PASSWORD_REFERENCE_RE.fullmatch(value):
        return False
    if _PASSWORD_NAME_RE.fullmatch(value) and (
        not any(c.isdigit() for c in value) or _CONSTANT_NAME_RE.fullmatch(value)
    ):
        return False
    return not (label.lower().endswith("pwd") and _PATH_VALUE_RE.fullmatch(value))


# A password stated in a sentence: "my password is hunter2xyz", "the passcode was 482913",
# "Password is now 'S3cr3t!x'", "the password for the db is Kx9!mm2p", "the pw I think is
# 'Xq7rT2'", "my password now is 'secure123'", "password for the db: Kx9!mm2p", "change the
# password to Hunter2!x". Between the label and the verb: a phrase "for/to/of/on/at/in/with"
# + up to three words (the account it is for), then a hedge. Prose says "the password is
# required" far more often, so the value must be one token no word is (:func:`stated_password`).
# Groups: ``label`` (1), ``middle`` (2), ``verb`` (3), then the value: 4 double-, 5 single-,
# 6 back-quoted, 7 bare. Every repeat is bounded, so the search stays linear.
_PASSWORD_LABEL = r"(?i:pass(?:word|wd|code|phrase)|pass[ \t](?:phrase|code)|pwd?)"
_QUOTED_OR_BARE_VALUE = (
    r"(?:\"([^\"\\\n]{1,256})\"|'([^'\\\n]{1,256})'|`([^`\\\n]{1,256})`"
    r"|([^\s\"'`,;<>(){}\[\]\\]{1,256}))"
)
_STATED_PASSWORD_RE = re.compile(
    r"(?<![A-Za-z0-9])(?P<label>" + _PASSWORD_LABEL + r")(?![A-Za-z0-9])"
    r"(?P<middle>(?:[ \t]{1,16}(?i:for|to|of|on|at|in|with)(?:[ \t]{1,16}[\w.@-]{1,64}){1,3}?)?"
    r"(?:[ \t]{1,16}(?i:attempt|(?:I|we)[ \t]{1,16}(?:think|believe|guess)|now|still|here))?)"
    r"(?P<verb>[ \t]{1,16}(?i:is|was)(?:[ \t]{1,16}(?i:now|still|just|actually))?(?:[ \t]*:)?"
    r"[ \t]{1,16}|[ \t]*:[ \t]*(?:(?i:is|was)[ \t]{1,16})?"
    r"|[ \t]{1,16}(?i:to)[ \t]{1,16})" + _QUOTED_OR_BARE_VALUE
)
# The label right before its value: "use password S3cret!x to log in", "password hunter2Q",
# "--password S3cret!x", SQL's "WITH LOGIN PASSWORD 'S3cret!x'". Group 1 the label, then the
# value: 2 double-, 3 single-, 4 back-quoted, 5 bare.
_BARE_PASSWORD_RE = re.compile(
    r"(?<![A-Za-z0-9])(?P<label>(?i:password|passwd|passphrase|pw))[ \t]{1,16}"
    + _QUOTED_OR_BARE_VALUE
)
# The value before its label: "'secure*pass123' as the password", "Admin123! is my password".
# Only the words after the value are matched (from the space before "as"/"is"); the value is
# read backwards from there (:func:`_value_before`), so the search never re-reads a long token.
_PASSWORD_AFTER_VALUE_RE = re.compile(
    r"[ \t]{1,16}(?i:as|is)[ \t]{1,16}(?:(?i:the|my|your|our|a|new|his|her|their)[ \t]{1,16})?"
    r"(?i:password|passwd|passphrase|pw)(?![A-Za-z0-9])"
)
# A login pair: "login with admin / P@ssw0rd", "credentials: admin/S3cret!x", "user/pass:
# admin/P@ssw0rd". Group ``user``, then the password: 2 double-, 3 single-quoted, 4 bare.
_LOGIN_PAIR_RE = re.compile(
    r"(?<![A-Za-z0-9])(?i:log[ -]?in|sign[ -]?in|credentials?|creds"
    r"|user(?:name)?[ \t]{0,4}/[ \t]{0,4}(?:pass(?:word)?|pwd?))(?![A-Za-z0-9])"
    r"(?:[ \t]{1,16}(?i:with|as|using|is|are))?[ \t]*[:=]?[ \t]{1,16}"
    r"(?P<user>[\w.@+-]{1,64})(?:[ \t]{1,4}/[ \t]{1,4}|/)"
    r"(?:\"([^\"\\\n]{1,256})\"|'([^'\\\n]{1,256})'|([^\s\"'`,;<>(){}\[\]\\]{1,256}))"
)
# What ends a bare value read backwards (as the bare value groups above end it).
_VALUE_STOP_CHARS = frozenset(" \t\r\n\"'`,;<>(){}[]\\")
# A quantity or a compound word, not a password: "8chars", "12-characters", "sha256-hashed",
# "base64-encoded", "2fa-protected".
_STATED_NOT_PASSWORD_RE = re.compile(r"\d{1,3}[A-Za-z]+|[A-Za-z0-9]+(?:-[A-Za-z]{2,})+")
# Numbers that are no password: a version, a date, a time, an amount ("v2.1.0", "2024-05-01").
_NUMBER_NOT_PASSWORD_RE = re.compile(r"[vV]?\d+(?:\.\d+)+|(?=.*[.,:/+-])[\d.,:/+-]+")
# Hash, cipher and encoding names that follow "password" in prose about storing one.
_ALGORITHM_NAMES = frozenset(
    {
        "md5",
        "sha1",
        "sha-1",
        "sha224",
        "sha256",
        "sha-256",
        "sha384",
        "sha512",
        "sha-512",
        "argon2",
        "argon2i",
        "argon2id",
        "pbkdf2",
        "bcrypt",
        "scrypt",
        "base64",
        "utf8",
        "utf-8",
        "aes256",
        "aes-256",
        "rot13",
        "hmac-sha256",
    }
)
# What prose says a password is, in quotes too: "the password is 'incorrect'".
_PASSWORD_STATUS_WORDS = frozenset(
    {
        "incorrect",
        "invalid",
        "expired",
        "required",
        "mandatory",
        "optional",
        "missing",
        "wrong",
        "correct",
        "weak",
        "strong",
        "disabled",
        "enabled",
        "changed",
        "locked",
        "rejected",
        "accepted",
        "verified",
        "encrypted",
        "protected",
        "different",
        "temporary",
        "forgotten",
        "reset",
    }
)
# The endings of the adjectives and participles prose puts after "password is" (compromised,
# unrecoverable, insufficient, alphanumeric, confidential, mandatory...). An unquoted
# letter-only value with one of them is a word, not a passphrase.
_PROSE_ENDING_RE = re.compile(
    r"(?i:(?:ed|ing|ive|ble|ent|ant|al|ous|ful|less|ic|ory|ary|ion|ly|ish|ate|ise|ize|ness"
    r"|ment|ity|ure|ence|ance)s?)"
)
#: The fewest letters an unquoted letter-only password stated in a sentence must have
#: ("my password is correcthorsebattery"); shorter, it is too often a word.
STATED_WORDS_MIN_CHARS = 12


def stated_password(value: str, after: str, quoted: bool = False, words: bool = False) -> bool:
    """Whether ``value``, stated in "my password is VALUE" and followed by ``after``, is one.

    Conservative, because the sentence is mostly prose: :func:`labelled_password`'s rule, and
    the value must hold a digit or a symbol (``hunter2xyz``, ``P@ssword``, ``482913``), so a
    word never counts ("is required", "is incorrect", "was reset", "is case-sensitive",
    "is sent_by_email"), nor a quantity or compound ("is 8chars", "is base64-encoded"), a
    version, date or amount ("v2.1.0", "2024-05-01"), a hash's name ("SHA256"), a URL or a
    path. Code's ``if password is None`` is a keyword (:data:`_NOT_A_PASSWORD`).

    Letters alone count in two cases, since passphrases are letters ("correcthorsebattery"):
    ``quoted`` (the speaker marked it as a literal) with 8+ characters and not a status word
    ("the password is 'incorrect'"); and with ``words`` (the "is"/"was" sentence only), unquoted
    with :data:`STATED_WORDS_MIN_CHARS`+ letters and no adjective's or participle's ending.
    """
    if not labelled_password(value, "password", after):
        return False
    if "://" in value or _PATH_VALUE_RE.fullmatch(value):
        return False
    lowered = value.lower()
    if lowered in _ALGORITHM_NAMES or _NUMBER_NOT_PASSWORD_RE.fullmatch(value):
        return False
    if quoted and value.replace("-", "").isalpha():
        return len(value) >= 8 and lowered not in _PASSWORD_STATUS_WORDS
    if _STATED_NOT_PASSWORD_RE.fullmatch(value):
        return False
    if any(c.isdigit() or not (c.isalnum() or c in "-_'.") for c in value):
        return True
    return (
        words
        and value.isalpha()
        and len(value) >= STATED_WORDS_MIN_CHARS
        and lowered not in _PASSWORD_STATUS_WORDS
        and not _PROSE_ENDING_RE.search(value[-6:] + "$")
        and _PROSE_ENDING_RE.fullmatch(value[-4:]) is None
    )


def _value_before(text: str, end: int) -> tuple[int, bool]:
    """Where the value ending at ``end`` starts, and whether it is quoted (read backwards).

    A quoted value is the text between the quote right before ``end`` and the same quote
    before it, at most 256 characters back and on one line; a bare one runs back to the
    first space, quote or bracket, at most 256 characters. (-1, False): no value.
    """
    if end == 0:
        return -1, False
    quote = text[end - 1]
    if quote in "\"'`":
        opening = text.rfind(quote, max(0, end - 258), end - 1)
        if opening < 0 or "\n" in text[opening + 1 : end - 1]:
            return -1, False
        return opening + 1, True
    start = end
    while start > max(0, end - 256) and text[start - 1] not in _VALUE_STOP_CHARS:
        start -= 1
    return (start, False) if start < end else (-1, False)


class _LabelledSecretRecognizer(_CredentialSpanRecognizer):
    """Passwords after a ``password``/``passwd``/``passphrase``/``pwd`` label and cookie values
    in a ``Cookie:``/``Set-Cookie:`` header, as API_KEY.

    Why: the assigned-secret pattern wants 12+ random-looking characters, which a password
    rarely is (``password=CorrectHorseBatteryStaple``, ``Password=S3cr3tPw!``), while the same
    value under a JSON key ``password`` was always redacted. Here text gets the JSON rule
    (:func:`labelled_password`), and a password stated in a sentence ("my password is
    hunter2xyz") a stricter one (:func:`stated_password`). A cookie's value is a session
    credential: each is replaced, its name and Set-Cookie's attributes kept
    (:func:`redact_cookie_values`).
    """

    NAME = "SlmLabelledSecretRecognizer"
    # Above an assigned secret's 0.6: where both match, this span is the exact one (it ends at
    # a URL query's "&").
    SCORE = 0.65

    def spans(self, text: str) -> list[tuple[int, int, bool]]:
        found: list[tuple[int, int, bool]] = []
        for match in _LABELLED_PASSWORD_RE.finditer(text):
            group = next(g for g in (3, 4, 5) if match.group(g) is not None)
            start, end = match.span(group)
            value = match.group(group)
            if group == 5 and ("&" in value or "#" in value):
                prefix = _LABEL_PREFIX_RE.search(text, max(0, match.start() - 64), match.start())
                name_start = prefix.start() if prefix else match.start()
                if text[name_start - 1 : name_start] in ("?", "&"):  # a URL query's field
                    value = _QUERY_VALUE_END_RE.split(value, maxsplit=1)[0]
                    end = start + len(value)
            after = text[end : end + 1]
            if labelled_password(value, match.group("label"), after):
                found.append((start, end, _strong_secret(value)))
        found += self._stated(text)
        for header in _COOKIE_HEADER_RE.finditer(text):
            offset = header.start(1)
            for pair in _COOKIE_PAIR_RE.finditer(header.group(1)):
                name, value = pair.group(1), pair.group(2)
                if name.lower() in _COOKIE_ATTRIBUTES or not _secret_value(value):
                    continue
                if _URL_PASSWORD_STAND_IN_RE.fullmatch(value):
                    continue
                found.append((offset + pair.start(2), offset + pair.end(2), _strong_secret(value)))
        return found

    @staticmethod
    def _stated(text: str) -> list[tuple[int, int, bool]]:
        """Passwords in sentences (:func:`stated_password`): after "password [for X] is", right
        after the label, before "as the password", and the second half of a login pair."""
        found: list[tuple[int, int, bool]] = []

        def add(start: int, end: int, quoted: bool, words: bool = False) -> None:
            value = text[start:end]
            if not quoted:  # the end of the sentence, not of the password
                value = value.rstrip(".,:")
                end = start + len(value)
            if stated_password(value, text[end : end + 1], quoted, words):
                found.append((start, end, _strong_secret(value)))

        for match in _STATED_PASSWORD_RE.finditer(text):
            verb = match.group("verb")
            if ":" in verb and "is" not in verb.lower() and not match.group("middle"):
                continue  # "password: X" is the labelled rule's
            group = next(g for g in (4, 5, 6, 7) if match.group(g) is not None)
            words = verb.strip(" \t:").lower() in ("is", "was")
            add(*match.span(group), group != 7, words)
        for match in _BARE_PASSWORD_RE.finditer(text):
            group = next(g for g in (2, 3, 4, 5) if match.group(g) is not None)
            add(*match.span(group), group != 5)
        for match in _PASSWORD_AFTER_VALUE_RE.finditer(text):
            start, quoted = _value_before(text, match.start())
            if start >= 0:
                add(start, match.start() - quoted, quoted)
        for match in _LOGIN_PAIR_RE.finditer(text):
            group = next(g for g in (2, 3, 4) if match.group(g) is not None)
            add(*match.span(group), group != 4)
        return found


# An HTTP credential after its scheme, however short: ``Authorization: Bearer abc123def456``,
# ``-H "Authorization: Bearer tok_9f8e7d"``, ``"Authorization": "token 1a2b3c4d"``, or a bare
# ``Bearer abc123def456`` in code. Group ``auth``: the header's name, when it precedes; ``scheme``;
# ``cred``: the credential (RFC 6750's b64token). The assigned-secret pattern takes only 20+
# random-looking characters after "Bearer", which a short test or session token is not.
_AUTH_CREDENTIAL_RE = re.compile(
    r"(?:(?P<auth>(?i:\b(?:proxy-)?authorization))"
    r"(?:\\?[\"'])?[ \t]*[:=][ \t]*(?:\\?[\"'])?)?"
    r"(?P<scheme>(?i:\b(?:bearer|token|bot|apikey|api-key)))[ \t]{1,16}"
    r"(?P<cred>[A-Za-z0-9\-._~+/]{1,1024}+=*+)(?![^\s\"'`,;:!?<>(){}\[\]\\|&])"
)
# An identifier in capitals (``YOUR_TOKEN``, ``API_TOKEN_V2``): documentation's stand-in.
_CONSTANT_NAME_RE = re.compile(r"[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+")


def auth_credential(value: str, labelled: bool) -> bool:
    """Whether ``value`` after an HTTP auth scheme is a credential rather than prose or a
    stand-in.

    A letter and a digit (a token has both; "Bearer of bad news" has neither), or 20+ random
    mixed-case letters (:func:`random_letters`), and, after an
    ``Authorization`` header's name, 6+ characters (the JSON rule's :func:`_secret_value`);
    a bare ``Bearer`` in text wants 8+. Stand-ins are left: ``Bearer <token>``,
    ``Bearer ${TOKEN}``, ``$TOKEN`` and ``{token}`` never match the b64token alphabet, and
    capitalised names (``YOUR_TOKEN_1``) and masks are refused here.
    """
    if len(value) < (6 if labelled else 8) or not _secret_value(value):
        return False
    if random_letters(value):  # a random token that happens to hold no digit
        return True
    if not (any(c.isdigit() for c in value) and any(c.isalpha() for c in value)):
        return False
    return not (_URL_PASSWORD_STAND_IN_RE.fullmatch(value) or _CONSTANT_NAME_RE.fullmatch(value))


# The word ``curl`` (or Windows' ``curl.exe``) as a command, and where its command line ends:
# an unescaped line break (LF, CRLF or CR), a pipe, ";" or "&&". A line continued by a
# backslash (also before a CRLF: a script saved on Windows), or by cmd's "^" or PowerShell's
# "`" after a space, goes on.
_CURL_RE = re.compile(r"(?<![\w.-])curl(?:\.exe)?(?![\w.-])")
_NOT_CONTINUED = r"(?<!\\)(?<![ \t][\^`])"
_COMMAND_END_RE = re.compile(_NOT_CONTINUED + r"(?:\r|(?<!\r)\n)|[|;]|&&")
#: How far a curl command's options are read (characters): the bound that keeps it linear.
CURL_COMMAND_MAX_CHARS = 4096
# curl's ``-u``/``--user`` (and proxy ``-U``/``--proxy-user``) option: ``-u user:pw``,
# ``-uuser:pw``, ``-sSu user:pw`` (after flags that take no argument, so ``-Furl=...`` is no
# ``-u``), ``--user=user:pw``, quoted or not. Groups 1 (double-quoted), 2 (single-quoted),
# 3 (bare): the ``user:password`` value.
_CURL_USER_RE = re.compile(
    r"(?<![^\s\"'])(?:-[sSkLfviI]{0,8}[uU][ \t]*|--(?:proxy-)?user(?:[ \t]+|=))"
    r"(?:\"([^\"\n]{1,512})\"|'([^'\n]{1,512})'|([^\s\"'`;|&<>(){}\[\]\\]{1,512}))"
)
# A template's stand-in in angle or square brackets: ``<password>``, ``[PASSWORD]``.
_BRACKETED_STAND_IN_RE = re.compile(r"<[^<>]*>|\[[^\[\]]*\]")


def curl_password(password: str, quoted: str) -> bool:
    """Whether ``password``, from curl's ``-u user:password``, is one.

    Any length counts (the option is its label, as a URL's ``user:password@`` is), but not:
    nothing (``-u user:`` makes curl prompt, ``-u :`` is Negotiate), a shell expansion outside
    single quotes (``-u "$USER:$PASS"``), a stand-in (``****``, ``<password>``,
    ``${PASSWORD}``, the word itself) or a type word (:data:`_NOT_A_PASSWORD`).
    """
    if not password or (quoted != "'" and password.startswith("$")):
        return False
    if _URL_PASSWORD_STAND_IN_RE.fullmatch(password) or _BRACKETED_STAND_IN_RE.fullmatch(password):
        return False
    return password.lower() not in _NOT_A_PASSWORD


class _AuthCredentialsRecognizer(_CredentialSpanRecognizer):
    """Short HTTP credentials after their scheme (:data:`_AUTH_CREDENTIAL_RE`) and the password
    of curl's ``-u user:password``, as API_KEY.

    Why: a test or session token of 10 characters (``Bearer tok_9f8e7d``) is too short for the
    assigned-secret pattern's randomness test, and ``curl -u admin:S3cr3t`` has no
    ``password`` label; both leaked. Only the credential is the match, so the model still sees
    ``Authorization: Bearer <API_KEY_1>`` and ``curl -u admin:<API_KEY_1>``. The ``-u`` option
    counts only in a curl command line (``docker run -u 1000:1000`` is a uid and gid), and
    only its password (after the first ":") is replaced, as for a URL's credentials; a weak
    one only where it was found (:func:`_strong_secret`).
    """

    NAME = "SlmAuthCredentialsRecognizer"
    SCORE = 0.55  # an assigned secret's 0.6 and a vendor key's 0.95 win where they cover it

    def spans(self, text: str) -> list[tuple[int, int, bool]]:
        found: list[tuple[int, int]] = []
        for match in _AUTH_CREDENTIAL_RE.finditer(text):
            labelled = match.group("auth") is not None
            if not labelled and match.group("scheme").lower() != "bearer":
                continue  # "token abc123" in prose: only Bearer is a scheme without its header
            value = match.group("cred").rstrip(".")
            if auth_credential(value, labelled):
                found.append((match.start("cred"), match.start("cred") + len(value)))
        end = 0
        for curl in _CURL_RE.finditer(text):
            if curl.start() < end:
                continue  # in the command line already read
            limit = min(len(text), curl.end() + CURL_COMMAND_MAX_CHARS)
            stop = _COMMAND_END_RE.search(text, curl.end(), limit)
            end = stop.start() if stop else limit
            for option in _CURL_USER_RE.finditer(text, curl.end(), end):
                group = next(g for g in (1, 2, 3) if option.group(g) is not None)
                user, colon, password = option.group(group).partition(":")
                quoted = '"' if group == 1 else "'" if group == 2 else ""
                if colon and curl_password(password, quoted):
                    start = option.start(group) + len(user) + 1
                    found.append((start, start + len(password)))
        return [(a, b, _strong_secret(text[a:b])) for a, b in found]


class _FormattedPhoneRecognizer(PatternRecognizer):
    """:data:`PHONE_PATTERNS`, keeping only matches with a plausible count of digits (E.164)."""

    def __init__(self) -> None:
        super().__init__(
            supported_entity=PHONE_NUMBER,
            patterns=list(PHONE_PATTERNS),
            context=["phone", "call", "mobile", "cell", "tel"],
            supported_language="en",
            name="SlmFormattedPhoneRecognizer",
            global_regex_flags=_CASE_SENSITIVE,
        )

    def invalidate_result(self, pattern_text: str) -> bool:
        return not 8 <= sum(c.isdigit() for c in pattern_text) <= 15


def _build_analyzer(phone_regions: Sequence[str]) -> AnalyzerEngine:
    recognizers: list[EntityRecognizer] = [
        GluedEmailRecognizer(),
        PhoneRecognizer(supported_regions=tuple(phone_regions)),
        _FormattedPhoneRecognizer(),
        CreditCardRecognizer(
            patterns=[*CreditCardRecognizer.PATTERNS, *CARD_PATTERNS],
            replacement_pairs=_CARD_REPLACEMENT_PAIRS,
        ),
        IpRecognizer(),
        IbanRecognizer(
            patterns=list(IBAN_PATTERNS),  # type: ignore[arg-type]  # annotated List[str]
            replacement_pairs=_IBAN_REPLACEMENT_PAIRS,
        ),
        _SecretRecognizer(API_KEY, API_KEY_PATTERNS, ["key", "token"], "SlmApiKeyRecognizer"),
        _VendorKeyRecognizer(),
        _SecretRecognizer(
            API_KEY,
            ASSIGNED_SECRET_PATTERNS,
            [],
            "SlmAssignedSecretRecognizer",
            min_length=12,
            letters_only=True,
        ),
        _DiscordBotTokenRecognizer(),
        _BasicCredentialsRecognizer(),
        _UrlCredentialsRecognizer(),
        _LabelledSecretRecognizer(),
        _AuthCredentialsRecognizer(),
        _SecretRecognizer(JWT, JWT_PATTERNS, ["jwt", "bearer"], "SlmJwtRecognizer"),
        _SecretRecognizer(PRIVATE_KEY, PRIVATE_KEY_PATTERNS, ["key"], "SlmPrivateKeyRecognizer"),
    ]
    registry = RecognizerRegistry(recognizers=recognizers, supported_languages=["en"])
    return AnalyzerEngine(
        registry=registry,
        nlp_engine=BlankSpacyNlpEngine(),
        supported_languages=["en"],
        context_aware_enhancer=LinearContextEnhancer(),
    )


_DIGIT_RE = re.compile(r"\d")
# Four digits in one run of digits and separators: what every phone number either recognizer
# accepts holds. libphonenumber's matcher takes a number's candidate from digits, its
# punctuation (which has no letter or digit but "x", "X" and "ー"), opening brackets, plus
# signs, and extension labels; the formatted patterns from digits, whitespace, "+", ".", "-"
# and brackets. The labels count as separators because its parser spells a label it does not
# know as keypad digits ("089int 2" is +49 89 468, found only so). Any other letter or an
# underscore ends a run, so "2023" or "tel 0171 1234" passes and "v1.2 (3 items)" does not.
# No separator matches a digit, so the search stays linear.
_PHONE_SEPARATOR = (
    r"(?:[^\w]|[xX\uff58\uff38\u30fc]"  # x, X, fullwidth x and X, katakana's long vowel
    # libphonenumber's labels: ext, extension, extensión, xtn, fullwidth ext, доб, anexo, int
    r"|(?i:e?xt(?:ensi(?:o\u0301?|\u00f3))?n?|\uff45?\uff58\uff54\uff4e?"
    r"|\u0434\u043e\u0431|anexo|int|\uff49\uff4e\uff54))"
)
_PHONE_HINT_RE = re.compile(r"\d(?:" + _PHONE_SEPARATOR + r"*\d){3}")
# An IPv4 address has a digit, a dot and a digit in a row; every IPv6 form a colon next to a
# hex digit or another colon (Presidio's IpRecognizer patterns).
_IP_HINT_RE = re.compile(r"\d\.\d|[0-9A-Fa-f]:|:[0-9A-Fa-f:]")
# Presidio's IBAN pattern starts with the country code and check digits, case-sensitive.
_IBAN_HINT_RE = re.compile(r"[A-Z]{2}[0-9]{2}")
# What any API_KEY match needs: a vendor key is 16+ word characters or dashes in a row (their
# patterns, and looks_random's minimum length) or, for the few whose base64 body may be cut
# by "+", "/", "%" or ".", its prefix; an assigned secret or a bearer token its label,
# Basic credentials their label and 8 base64 characters, a URL's password its "://user:...@",
# a short HTTP credential its scheme or header's name, curl's password the word "curl", a
# password in a sentence or a login pair its label (:data:`_LABELLED_SECRET_HINT`).
_KEY_HINT_RE = re.compile(
    r"[\w-]{16,}|glc_|sntry[su]_|ops_eyJ|A{21}|pscale_|"
    + _SECRET_NAMES
    + r"|(?i:bearer|authorization)|(?i:basic)\s+[A-Za-z0-9+/]{8}|curl|"
    + _URL_CREDENTIALS_HINT
    + "|"
    + _LABELLED_SECRET_HINT
)


def possible_kinds(text: str, kinds: Sequence[str] = KINDS) -> tuple[str, ...]:
    """The kinds of ``kinds`` that ``text`` could hold at all, by cheap necessary conditions.

    Why: Presidio tokenises the text and runs every recognizer whatever it holds, and
    libphonenumber alone makes one matcher pass per region: about 0.75 ms per new string,
    which is what a capture worker spends most of its time on. Most agent text has no ``@``,
    few digits and no long token, so most strings need no recognizer at all, and the rest
    only those whose condition holds. Each condition is implied by every pattern and
    validator of its kind (an e-mail has an ``@``, a card 12+ digits, every key or password
    the recognizers accept is a 16+ character token or carries its label, a private key its
    ``PRIVATE KEY`` label...), so gating never changes what is found; unit tests hold the
    gated and ungated redactors equal on the labelled set, on edge cases at each condition's
    boundary and on generated mixtures.
    """
    digits = len(_DIGIT_RE.findall(text))

    def possible(kind: str) -> bool:
        if kind == EMAIL_ADDRESS:
            return "@" in text or "%40" in text
        if kind == PHONE_NUMBER:
            # libphonenumber's shortest national numbers have 4 digits (German pagers, and
            # numbers of AT, LU, NU, SH, TK, UY...), found without a "+" in their region,
            # and all of a number's digits are in one run of digits and separators.
            return digits >= 4 and _PHONE_HINT_RE.search(text) is not None
        if kind == CREDIT_CARD:
            return digits >= 12
        if kind == IBAN_CODE:
            # Only the check digits are sure to be digits: BH, KW, QA, LC... accounts may be
            # letters.
            return _IBAN_HINT_RE.search(text) is not None
        if kind == IP_ADDRESS:
            return _IP_HINT_RE.search(text) is not None
        if kind == JWT:
            return "eyJ" in text
        if kind == PRIVATE_KEY:
            return "PRIVATE KEY" in text
        return _KEY_HINT_RE.search(text) is not None  # API_KEY

    return tuple(k for k in kinds if possible(k))


#: Words of a JSON key whose integer is an identifier ("order_id", "contactId"), and those
#: whose integer is a time ("created_us", "updated_at_ms"): no card or phone number, unless
#: the key also speaks of payment or of calls (``_PAYMENT_KEY_RE``, ``_PHONE_KEY_RE``).
_ID_KEY_RE = re.compile(r"\b(?:id|ids|uuid|seq|sequence|idx|index)\b", re.IGNORECASE)
_TIME_KEY_RE = re.compile(
    r"\b(?:timestamp|ts|epoch|created|updated|modified|us|ms|ns)\b", re.IGNORECASE
)
_PAYMENT_KEY_RE = re.compile(
    r"\b(?:card|cc|pan|credit|debit|payment|pay|account|billing|method|wallet)", re.IGNORECASE
)
_PHONE_KEY_RE = re.compile(
    r"\b(?:phone|tel|telephone|mobile|cell|fax|msisdn|call|caller|callee|whatsapp|sms|dial)",
    re.IGNORECASE,
)
#: A key that names a version by its last word ("app_version", "firmware"): its four-part
#: value is no IP address. "build_server", "fw" (a firewall) or "v" name hosts or anything.
_VERSION_KEY_RE = re.compile(r"\b(?:version|ver|firmware|release|revision)$", re.IGNORECASE)
# The same words in Chinese, Japanese and Korean ("版本", "固件", "バージョン", "버전") before a
# four-part number ("固件版本2.0.0.1", "버전은 1.0.0.1"), with a "number" word, a colon of either
# width or an "is" particle, or two of them ("为" and a colon), between word and value; after
# it only when an upgrade verb comes right before the number ("升级到1.2.3.4版本"), since an
# address is often named before the device's version ("请检查192.168.1.20固件版本"); and the
# "第 … 条" that numbers a clause, chapter or section ("第1.2.3.4条规定"). An IP address glued to
# other words ("服务器IP是192.168.10.24吗") has none of them.
_CJK_VERSION_WORD = r"(?:版本?|固件|バージョン|버전)"
_CJK_VERSION_BEFORE_RE = re.compile(
    _CJK_VERSION_WORD
    + r"(?:\s*(?:号|號|番号|번호))?(?:\s*(?:[:\uff1a=]|是|为|為|は|은|는)){0,2}\s*$"
)
_CJK_VERSION_AFTER_RE = re.compile(r"\s*" + _CJK_VERSION_WORD)
_CJK_UPGRADE_BEFORE_RE = re.compile(
    r"(?:(?:升[级級]|更新|降[级級]|回[滚滾]|回退)[到至]|アップデート|アップグレード|업데이트|업그레이드)"
    r"\s*$"
)
_CJK_CLAUSE_BEFORE_RE = re.compile(r"第\s*$")
_CJK_CLAUSE_AFTER_RE = re.compile(r"\s*[条章节條節款]")


#: Marks the context (JSON key) of a JSON integer redacted as text (see _refine).
_INT_CONTEXT = "\x00int\x00"


def _key_words(context: str) -> str:
    """A JSON key as words: "customer_phone", "contactId" -> "customer phone", "contact Id"."""
    return re.sub(r"[_\W]+", " ", re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", context))


def _counts_up(value: str) -> bool:
    """Whether a card-shaped value is groups that each add one to the last (years, ids)."""
    groups = [int(g) for g in re.findall(r"\d+", value)]
    return len(groups) > 2 and all(b - a == 1 for a, b in itertools.pairwise(groups))


def _small_numbers(value: str) -> bool:
    """Whether a phone-shaped ``value`` is small numbers one space apart, two of them single
    digits: a page list ("1 2 3 ... 10"), scores ("5 4 4 5 3") or a sequence.

    A phone number's groups have two digits or more, but for a country code or the first digit
    of a national number ("33 1 42 68 53 00"); France's "01 42 68 53 00" has two in each.
    """
    sizes = [len(g) if g.isdigit() else 0 for g in value.split(" ")]
    return 0 not in sizes and max(sizes) <= 2 and sizes.count(1) >= 2


def _cjk_versioned(span: Span, written: str) -> bool:
    """Whether the words of Chinese, Japanese or Korean around ``span`` in ``written`` make its
    four-part number a version or a clause's number rather than an IP address.

    Read in the text as written: :func:`spaced_view` shows those words as spaces, so in the
    view ``固件版本2.0.0.1`` is a bare number, and was replaced as an address.
    """
    before = written[max(0, span.start - 40) : span.start]
    after = written[span.end : span.end + 40]
    upgraded = _CJK_UPGRADE_BEFORE_RE.search(before) and _CJK_VERSION_AFTER_RE.match(after)
    if _CJK_VERSION_BEFORE_RE.search(before) or upgraded:
        return True
    return bool(_CJK_CLAUSE_BEFORE_RE.search(before) and _CJK_CLAUSE_AFTER_RE.match(after))


def _refine(span: Span, text: str, context: str, written: str) -> Span | None:
    """Trim or drop the look-alikes common in agent traffic (see the module docstring).

    ``text`` is what the recognizers scanned (:func:`spaced_view`), ``written`` the same before
    its unspaced scripts were blanked, for the checks that read the words of those scripts.
    """
    before = text[max(0, span.start - 40) : span.start]
    after = text[span.end : span.end + 2]
    whole = span.start == 0 and span.end == len(text)  # the match is the whole JSON value
    # a JSON integer alone (redact_json_value marks its key): the key says what it is
    number = whole and context.startswith(_INT_CONTEXT)
    key_words = _key_words(context.removeprefix(_INT_CONTEXT)).strip()
    if span.kind == CREDIT_CARD and _counts_up(span.value):
        return None  # "2023\t2024\t2025\t2026": a table's header of years
    if (  # a 16-digit order id or a microsecond timestamp passes Luhn one time in ten
        span.kind == CREDIT_CARD
        and number
        and not _PAYMENT_KEY_RE.search(key_words)
        and (_ID_KEY_RE.search(key_words) or _TIME_KEY_RE.search(key_words))
    ):
        return None
    if span.kind == EMAIL_ADDRESS:
        # RFC 5322 allows "=" in the local part, so "user=jane@x.io" in a log line matches
        # whole; no real mailbox uses "=", the key does.
        local = at_sign_written(span.value).rsplit("@", 1)[0]
        cut = local.rfind("=") + 1
        # It allows "'" and "`" too, so "to='jane@x.io'" in code matched with the opening
        # quote, and got a placeholder of its own instead of the address's everywhere else.
        cut += len(local[cut:]) - len(local[cut:].lstrip("'`"))
        if cut:
            span = dataclasses.replace(span, start=span.start + cut, value=span.value[cut:])
        return None if _url_login(text, span) else span
    if span.kind == PHONE_NUMBER:
        prev = before[-1:]
        if prev and (prev.isalnum() or prev in "-_/#.@"):
            return None
        if after[:1] and (after[:1].isalnum() or after[:1] in "-_/"):
            return None
        if re.match(r"[.,]\d", after) or re.search(r"\d[.,]$", before):
            return None
        number_part = _PHONE_EXTENSION_LABEL_RE.split(span.value, maxsplit=1)[0].rstrip()
        if (
            "." in number_part
            and "+" not in number_part
            and not _DOTTED_PHONE_RE.fullmatch(number_part)
        ):
            return None  # "126.0.6478.127", "13.4050": versions and coordinates
        if _small_numbers(span.value):
            return None
        bare = _NEEDS_PHONE_CONTEXT_RE.fullmatch(span.value) is not None
        if number and _ID_KEY_RE.search(key_words) and not _PHONE_KEY_RE.search(key_words):
            return None  # "contact_id": an identifier, whatever "contact" suggests
        if bare and not _PHONE_CONTEXT_RE.search(before + " " + key_words):
            return None
        return span
    if span.kind == API_KEY and span.value[-1] in ".,:" and not after.startswith("@"):
        # The end of the sentence, not of the key; before "@" it is a URL password's own.
        value = span.value.rstrip(".,:")
        return dataclasses.replace(span, end=span.start + len(value), value=value)
    if span.kind == IP_ADDRESS and "." in span.value and ":" not in span.value:
        # "version 10.2.1.3" in text, {"app_version": "10.2.1.3"} in JSON
        versioned = (
            _VERSION_CONTEXT_RE.search(before)
            or _cjk_versioned(span, written)
            or (whole and _VERSION_KEY_RE.search(key_words))
        )
        return None if versioned else span
    return span


# Ends the authority of a URL (RFC 3986), or the URL itself in JSON, shell or prose.
_NOT_AUTHORITY_RE = re.compile(r"[\s/?#@\"'<>`\\]")
# After ``user@host``: an scp-style path (``:org/repo.git``, ``:~/x``, ``:/srv``).
_SCP_PATH_RE = re.compile(r":(?:[~/]|[\w.-]+/)")


def _url_login(text: str, span: Span) -> bool:
    """Whether an e-mail-shaped ``user@host`` is a login to a host rather than a mailbox.

    Two forms: a URL's userinfo and host (``ftp://anonymous@ftp.example.org``,
    ``ssh://git@gitlab.example.com:2222/g/p.git``, and ``://user:****@host`` whose masked
    password is no credential), and an scp-style remote (``git@github.com:org/repo.git``).
    Coding agents pass these around all the time; as ``<EMAIL_ADDRESS_1>:org/repo.git`` the
    model can no longer learn them, and ``git@github.com`` names no person. A real password
    in the URL is found by :class:`_UrlCredentialsRecognizer` whatever this says.
    """
    if "@" not in span.value:
        return False  # a "%40" is an "@" inside a URL's field, never the one before its host
    at = span.start + span.value.rfind("@")
    slashes = text.rfind("://", max(0, span.start - 256), span.start)
    # From the "://" to the "@", nothing may end the authority: not a path, a query, a quote.
    if slashes >= 0 and _NOT_AUTHORITY_RE.search(text, slashes + 3, at) is None:
        return True
    return _SCP_PATH_RE.match(text, span.end) is not None


def _resolve_overlaps(spans: Iterable[Span]) -> list[Span]:
    """Keep the best of overlapping matches.

    Secrets first: their patterns are the most specific, and a key glued to a host
    (``https://oauth2:glpat-...@gitlab.example.com``) also reads as an e-mail address. Then
    the highest score, the longest match, and the order of :data:`KINDS`.
    """
    priority = {kind: i for i, kind in enumerate(KINDS)}
    ranked = sorted(
        spans,
        key=lambda s: (s.kind not in SECRET_KINDS, -s.score, s.start - s.end, priority[s.kind]),
    )
    # Kept spans never overlap, so sorted by start their ends are sorted too, and a new span
    # overlaps one of them exactly when the last kept span starting before its end reaches
    # past its start: a binary search, where checking every kept span made a long log text
    # (thousands of addresses) take seconds per record, quadratically.
    kept: list[Span] = []
    starts: list[int] = []
    for span in ranked:
        j = bisect.bisect_left(starts, span.end) - 1
        if j >= 0 and kept[j].end > span.start:
            continue
        at = bisect.bisect_left(starts, span.start)
        starts.insert(at, span.start)
        kept.insert(at, span)
    return kept


def replace_spans(text: str, spans: Sequence[Span], state: RedactionState) -> str:
    """Splice placeholders into ``text``; ``spans`` must not overlap and be sorted by start."""
    out: list[str] = []
    pos = 0
    for span in spans:
        out.append(text[pos : span.start])
        out.append(state.placeholder(span.kind, span.value, span.record_wide))
        pos = span.end
    out.append(text[pos:])
    return "".join(out)


# A JSON key that is a plain identifier (see Redactor._redact_key): letters, "_" and "-",
# shorter than the shortest such string a recognizer accepts (20 characters: an AWS access
# key id of letters alone, "AKIA" and 16 more; RANDOM_LETTERS_MIN_CHARS letters).
_PLAIN_KEY_RE = re.compile(r"[A-Za-z_-]{0,19}")

#: Strings longer than this (characters) are cached by a 128-bit digest of their text, so the
#: span cache's memory stays bounded whatever the size of what agents send (see Redactor).
LONG_TEXT_CHARS = 2048

# A backslash escape as JSON (and most languages' string literals) writes one: a backslash and
# one character, "\u" and four hex digits, or Python's "\x" and two (a repr'd string in a log).
# Matched left to right, so the "\\" of an escaped backslash is one pair and the "n" after it
# stays a letter.
_ESCAPE_RE = re.compile(r"\\(?:u[0-9A-Fa-f]{4}|x[0-9A-Fa-f]{2}|.)", re.DOTALL)
# The escapes of whitespace whose letter would otherwise glue onto the next word.
_CONTROL_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "b": " ", "f": " "}


def _unescaped_char(match: re.Match[str]) -> str:
    """One escape as :func:`escape_view` shows it: what it stands for, padded to its length."""
    escape = match.group()
    if len(escape) == 2:
        char = _CONTROL_ESCAPES.get(escape[1])
        # The decoded character first: an escaped backslash then an escaped line break (a
        # shell's continued line) still reads as continued, as in the decoded text.
        return escape if char is None else char + " "
    char = chr(int(escape[2:], 16))
    pad = " " * (len(escape) - 1)
    if char.isspace():
        return char + pad
    if not char.isprintable():  # a control or zero-width character: a word break
        return " " + pad
    if char.isalnum():  # part of a word ("caf\u00e9"), as it was before
        return escape
    # Punctuation Go writes escaped (\u0026, \u003c, \u003e): next to what follows it, as in
    # "\u0026password=..." of a URL's query.
    return pad + char


def escape_view(text: str) -> str:
    """``text`` as the recognizers scan it: each JSON escape of whitespace or punctuation
    replaced by what it stands for, padded with spaces to the same length.

    Why: text that is not decoded as a JSON object or array (a tool result that is a JSON
    string literal, JSON-lines logs, a repr'd request body with Python's ``\\xa0``) keeps its
    escapes, and the letter of ``\\n`` glued onto the value after it: ``\\nghp_...`` had no
    word boundary before the key, ``\\n+1 415 555 0132`` looked like part of an identifier,
    and ``to:\\njane@x.io`` became ``to:\\<EMAIL_ADDRESS_1>`` (the address read as
    ``njane@x.io``). The view has the same length, so every offset found in it is the
    original's, and the values replaced are the original's text; a string without a
    backslash is its own view. Escapes of letters and digits (``caf\\u00e9``), quotes and
    backslashes stay as they are: they glue nothing, and the label rules read ``\\"``.
    """
    if "\\" not in text:
        return text
    return _ESCAPE_RE.sub(_unescaped_char, text)


# Letters of the scripts written without spaces between words (Chinese, Japanese, Thai, Lao,
# Khmer, Myanmar) and of Korean, whose particles are glued to the word before them. Their
# digits are left out: they are digits to every recognizer.
_UNSPACED_SCRIPT_RE = re.compile(
    "["
    "\u0e00-\u0e4f\u0e5a-\u0e7f"  # Thai
    "\u0e80-\u0ecf\u0eda-\u0eff"  # Lao
    "\u1000-\u103f\u104a-\u108f\u109a-\u109f"  # Myanmar
    "\u1100-\u11ff"  # Hangul Jamo
    "\u1780-\u17df\u17ea-\u17ff"  # Khmer
    "\u2e80-\u2fdf\u3005-\u3007\u3021-\u3029\u3031-\u3035\u303b\u303c"  # radicals, marks
    "\u3040-\u30ff\u3100-\u31ff"  # Hiragana, Katakana, Bopomofo, Hangul compatibility Jamo
    "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"  # CJK ideographs
    "\ua960-\ua97f\uac00-\ud7ff"  # Hangul syllables
    "\uff66-\uffdc"  # halfwidth Katakana and Hangul
    "\U00020000-\U0003134f"  # CJK ideographs, extensions B to H
    "]+"
)


def _glues(char: str) -> bool:
    """Whether ``char`` next to a run of an unspaced script could be part of a finding."""
    return char.isalnum() or char in "_+"


def _spaced_run(match: re.Match[str]) -> str:
    """A run of an unspaced script as :func:`spaced_view` shows it."""
    text, start, end = match.string, match.start(), match.end()
    before, after = text[start - 1 : start], text[end : end + 1]
    if "@" in (before, after) or not (_glues(before) or _glues(after)):
        return match.group()
    return " " * (end - start)


def spaced_view(view: str) -> str:
    """``view`` with each run of an unspaced script glued to a finding shown as spaces, one
    for each character, so that every offset stays the original's.

    Why: Chinese, Japanese and Thai put no space between words, and Korean glues its particles
    to the word before them, so an address, number or key sits right against letters that are
    word characters to a regex: ``メールはjane.doe@example.comです`` (the domain ran on into
    ``comです`` and failed its check), ``请拨打+86 138 0013 8000联系我``, ``IP是10.0.0.1吗``,
    ``卡号4111111111111111``, ``jane.doe@example.com으로`` were all left in clear, since every
    ``\\b``, every "not inside a longer word" test and the phone filters saw a letter where
    they wanted a separator. A run is kept as it is where it touches an "@" or glues to
    nothing (an address written in the script itself, ``info@日本語.jp``, ``用户@例子.中国``),
    so what was found before is still found.
    """
    return _UNSPACED_SCRIPT_RE.sub(_spaced_run, view)


class Redactor:
    """Finds and replaces PII and secrets; build once (about a second), reuse for every call.

    Meant to be shared (see :func:`default_redactor`): per-record numbering lives in the
    :class:`RedactionState` passed in, not on the instance.
    """

    def __init__(
        self,
        kinds: Iterable[str] = KINDS,
        phone_regions: Sequence[str] = DEFAULT_PHONE_REGIONS,
        cache_size: int = 4096,
        gate: bool = True,
    ) -> None:
        self.kinds: tuple[str, ...] = tuple(kinds)
        #: Skip the recognizers a string cannot satisfy (:func:`possible_kinds`); off only to
        #: check that gating changes nothing.
        self.gate = gate
        unknown = set(self.kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown kinds: {', '.join(sorted(unknown))}")
        self._analyzer = _build_analyzer(phone_regions)
        self._nlp: BlankSpacyNlpEngine = self._analyzer.nlp_engine  # type: ignore[assignment]
        # Agent calls repeat the same system prompt and tool results thousands of times; the
        # spans of a string don't depend on the record, only their placeholders do.
        self._find_cached = functools.lru_cache(maxsize=cache_size)(self._find)
        # Long strings are cached under a digest of their text, not the text: keyed by text,
        # 4096 tool results or documents of up to a request's 1 MiB could hold gigabytes in a
        # capture worker for as long as it ran.
        self._long: OrderedDict[tuple[bytes, str], tuple[Span, ...]] = OrderedDict()
        self._cache_size = cache_size
        # Messages the first pass found nothing in, by their serialised form (see
        # :meth:`_scan_message`); bounded like the span cache.
        self._clean: OrderedDict[bytes, None] = OrderedDict()

    def find(self, text: str, context: str = "") -> list[Span]:
        """Non-overlapping spans in ``text``; ``context`` (e.g. a JSON key) helps bare numbers."""
        return list(self._spans(text, context))

    def _spans(self, text: str, context: str) -> tuple[Span, ...]:
        """:meth:`find` without the copy: the cached tuple, () for blank text."""
        if not text or text.isspace():
            return ()
        if len(text) <= LONG_TEXT_CHARS:
            return self._find_cached(text, context)
        digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16)
        key = (digest.digest(), context)
        found = self._long.get(key)
        if found is not None:
            self._long.move_to_end(key)
            return found
        found = self._find(text, context)
        self._long[key] = found
        if len(self._long) > self._cache_size:
            self._long.popitem(last=False)
        return found

    def _find(self, text: str, context: str) -> tuple[Span, ...]:
        if len(text) > MAX_TEXT_CHARS:  # spaCy would refuse it only if a match were tokenized
            raise TextTooLong(f"text of {len(text)} characters is over {MAX_TEXT_CHARS}")
        # The same offsets as ``text``, whose characters are the values (see both views).
        written = escape_view(text)
        view = spaced_view(written)
        kinds = possible_kinds(view, self.kinds) if self.gate else self.kinds
        if not kinds:
            return ()
        results: list[RecognizerResult] = self._analyzer.analyze(
            text=view,
            language="en",
            entities=list(kinds),
            nlp_artifacts=LazyNlpArtifacts(self._nlp, view),
        )
        spans = [
            Span(
                r.entity_type,
                r.start,
                r.end,
                r.score,
                text[r.start : r.end],
                (r.recognition_metadata or {}).get(_RECORD_WIDE_KEY, True),
            )
            for r in results
            if r.score > 0 and not PLACEHOLDER_RE.fullmatch(text[r.start : r.end])
        ]
        refined = (_refine(s, view, context, written) for s in spans)
        return tuple(_resolve_overlaps(s for s in refined if s is not None))

    def redact_text(self, text: str, state: RedactionState | None = None, context: str = "") -> str:
        """``text`` with every finding replaced by its placeholder (numbered through ``state``)."""
        spans = self._spans(text, context)
        if not spans:
            return text
        return replace_spans(text, spans, state if state is not None else RedactionState())

    def redact_json_text(self, text: str, state: RedactionState | None = None) -> str:
        """Redact inside a JSON document's values and keep it valid JSON.

        Tool-call arguments and tool results are JSON strings; redacting them as flat text
        could cut through quotes or escapes (a PEM key's ``\\n``), and would miss a card number
        stored as a JSON number or a token whose only hint is its key (``{"api_key": "..."}``).
        Text that is not a JSON object or array is redacted as plain text. The original string
        is returned unchanged (formatting included) when nothing was found.
        """
        state = state if state is not None else RedactionState()
        stripped = text.lstrip()
        if not stripped.startswith(("{", "[")):
            return self.redact_text(text, state)
        try:
            doc = _loads(text)
        except (ValueError, RecursionError):  # not JSON, or nested too deep to decode
            return self.redact_text(text, state)
        before = sum(state.counts.values())
        redacted = self.redact_json_value(doc, state)
        if sum(state.counts.values()) == before:
            return text
        return json.dumps(redacted, ensure_ascii=False)

    def redact_json_value(
        self, value: Any, state: RedactionState, key: str = "", embedded: int = 0
    ) -> Any:
        """Walk decoded JSON and redact string values, long numbers and object keys.

        Keys are scanned too: tool results often key their data by the identifier itself
        (``{"jane@example.com": {"balance": 3}}``); such a key becomes its redacted form. Two
        keys may redact alike (``Jane@x.io`` and ``jane@x.io``, or two spellings of one phone
        number): each keeps its entry, the later one suffixed (:func:`_distinct_key`). A
        value under a key named like a secret is replaced whatever it looks like (only the
        credential after the scheme of an ``Authorization`` value). Encoded payloads
        (:func:`opaque_payload`) are left alone. A string that is itself a JSON object or
        array (a request body in a tool call's arguments) is walked as JSON, so its keys still
        count; ``embedded`` is how many such strings ``value`` is already inside
        (:meth:`_redact_embedded_json`).
        """
        if isinstance(value, str):
            if opaque_payload(value):
                return value
            inner = self._redact_embedded_json(value, state, key, embedded)
            if inner is not None:
                return inner
            redacted = self.redact_text(value, state, context=key)
            if redacted is value and (_secret_key_name(key) or _password_key(key)):
                return _redact_secret_value(value, state, key)
            return redacted
        if isinstance(value, dict):
            out: dict[Any, Any] = {}
            named = _named_value_key(value)
            for k, v in value.items():
                new_key = self._redact_key(k, state, key)  # numbered before the value, as ever
                context = named if named and k == "value" else str(k)
                if _secret_key_name(key) and str(k).lower() in _GENERIC_VALUE_KEYS:
                    context = key  # {"password": {"value": ...}}: still the password
                new_value = self.redact_json_value(v, state, context, embedded)
                out[_distinct_key(out, new_key) if new_key in out else new_key] = new_value
            return out
        if isinstance(value, (list, tuple)):  # a tuple from a Python caller, like a list
            return [self.redact_json_value(v, state, key, embedded) for v in value]
        if (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and abs(value) >= 1000
            and _password_key(key)
        ):
            # {"password": 20241999}, {"api_key": 98765432109876543210}: a number under a
            # secret's key is that secret, whatever the recognizers make of its digits; not
            # a flag or a small setting ({"require_pin": 1}, a GPIO {"pin": 13})
            return _key_secret(str(value), state)
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**6:
            as_text = str(value)
            redacted = self.redact_text(as_text, state, context=_INT_CONTEXT + key)
            return value if redacted == as_text else redacted
        return value

    def _redact_embedded_json(
        self, value: str, state: RedactionState, key: str, embedded: int
    ) -> str | None:
        """``value`` redacted as the JSON object or array it encodes; None when it is not one.

        Why: a tool call's ``{"body": "{\\"password\\": \\"hunter2xyz\\"}"}`` or a tool
        result wrapped in a string hid the key that makes its value a secret: as flat text the
        password had no label the key rule could see. Bounded: at most
        :data:`MAX_EMBEDDED_JSON_DEPTH` strings deep and :data:`MAX_EMBEDDED_JSON_CHARS` long
        (a longer one is redacted as text, as before). The string is re-encoded compactly only
        when something in it was replaced.
        """
        stripped = value.strip()
        if (
            embedded >= MAX_EMBEDDED_JSON_DEPTH
            or len(stripped) > MAX_EMBEDDED_JSON_CHARS
            or stripped[:1] not in ("{", "[")
            or stripped[-1:] not in ("}", "]")
        ):
            return None
        try:
            doc = _loads(stripped)
        except (ValueError, RecursionError):
            return None
        if not isinstance(doc, (dict, list)):
            return None
        before = state.counts.total()
        redacted = self.redact_json_value(doc, state, key, embedded + 1)
        if state.counts.total() == before:
            return value
        return json.dumps(redacted, ensure_ascii=False)

    def _redact_key(self, key: Any, state: RedactionState, context: str) -> Any:
        """A JSON object's key, redacted like a value unless it is a plain identifier.

        Why the shortcut: nearly every key is an identifier (``location``, ``x-request-id``),
        and sending each through the span cache beside the values pushed a worker's cache past
        its size on ordinary traffic, so that repeated records stopped hitting it (20x slower).
        Under 20 characters, ASCII letters, ``_`` and ``-`` alone cannot hold anything the
        recognizers accept: every kind needs an ``@``, a digit, whitespace, a dot or a colon
        (an API key a digit, see :func:`looks_random`; Basic credentials follow a space),
        except 20 characters or more (an AWS access key id can be letters only, and so can a
        random mixed-case token, :func:`random_letters`): longer keys are redacted like
        values. A property test holds this.
        """
        if not isinstance(key, str) or _PLAIN_KEY_RE.fullmatch(key):
            return key
        return self.redact_text(key, state, context=context)

    def redact_record(self, record: CallRecord) -> tuple[CallRecord, dict[str, int]]:
        """A copy of ``record`` with messages, tool calls and the response redacted.

        Returns the new record, whose ``redactions`` adds these counts to any it already had,
        and the counts of this pass per kind. Tool schemas (``tools``) are left alone: they
        are the developer's code, the same in every call, and the model must see them verbatim.
        """
        messages, response, counts = self.redact_messages(record.messages, record.response)
        if not counts:
            return record, {}
        total = Counter(record.redactions)
        total.update(counts)
        new = dataclasses.replace(
            record, messages=messages, response=response, redactions=dict(sorted(total.items()))
        )
        return new, counts

    def redact_messages(
        self, messages: list[dict[str, Any]], response: dict[str, Any]
    ) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, int]]:
        """:meth:`redact_record` on a record's parts: (messages, response, counts per kind).

        Two passes. The first runs the recognizers on every string. The second replaces,
        wherever else in the record they occur, the values the first gave placeholders
        (:class:`KnownValues`): a value is often recognisable only where its label or context
        is, and the tool call that uses it (what the model learns to emit) has neither. The
        second pass is skipped when the first found nothing, as for most records.

        The capture worker calls this on the decoded request and response directly, without
        building a CallRecord first; both are returned unchanged when nothing was found.
        """
        state = RedactionState(seed_from=[messages, response])
        scan = _ScanPass(self, state)
        new_messages = [self._scan_message(m, scan) for m in messages]
        new_response = self._scan_message(response, scan)
        if not state.counts:
            return messages, response, {}
        known = KnownValues(state.values)
        if known:
            again = _KnownValuesPass(known, state)
            new_messages = [_map_message(m, again) for m in new_messages]
            new_response = _map_message(new_response, again)
        return new_messages, new_response, {k: state.counts[k] for k in KINDS if state.counts[k]}

    def _scan_message(self, message: dict[str, Any], scan: _ScanPass) -> dict[str, Any]:
        """The first pass over one message, skipped for a message already found clean.

        Why: an agent resends its whole conversation on every call, so the system prompt, the
        user's turns, earlier tool calls and tool results arrive again and again, and walking
        them (decoding each tool call's arguments, looking every string up in the span cache)
        was most of a capture worker's time per record once the strings were cached. What the
        first pass finds in a message depends on its text alone (placeholders are numbered
        per record, but a clean message gets none), so a message found clean once is clean in
        any record. The second pass (:class:`KnownValues`) still walks every message.
        """
        key = _message_key(message)
        clean = self._clean
        if key is not None and key in clean:
            clean.move_to_end(key)
            return message
        before = scan.state.counts.total()
        out = _map_message(message, scan)
        if key is not None and scan.state.counts.total() == before:
            clean[key] = None
            if len(clean) > self._cache_size:
                clean.popitem(last=False)
        return out


#: How many JSON-encoded strings deep :meth:`Redactor.redact_json_value` decodes.
MAX_EMBEDDED_JSON_DEPTH = 4
#: The longest JSON-encoded string (characters) decoded inside a JSON value.
MAX_EMBEDDED_JSON_CHARS = 1 << 20


def _named_value_key(obj: dict[Any, Any]) -> str:
    """The name of a ``{"name": "DB_PASSWORD", "value": "..."}`` pair when it names a secret.

    Kubernetes env lists, HAR headers and many APIs spell a mapping as a list of such pairs;
    the value's own key, ``value``, says nothing, so the pair's name stands in for it.
    """
    if "value" not in obj:
        return ""
    for field_name in ("name", "key"):
        name = obj.get(field_name)
        if isinstance(name, str) and _secret_key_name(name):
            return name
    return ""


def _message_key(message: Any) -> bytes | None:
    """A message's identity for :meth:`Redactor._scan_message`: its JSON, or for a long one a
    128-bit digest of it (a bounded cache of long tool results must not hold megabytes);
    None when orjson is missing or cannot encode it (no caching then)."""
    if _orjson is None:
        return None
    try:
        raw: bytes = _orjson.dumps(message)
    except (TypeError, _orjson.JSONEncodeError):
        return None
    if len(raw) <= LONG_TEXT_CHARS:
        return raw  # JSON starts with "{" or "[": never equal to a digest key below
    return b"#" + hashlib.blake2b(raw, digest_size=16).digest()


class _Pass:
    """What one pass over a record does to each kind of field (see :func:`_map_message`)."""

    def text(self, text: str) -> str:
        """Free text: a message part's ``text``."""
        raise NotImplementedError

    def json_text(self, text: str) -> str:
        """A string that may hold JSON: message content, tool-call arguments."""
        raise NotImplementedError

    def value(self, value: Any, key: str) -> Any:
        """A decoded JSON value (or a plain string) stored under ``key``."""
        raise NotImplementedError

    def name(self, name: str) -> str:
        """A participant's ``name``: redacted like text, then made a valid name again."""
        redacted = self.text(name)
        return name if redacted == name else participant_name(redacted)

    def field(self, value: Any, key: str) -> Any:
        """A field of unknown shape: JSON text if it looks like it, else a value."""
        if isinstance(value, str) and value.lstrip().startswith(("{", "[")):
            return self.json_text(value)
        return self.value(value, key)


class _ScanPass(_Pass):
    """The first pass: the recognizers, with placeholders numbered through ``state``."""

    def __init__(self, redactor: Redactor, state: RedactionState) -> None:
        self.redactor = redactor
        self.state = state

    def text(self, text: str) -> str:
        return self.redactor.redact_text(text, self.state)

    def json_text(self, text: str) -> str:
        return self.redactor.redact_json_text(text, self.state)

    def value(self, value: Any, key: str) -> Any:
        return self.redactor.redact_json_value(value, self.state, key)


class _KnownValuesPass(_Pass):
    """The second pass: literal occurrences of :class:`KnownValues`, JSON decoded as needed."""

    def __init__(self, known: KnownValues, state: RedactionState) -> None:
        self.known = known
        self.state = state

    def text(self, text: str) -> str:
        return text if opaque_payload(text) else self.known.replace(text, self.state)

    def json_text(self, text: str) -> str:
        if opaque_payload(text):
            return text
        if not text.lstrip().startswith(("{", "[")):
            return self.known.replace(text, self.state)
        # Without a backslash, every decoded string is a substring of the text: nothing to do
        # unless some value occurs in it. With one, a value may be hidden by an escape
        # (Go writes "&" as "\u0026"), so the JSON is decoded.
        if "\\" not in text and not self.known.occurs_in(text):
            return text
        try:
            doc = _loads(text)
        except (ValueError, RecursionError):
            return self.known.replace(text, self.state)
        before = self.state.counts.total()
        redacted = self.value(doc, "")
        if self.state.counts.total() == before:
            return text
        return json.dumps(redacted, ensure_ascii=False)

    def value(self, value: Any, key: str) -> Any:
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            out: dict[Any, Any] = {}
            for k, v in value.items():
                new_key = self.known.replace(k, self.state) if isinstance(k, str) else k
                new_value = self.value(v, k)
                out[_distinct_key(out, new_key) if new_key in out else new_key] = new_value
            return out
        if isinstance(value, (list, tuple)):
            return [self.value(v, key) for v in value]
        if isinstance(value, int) and not isinstance(value, bool):
            as_text = str(value)  # a phone number stored as a JSON number
            redacted = self.known.replace(as_text, self.state)
            return value if redacted == as_text else redacted
        return value


def _map_message(message: dict[str, Any], p: _Pass) -> dict[str, Any]:
    """Apply ``p`` to every field of a message except the structural ones (role, ids, types).

    Walking all fields also covers ``refusal``, ``reasoning_content`` and whatever free-text
    field a provider adds next; every content-part type and every tool-call type is walked
    too, not only text parts and function calls. A participant's ``name`` is user data (a
    chat app puts the user's login or e-mail there): see :func:`participant_name`. On a
    ``tool`` or ``function`` message it names the function, the developer's code like the
    tool schemas, and is kept.
    """
    out: dict[str, Any] = {}
    tool_message = message.get("role") in _FUNCTION_ROLES
    for key, value in message.items():
        if key == "name" and isinstance(value, str) and not tool_message:
            out[key] = p.name(value)
        elif key in _STRUCTURAL_MESSAGE_KEYS:
            out[key] = value
        elif key == "content" and isinstance(value, list):
            out[key] = [_map_part(part, p) for part in value]
        elif key == "tool_calls" and isinstance(value, list):
            out[key] = [_map_tool_call(call, p) for call in value]
        elif key == "function_call" and isinstance(value, dict):
            out[key] = _map_call_body(value, p)
        elif isinstance(value, str):
            out[key] = p.json_text(value)
        else:
            out[key] = p.value(value, key)
    return out


def _map_part(part: Any, p: _Pass) -> Any:
    """A content part: its ``text``, and every other string it carries.

    Why all of them: an ``image_url`` part's URL can be a pre-signed link with a key id and an
    e-mail in its query string, a ``file`` part has a filename, an ``input_audio`` part a
    transcript field in some providers. Their base64 payloads (``data:`` URLs, audio data) are
    left alone (:func:`opaque_payload`). A part that is no object (a list of strings, a
    number) is scanned as a JSON value: the contract accepts it, so it reaches the log too.
    """
    if isinstance(part, str):
        return p.text(part)
    if isinstance(part, list):
        return [_map_part(item, p) for item in part]
    if not isinstance(part, dict):
        return p.value(part, "")
    out: dict[str, Any] = {}
    for key, value in part.items():
        if key in _STRUCTURAL_PART_KEYS:
            out[key] = value
        elif key == "text" and isinstance(value, str):
            out[key] = p.json_text(value)  # a tool result's text is often JSON
        else:
            out[key] = p.field(value, key)
    return out


def _map_tool_call(call: Any, p: _Pass) -> Any:
    """A tool call of any type: ``function`` (its arguments), ``custom`` (its free-text
    input), or whatever comes next; its id, type and tool name are kept. One that is no
    object (a string such as ``send_mail(to='jane@example.com')``, a list) is scanned as a
    JSON value, since the contract accepts it."""
    if not isinstance(call, dict):
        return p.field(call, "")
    out: dict[str, Any] = {}
    for key, value in call.items():
        if key in _STRUCTURAL_MESSAGE_KEYS:
            out[key] = value
        elif isinstance(value, dict):
            out[key] = _map_call_body(value, p)
        else:
            out[key] = p.field(value, key)
    return out


def _map_call_body(body: dict[str, Any], p: _Pass) -> dict[str, Any]:
    """``{"name": ..., "arguments": ...}`` or ``{"name": ..., "input": ...}``: all but the name."""
    out: dict[str, Any] = {}
    for key, value in body.items():
        if key == "name":
            out[key] = value
        elif key == "arguments" and isinstance(value, str):
            out[key] = p.json_text(value)
        elif key == "arguments":
            out[key] = p.value(value, "")
        else:
            out[key] = p.field(value, key)
    return out


# Message and tool-call fields that hold identifiers chosen by the agent framework, not user
# data. "name" is one in a tool call and on a message of _FUNCTION_ROLES (the tool's name);
# on other messages it is the participant's (see _map_message).
_STRUCTURAL_MESSAGE_KEYS = frozenset({"role", "name", "tool_call_id", "id", "type"})
_FUNCTION_ROLES = frozenset({"tool", "function"})
# The same in a content part: its type and the ids of uploaded files.
_STRUCTURAL_PART_KEYS = frozenset({"type", "id", "file_id"})
# What OpenAI accepts in a message's name; anything else in a redacted name becomes "_".
_NOT_NAME_CHARS_RE = re.compile(r"[^A-Za-z0-9_-]+")
#: OpenAI's limit on a message's name (characters).
MAX_NAME_CHARS = 64


def participant_name(redacted: str) -> str:
    """A redacted participant name made valid again: ``<EMAIL_ADDRESS_1>`` -> ``EMAIL_ADDRESS_1``.

    Why not keep the placeholder: OpenAI allows only ``[a-zA-Z0-9_-]`` (64 at most) in a
    message's ``name``, so a record with ``"name": "<EMAIL_ADDRESS_1>"`` would be refused
    when the gateway or a trainer replays it. Why not drop the field: the name tells
    participants of a multi-user chat apart, and its number still ties it to the same
    ``<EMAIL_ADDRESS_1>`` in the text. So each placeholder loses its brackets, any other
    character outside the allowed set becomes ``_`` (``Jane (<EMAIL_ADDRESS_1>)`` ->
    ``Jane_EMAIL_ADDRESS_1``), and the result is cut at 64 characters. Its number stays
    reserved on later passes (:meth:`RedactionState.seed`).
    """
    bare = PLACEHOLDER_RE.sub(r"\1_\2", redacted)
    return _NOT_NAME_CHARS_RE.sub("_", bare).strip("_")[:MAX_NAME_CHARS]


def _distinct_key(out: dict[Any, Any], key: Any) -> str:
    """``key`` suffixed ``#2``, ``#3``... to the first spelling not yet a key of ``out``.

    Why: two keys can redact to one placeholder (``Jane@x.io`` and ``jane@x.io`` are one
    address to the numbering, ``(415) 555-0132`` and ``415-555-0132`` one number), and a
    dict built from them kept only the last entry: data lost. A new number for the second
    would say they are different entities, which they are not, so both keep the placeholder
    and the later one is told apart by the suffix (``<EMAIL_ADDRESS_1>#2``).
    """
    n = 2
    while f"{key}#{n}" in out:
        n += 1
    return f"{key}#{n}"


#: Values shorter than this (characters) are not replaced record-wide: "555" or "1.2" would
#: turn up in unrelated text, and the first pass found them where they were PII.
MIN_KNOWN_VALUE_CHARS = 4


class KnownValues:
    """Values a record's first pass gave placeholders, to replace wherever else they occur.

    Why: recognizers need context. "call me at 4155550132" is a phone number, ``{"to":
    "4155550132"}`` a bare digit run; ``api_key=Zx81kq0Pa9LmW2vB7cQ4`` a key, the same string
    alone in the tool call nothing. Left there, the value is what the model learns to emit.

    Each occurrence gets the placeholder (and count) of the first finding. Matched literally:
    the value as found, as JSON would escape it, an e-mail in lower case, and a phone or card
    number's bare digits; never glued to a letter or digit on either side ("1645" is not
    replaced inside "16450"; in text that keeps JSON escapes, the letter of a ``\\n`` before
    it does not count, see :func:`escape_view`), and never under :data:`MIN_KNOWN_VALUE_CHARS`.

    Cost: one regex of every value, longest first, their common prefixes shared (a trie), so
    a string is scanned once in time that hardly depends on how many values there are (a
    megabyte in about 15 ms, with 3 values or 30,000; testing each value with ``in`` took
    9 s at 30,000). With a handful of values, ``in`` tests run first and the regex is only
    compiled (about 0.1 ms) for a record where some value does occur again.
    """

    #: Up to this many forms, substring tests decide whether the regex runs at all.
    PREFILTER_MAX_FORMS = 16

    def __init__(self, values: dict[str, str]) -> None:
        self._table: dict[str, tuple[str, str]] = {}
        for value, kind in values.items():
            core = value.strip()
            if kind == API_KEY and _BARE_SECRET_FIELD_RE.fullmatch(core):
                # A secret that is a secret's field name ("password": "password", a
                # placeholder or a test fixture) stays replaced where it was found; elsewhere
                # in the record that word is the field's name: replaced there, the tool
                # call's argument became "<API_KEY_1>" and the prose "the <API_KEY_1> is".
                continue
            forms = {core}
            if not (core.isascii() and core.isprintable()) or '"' in core or "\\" in core:
                forms.add(json.dumps(core)[1:-1])  # as JSON text would spell it
                forms.add(json.dumps(core, ensure_ascii=False)[1:-1])
            if kind == EMAIL_ADDRESS:
                forms.add(core.lower())
            elif kind == PHONE_NUMBER:
                forms.update(phone_forms(core)[1:])
            elif kind == CREDIT_CARD:
                digits = normalize_value(kind, core)
                forms.update((digits, digits.lstrip("+")))
            forms.update([escape_view(form) for form in forms])  # as replace() reads them
            for form in forms:
                if len(form) >= MIN_KNOWN_VALUE_CHARS:
                    self._table.setdefault(form, (kind, value))
        self._forms = list(self._table)
        self._regex: re.Pattern[str] | None = None

    def __bool__(self) -> bool:
        return bool(self._forms)

    def occurs_in(self, text: str) -> bool:
        """Whether any value occurs in ``text`` (with many values, only where it would be
        replaced)."""
        if len(self._forms) <= self.PREFILTER_MAX_FORMS:
            return any(form in text for form in self._forms)
        return self._pattern().search(text) is not None

    def replace(self, text: str, state: RedactionState) -> str:
        """``text`` with every known value replaced by its placeholder, counted in ``state``."""
        if len(self._forms) <= self.PREFILTER_MAX_FORMS and not self.occurs_in(text):
            return text

        def placeholder(match: re.Match[str]) -> str:
            kind, value = self._table[match.group()]
            return state.placeholder(kind, value)

        view = escape_view(text)
        if view is text:
            return self._pattern().sub(placeholder, text)
        # Found in the view, where "\n" does not glue its letter onto the value after it (as
        # for the recognizers); replaced in the text, at the same offsets.
        out: list[str] = []
        pos = 0
        for match in self._pattern().finditer(view):
            out += (text[pos : match.start()], placeholder(match))
            pos = match.end()
        out.append(text[pos:])
        return "".join(out)

    def _pattern(self) -> re.Pattern[str]:
        if self._regex is None:
            self._regex = re.compile(
                r"(?<![0-9A-Za-z])(?:" + _trie_regex(self._forms) + r")(?![0-9A-Za-z])"
            )
        return self._regex


def _trie_regex(words: Iterable[str]) -> str:
    """A regex matching any of ``words``, the longest where several match at one position.

    Alternatives share their common prefixes, so at each position of the text the regex
    follows one path of the trie instead of trying every word in turn.
    """
    trie: dict[str, Any] = {}
    for word in words:
        node = trie
        for char in word:
            node = node.setdefault(char, {})
        node[""] = {}  # a word ends here

    def build(node: dict[str, Any]) -> str:
        branches = []
        for char in sorted(c for c in node if c):
            run, child = [char], node[char]
            while len(child) == 1 and "" not in child:  # a chain: one literal, no group
                ((char, child),) = child.items()
                run.append(char)
            branches.append(re.escape("".join(run)) + build(child))
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        # Greedy: the longer words through this node are tried before the one ending here.
        return "(?:" + body + ")?" if "" in node else body

    return build(trie)


#: Bare base64 at least this long (characters) is an encoded payload, not text to scan.
OPAQUE_MIN_CHARS = 1024
_BASE64_PAYLOAD_RE = re.compile(r"[A-Za-z0-9+/_\-\r\n]+={0,2}")


def opaque_payload(value: str) -> bool:
    """Whether ``value`` is an encoded payload (left alone) rather than text (scanned).

    Image, audio and file parts carry their bytes as ``data:...;base64,`` URLs or bare base64,
    often megabytes of it. Scanned, such a payload costs the recognizers' full price per
    character (every base64 run reads as a possible key, every digit as a possible phone
    number) to find only chance look-alikes, and replacing one would corrupt the file. What it
    encodes (text in a PDF or a screenshot) is therefore not redacted. Ordinary URLs are still
    scanned: pre-signed links carry key ids and addresses in their query strings, and so are
    ``data:`` URLs that are not base64 (``data:text/plain,...``).
    """
    if value.startswith("data:"):
        header = value[:256].split(",", 1)
        return len(header) == 2 and header[0].lower().endswith(";base64")
    return len(value) >= OPAQUE_MIN_CHARS and _BASE64_PAYLOAD_RE.fullmatch(value) is not None


@functools.lru_cache(maxsize=4096)
def _secret_key_name(key: str) -> bool:
    """Whether a JSON key names a secret (``api_key``, ``password``...); keys repeat, so cached."""
    return _SECRET_KEY_NAME_RE.fullmatch(key) is not None


def _redact_secret_value(value: str, state: RedactionState, key: str = "") -> str:
    """A value under a key named like a secret, with its secret replaced (if it has one).

    The whole value when it is one password-like token; the credential alone when it is an
    authorization value (``Basic dXNlcjpwYXNz`` or a short ``Bearer`` token, which the
    recognizers miss out of context); each cookie's value under a ``Cookie`` key
    (``sessionid=<API_KEY_1>; Path=/``); nothing when a ``pwd`` key holds a path.
    """
    if "cookie" in key.lower():
        return redact_cookie_values(value, state)
    if _PWD_KEY_RE.fullmatch(key) and _PATH_VALUE_RE.fullmatch(value.strip()):
        return value
    if _secret_value(value) or (_password_key(key) and re.fullmatch(r"\d{4,}", value.strip())):
        return _key_secret(value, state)  # a PIN or a one-time code is short
    match = _AUTH_SCHEME_VALUE_RE.fullmatch(value)
    if match and _secret_value(match.group(2)):
        start, end = match.span(2)
        return value[:start] + _key_secret(match.group(2), state) + value[end:]
    if (
        not match
        and _password_key(key)
        and _PASSPHRASE_RE.fullmatch(value.strip())
        and not PLACEHOLDER_RE.search(value)
    ):
        # "correct horse battery staple": spaced, so no password-like token, but under a
        # secret's key it is the secret all the same
        return _key_secret(value, state)
    return value


def _key_secret(value: str, state: RedactionState) -> str:
    """The placeholder of a secret known only by its key, replaced elsewhere in the record
    only when it is strong (:func:`_strong_secret`): ``{"auth": "required"}`` is a secret
    under its key, not in "Authentication is required"."""
    return state.placeholder(API_KEY, value, record_wide=_strong_secret(value.strip()))


#: A secret's key whose value is that secret also as a number, a short code or a spaced
#: phrase: a password, a PIN, a one-time code, an API or secret key; its last word decides
#: (``userPassword``, ``client_secret``, ``stripeApiKey``). Not "token", "auth" or "pass"
#: ({"page_token": 2}, {"auth": "not required"}, {"tests_pass": 10}): settings, not secrets.
_PASSWORD_WORDS = frozenset(
    {"password", "passwd", "passphrase", "passcode", "pin", "secret", "otp"}
)
_PASSWORD_PAIRS = frozenset(
    {("api", "key"), ("secret", "key"), ("access", "key"), ("private", "key")}
)


@functools.lru_cache(maxsize=4096)
def _password_key(key: str) -> bool:
    """Whether ``key`` names a password-like secret (see above); keys repeat, so cached: it
    is asked of every JSON string value the recognizers leave alone."""
    words = _key_words(key).lower().split()
    if not words:
        return False
    return (
        words[-1] in _PASSWORD_WORDS
        or words[-1] == "apikey"
        or tuple(words[-2:]) in _PASSWORD_PAIRS
    )


#: Keys that hold "the value" of whatever their parent names (see redact_json_value).
_GENERIC_VALUE_KEYS = frozenset({"value", "val", "current", "new", "old", "plain", "plaintext"})

#: A passphrase as a JSON secret value: two to eight words, 12 to 200 characters in all.
_PASSPHRASE_RE = re.compile(r"(?=.{12,200}$)\S+(?:\s+\S+){1,7}")


def redact_cookie_values(value: str, state: RedactionState) -> str:
    """A ``Cookie`` or ``Set-Cookie`` value with each cookie's value replaced.

    The names and Set-Cookie's attributes stay (``sessionid=<API_KEY_1>; Path=/``): they say
    which session mechanism an API uses and hold no secret. Values too short or spaced to be a
    session id (``lang=en``) stay too, by :func:`_secret_value`'s rule.
    """
    out: list[str] = []
    pos = 0
    for match in _COOKIE_PAIR_RE.finditer(value):
        name, secret = match.group(1), match.group(2)
        if name.lower() in _COOKIE_ATTRIBUTES or not _secret_value(secret):
            continue
        if _URL_PASSWORD_STAND_IN_RE.fullmatch(secret):
            continue
        out.append(value[pos : match.start(2)])
        out.append(_key_secret(secret, state))
        pos = match.end(2)
    if not out:
        return value
    out.append(value[pos:])
    return "".join(out)


def _secret_value(value: str) -> bool:
    """A value stored under a key named like a secret: anything password-like counts."""
    v = value.strip()
    return len(v) >= 6 and not any(c.isspace() for c in v) and not PLACEHOLDER_RE.search(v)


def _loads(text: str) -> Any:
    """``json.loads``, through orjson when it is installed and accepts the text (4-5x faster).

    orjson refuses what the standard library accepts in a few corners (NaN, integers wider
    than 64 bits, lone surrogates); those fall back to ``json``, so what is decoded, and so
    what is redacted, never depends on whether orjson is there.
    """
    if _orjson is not None:
        try:
            return _orjson.loads(text)
        except _orjson.JSONDecodeError:
            pass
    return json.loads(text)


@functools.cache
def default_redactor() -> Redactor:
    """The process-wide redactor with default settings, built on first use."""
    return Redactor()
