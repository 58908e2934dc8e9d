"""Generate ``labelled.jsonl``: strings an agent might send to an LLM, with the PII in each.

Why generated: real call logs with real PII cannot be committed, and hand-typed examples drift
towards whatever the detector already finds. This script writes agent-style text (requests,
tool-call argument JSON, log lines, config snippets) around values built the way the real ones
are: card numbers with a valid Luhn digit for each brand's prefix, IBANs with correct ISO 7064
check digits in each country's layout, phone numbers in national and international formats,
keys in each vendor's format with random bodies. About a third of the lines are negatives that
look like PII (versions, dates, order ids, UUIDs, hashes, prices, paths, invalid-Luhn cards,
IBANs with a wrong checksum) and must be left alone.

Each line: ``{"text": ..., "entities": [{"kind": ..., "value": ...}]}`` where ``value`` is the
exact substring a detector should report. Deterministic: ``python make_labelled.py`` rewrites
the same file byte for byte.
"""

from __future__ import annotations

import base64
import json
import random
import string
from collections.abc import Callable
from pathlib import Path

SEED = 20250611
OUT = Path(__file__).with_name("labelled.jsonl")

ALNUM = string.ascii_letters + string.digits
UPPER_DIGITS = string.ascii_uppercase + string.digits

Example = tuple[str, list[tuple[str, str]]]


def rand(rng: random.Random, alphabet: str, n: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


# ---------------------------------------------------------------- values


def luhn_check_digit(partial: str) -> str:
    total = 0
    for i, ch in enumerate(reversed(partial)):
        d = int(ch)
        if i % 2 == 0:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return str((10 - total % 10) % 10)


CARD_BRANDS: list[tuple[str, Callable[[random.Random], str], int]] = [
    ("Visa", lambda r: "4" + rand(r, string.digits, 5), 16),
    ("Mastercard", lambda r: str(r.randint(51, 55)) + rand(r, string.digits, 4), 16),
    ("Mastercard", lambda r: str(r.randint(2221, 2720)) + rand(r, string.digits, 2), 16),
    ("Amex", lambda r: r.choice(["34", "37"]) + rand(r, string.digits, 4), 15),
    ("Discover", lambda r: "6011" + rand(r, string.digits, 2), 16),
    ("Discover", lambda r: "65" + rand(r, string.digits, 4), 16),
    ("JCB", lambda r: str(r.randint(3528, 3589)) + rand(r, string.digits, 2), 16),
    ("Diners Club", lambda r: "36" + rand(r, string.digits, 4), 14),
    ("UnionPay", lambda r: "62" + rand(r, string.digits, 4), 16),
]


def card_number(rng: random.Random, brand_index: int | None = None) -> tuple[str, str]:
    brand, prefix, length = CARD_BRANDS[
        rng.randrange(len(CARD_BRANDS)) if brand_index is None else brand_index
    ]
    body = prefix(rng)
    body += rand(rng, string.digits, length - 1 - len(body))
    return brand, body + luhn_check_digit(body)


def format_card(rng: random.Random, digits: str) -> str:
    style = rng.choice(["space", "dash", "plain", "space"])
    if style == "plain":
        return digits
    sep = " " if style == "space" else "-"
    if len(digits) == 15 or len(digits) == 14:
        groups = [digits[:4], digits[4:10], digits[10:]]
    else:
        groups = [digits[i : i + 4] for i in range(0, len(digits), 4)]
    return sep.join(groups)


def break_luhn(digits: str) -> str:
    last = int(digits[-1])
    return digits[:-1] + str((last + 1 + (last % 3)) % 10)


# country: (BBAN generator, group output in 4s?)
IBAN_LAYOUTS: dict[str, Callable[[random.Random], str]] = {
    "DE": lambda r: rand(r, string.digits, 18),
    "GB": lambda r: rand(r, string.ascii_uppercase, 4) + rand(r, string.digits, 14),
    "FR": lambda r: (
        rand(r, string.digits, 10) + rand(r, UPPER_DIGITS, 11) + rand(r, string.digits, 2)
    ),
    "ES": lambda r: rand(r, string.digits, 20),
    "IT": lambda r: (
        rand(r, string.ascii_uppercase, 1) + rand(r, string.digits, 10) + rand(r, string.digits, 12)
    ),
    "NL": lambda r: rand(r, string.ascii_uppercase, 4) + rand(r, string.digits, 10),
    "CH": lambda r: rand(r, string.digits, 5) + rand(r, string.digits, 12),
    "BE": lambda r: rand(r, string.digits, 12),
    "AT": lambda r: rand(r, string.digits, 16),
    "PL": lambda r: rand(r, string.digits, 24),
    "IE": lambda r: rand(r, string.ascii_uppercase, 4) + rand(r, string.digits, 14),
}


def iban_check_digits(country: str, bban: str) -> str:
    rearranged = bban + country + "00"
    numeric = "".join(str(int(c, 36)) for c in rearranged)
    return f"{98 - int(numeric) % 97:02d}"


def iban(rng: random.Random, country: str, grouped: bool, valid: bool = True) -> str:
    bban = IBAN_LAYOUTS[country](rng)
    check = iban_check_digits(country, bban)
    if not valid:
        check = f"{(int(check) + 37) % 97 + 2:02d}"
    compact = country + check + bban
    if not grouped:
        return compact
    return " ".join(compact[i : i + 4] for i in range(0, len(compact), 4))


FIRST = [
    "jane",
    "marc",
    "priya",
    "oliver",
    "sofia",
    "chen",
    "amir",
    "lena",
    "tom",
    "fatima",
    "lucas",
    "yuki",
    "maria",
    "david",
    "ingrid",
    "kwame",
    "elena",
    "raj",
    "noah",
    "zoe",
]
LAST = [
    "doe",
    "schulz",
    "sharma",
    "bennett",
    "rossi",
    "wei",
    "haddad",
    "fischer",
    "nguyen",
    "okafor",
    "silva",
    "tanaka",
    "garcia",
    "kowalski",
    "larsen",
    "mensah",
    "petrova",
]
DOMAINS = [
    "acme.io",
    "example.com",
    "firma.de",
    "shop.example.co.uk",
    "mail.co.in",
    "university.edu",
    "startup.dev",
    "gmail.com",
    "outlook.com",
    "corp.internal",
    "contoso.org",
    "agency.fr",
    "bank-online.nl",
    "cloud.example.net",
    "proton.me",
]


def email(rng: random.Random) -> str:
    f, last = rng.choice(FIRST), rng.choice(LAST)
    local = rng.choice(
        [
            f"{f}.{last}",
            f"{f[0]}.{last}",
            f"{f}_{last[0]}",
            f"{f}{rng.randint(1, 99)}",
            f"{f}+{rng.choice(['billing', 'test', 'news'])}",
            f"{last}-{f}",
            rng.choice(["support", "billing", "ops-team", "no-reply", "hr"]),
        ]
    )
    if rng.random() < 0.15:
        local = local.capitalize()
    return f"{local}@{rng.choice(DOMAINS)}"


US_AREA = ["212", "415", "312", "617", "206", "512", "303", "646", "718", "305", "404", "213"]


def us_digits(rng: random.Random) -> tuple[str, str, str]:
    exch = rng.choice(["555", str(rng.randint(201, 989))])
    line = f"01{rng.randint(0, 99):02d}" if exch == "555" else f"{rng.randint(0, 9999):04d}"
    return rng.choice(US_AREA), exch, line


def phone(rng: random.Random, style: str) -> str:
    d = lambda n: rand(rng, string.digits, n)  # noqa: E731
    if style == "us_paren":
        a, e, n = us_digits(rng)
        return f"({a}) {e}-{n}"
    if style == "us_dash":
        a, e, n = us_digits(rng)
        return f"{a}-{e}-{n}"
    if style == "us_dot":
        a, e, n = us_digits(rng)
        return f"{a}.{e}.{n}"
    if style == "us_intl":
        a, e, n = us_digits(rng)
        return rng.choice(
            [f"+1 {a} {e} {n}", f"+1-{a}-{e}-{n}", f"+1 ({a}) {e}-{n}", f"+1{a}{e}{n}"]
        )
    if style == "us_555":
        return f"(555) {rng.randint(200, 999)}-{d(4)}"
    if style == "us_tollfree":
        return f"1-{rng.choice(['800', '888', '877'])}-555-01{d(2)}"
    if style == "uk_intl":
        return rng.choice(
            [
                f"+44 20 7946 0{d(3)}",
                f"+44 7700 900{d(3)}",
                f"+44 161 496 0{d(3)}",
                f"+44 (0)20 7946 0{d(3)}",
            ]
        )
    if style == "uk_nat":
        return rng.choice([f"020 7946 0{d(3)}", f"07700 900{d(3)}", f"0161 496 0{d(3)}"])
    if style == "de_intl":
        return rng.choice(
            [
                f"+49 30 {rng.randint(2, 9)}{d(6)}",
                f"+49 (0)89 {rng.randint(2, 9)}{d(6)}",
                f"+49 170 {d(7)}",
                f"+49 40 {rng.randint(2, 9)}{d(5)}",
                f"+49-69-{rng.randint(2, 9)}{d(6)}",
            ]
        )
    if style == "de_nat":
        return rng.choice(
            [f"030 {rng.randint(2, 9)}{d(6)}", f"0171 {d(7)}", f"089/{rng.randint(2, 9)}{d(6)}"]
        )
    if style == "fr":
        return rng.choice(
            [
                f"+33 1 {d(2)} {d(2)} {d(2)} {d(2)}",
                f"+33 6 {d(2)} {d(2)} {d(2)} {d(2)}",
                f"01 {d(2)} {d(2)} {d(2)} {d(2)}",
            ]
        )
    if style == "in":
        return f"+91 {rng.choice('6789')}{d(4)} {d(5)}"
    if style == "au":
        return rng.choice([f"+61 2 {rng.randint(8, 9)}{d(3)} {d(4)}", f"+61 4{d(2)} {d(3)} {d(3)}"])
    if style == "other_intl":
        return rng.choice(
            [
                f"+31 20 {rng.randint(2, 9)}{d(2)} {d(4)}",
                f"+34 6{d(2)} {d(2)} {d(2)} {d(2)}",
                f"+39 06 {rng.randint(2, 9)}{d(3)} {d(4)}",
                f"+65 6{d(3)} {d(4)}",
                f"+353 1 {rng.randint(2, 9)}{d(2)} {d(4)}",
                f"+81 3-{d(4)}-{d(4)}",
            ]
        )
    raise ValueError(style)


PHONE_STYLES = [
    "us_paren",
    "us_dash",
    "us_dot",
    "us_intl",
    "us_555",
    "us_tollfree",
    "uk_intl",
    "uk_nat",
    "de_intl",
    "de_nat",
    "fr",
    "in",
    "au",
    "other_intl",
]


def ipv4(rng: random.Random) -> str:
    kind = rng.choice(["10", "192", "172", "public", "doc"])
    if kind == "10":
        return f"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
    if kind == "192":
        return f"192.168.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
    if kind == "172":
        return f"172.{rng.randint(16, 31)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
    if kind == "doc":
        return f"{rng.choice(['203.0.113', '198.51.100'])}.{rng.randint(1, 254)}"
    return (
        f"{rng.randint(11, 223)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
    )


def ipv6(rng: random.Random) -> str:
    h = lambda: f"{rng.randint(0, 0xFFFF):x}"  # noqa: E731
    return rng.choice(
        [
            f"2001:db8:{h()}:{h()}::{h()}",
            f"fe80::{h()}:{h()}:{h()}:{h()}",
            f"2a01:4f8:{h()}:{h()}:{h()}:{h()}:{h()}:{h()}",
            f"2606:4700:{h()}::{h()}",
        ]
    )


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def jwt(rng: random.Random) -> str:
    header = {"alg": rng.choice(["HS256", "RS256", "ES256"]), "typ": "JWT"}
    if rng.random() < 0.4:
        header["kid"] = rand(rng, ALNUM, 12)
    payload = {
        "sub": str(rng.randint(10**6, 10**9)),
        "iat": 1_700_000_000 + rng.randint(0, 10**7),
        "exp": 1_710_000_000 + rng.randint(0, 10**7),
        "scope": rng.choice(["read:orders", "openid profile", "admin", "calendar.write"]),
    }
    sig_len = {"HS256": 32, "RS256": 256, "ES256": 64}[header["alg"]]
    sig = bytes(rng.randrange(256) for _ in range(sig_len))
    return ".".join(
        [b64url(json.dumps(header).encode()), b64url(json.dumps(payload).encode()), b64url(sig)]
    )


def pem(rng: random.Random) -> str:
    label = rng.choice(
        [
            "RSA PRIVATE KEY",
            "PRIVATE KEY",
            "EC PRIVATE KEY",
            "OPENSSH PRIVATE KEY",
            "ENCRYPTED PRIVATE KEY",
        ]
    )
    body = base64.b64encode(bytes(rng.randrange(256) for _ in range(rng.randint(90, 400)))).decode()
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return f"-----BEGIN {label}-----\n" + "\n".join(lines) + f"\n-----END {label}-----"


def api_key(rng: random.Random, style: str) -> str:
    tail = lambda n: rand(rng, ALNUM, n)  # noqa: E731
    if style == "openai_proj":
        return "sk-proj-" + rand(rng, ALNUM + "-_", 124) + "A"
    if style == "openai_legacy":
        return "sk-" + tail(20) + "T3BlbkFJ" + tail(20)
    if style == "openai_svc":
        return "sk-svcacct-" + rand(rng, ALNUM + "-_", 70) + "9"
    if style == "anthropic":
        return "sk-ant-api03-" + rand(rng, ALNUM + "-_", 93) + "AA"
    if style == "github_classic":
        return rng.choice(["ghp_", "gho_", "ghs_"]) + tail(36)
    if style == "github_pat":
        return "github_pat_11" + rand(rng, UPPER_DIGITS, 20) + "_" + tail(59)
    if style == "gitlab":
        return "glpat-" + rand(rng, ALNUM + "-_", 19) + "x"
    if style == "aws":
        return rng.choice(["AKIA", "ASIA"]) + rand(rng, UPPER_DIGITS, 16)
    if style == "slack":
        return (
            f"{rng.choice(['xoxb', 'xoxp'])}-{rng.randint(10**10, 10**12)}-"
            f"{rng.randint(10**10, 10**12)}-{tail(24)}"
        )
    if style == "slack_webhook":
        return (
            f"https://hooks.slack.com/services/T{rand(rng, UPPER_DIGITS, 8)}/"
            f"B{rand(rng, UPPER_DIGITS, 10)}/{tail(24)}"
        )
    if style == "google":
        return "AIza" + rand(rng, ALNUM + "-_", 34) + "Q"
    if style == "stripe":
        return f"{rng.choice(['sk', 'rk'])}_{rng.choice(['live', 'test'])}_" + tail(
            rng.choice([24, 99])
        )
    if style == "hf":
        return "hf_" + tail(34)
    if style == "sendgrid":
        return "SG." + rand(rng, ALNUM + "-_", 22) + "." + rand(rng, ALNUM + "-_", 43)
    if style == "npm":
        return "npm_" + tail(36)
    if style == "hex32":
        return rand(rng, "0123456789abcdef", 32)
    if style == "b64_40":
        return rand(rng, ALNUM + "/+", 40)
    if style == "random_mixed":
        return rand(rng, ALNUM, rng.randint(24, 48))
    raise ValueError(style)


# ---------------------------------------------------------------- positive templates


def email_examples(rng: random.Random, n: int) -> list[Example]:
    templates = [
        "Send the signed contract to {v} before Friday.",
        "Please reply to {v} with the tracking number.",
        "Draft an email to {v} saying the deploy is delayed.",
        "cc: {v}",
        "The customer ({v}) asked for a refund on order ORD-2024-{n}.",
        'Call send_email with to="{v}" and subject "Q3 report".',
        "From: Support Team <{v}>",
        "Add {v} as a reviewer on the pull request.",
        "Is {v} subscribed to the weekly newsletter?",
        "user={v} action=login status=failed",
        "Forward the invoice to {v}; they handle accounts payable.",
        "My email is {v}, can you reset my password?",
        "Schedule a meeting with {v} and {w} next Tuesday at 10am.",
        '{{"recipient": "{v}", "template": "welcome_v2"}}',
        "Notify on-call ({v}) if the error rate stays above 2%.",
        "Unsubscribe {v} from all marketing lists.",
    ]
    out: list[Example] = []
    for i in range(n):
        t = templates[i % len(templates)]
        v, w = email(rng), email(rng)
        text = t.format(v=v, w=w, n=rng.randint(10000, 99999))
        ents = [("EMAIL_ADDRESS", v)] + ([("EMAIL_ADDRESS", w)] if "{w}" in t else [])
        out.append((text, ents))
    return out


def phone_examples(rng: random.Random, n: int) -> list[Example]:
    templates = [
        "Call the customer back at {v} about the damaged parcel.",
        "My phone number is {v}.",
        "Text {v} when the driver is 10 minutes away.",
        "Contact: Dr. Weber, tel. {v}",
        "The hotel's front desk can be reached on {v}.",
        'create_contact(name="Dispatch", phone="{v}")',
        "Reschedule the appointment and confirm by SMS to {v}",
        "If nobody answers, try the mobile: {v}",
        "Caller ID showed {v} at 14:32.",
        "Support hotline ({region}): {v}",
        '{{"customer_id": "C-{n}", "phone": "{v}"}}',
        "Please dial {v} and ask for extension 204.",
    ]
    regions = {"us": "US", "uk": "UK", "de": "DE", "fr": "FR", "in": "IN", "au": "AU", "ot": "EU"}
    out: list[Example] = []
    for i in range(n):
        style = PHONE_STYLES[i % len(PHONE_STYLES)]
        v = phone(rng, style)
        t = templates[(i * 5 + 3) % len(templates)]
        text = t.format(v=v, n=rng.randint(1000, 9999), region=regions[style[:2]])
        out.append((text, [("PHONE_NUMBER", v)]))
    return out


def card_examples(rng: random.Random, n: int) -> list[Example]:
    templates = [
        "Charge {v} for the annual plan.",
        "Customer says card {v} was declined twice.",
        "Payment method: {brand} ending {last4}, full number {v}, exp 09/27.",
        'process_payment(card_number="{v}", amount=129.99, currency="EUR")',
        "Refund the order to the {brand} {v}.",
        "Card on file: {v} (CVV 412)",
        '{{"card": "{v}", "exp_month": 11, "exp_year": 2028}}',
        "Why was {v} flagged for fraud?",
        "Update billing: new card {v}",
    ]
    out: list[Example] = []
    for i in range(n):
        brand, digits = card_number(rng, i % len(CARD_BRANDS))
        v = format_card(rng, digits)
        t = templates[i % len(templates)]
        out.append((t.format(v=v, brand=brand, last4=digits[-4:]), [("CREDIT_CARD", v)]))
    return out


def ip_examples(rng: random.Random, n: int) -> list[Example]:
    templates = [
        "Block traffic from {v} on the edge firewall.",
        "ssh deploy@{v} -p 2222 failed with timeout",
        "Connection refused: {v}:5432 (postgres)",
        "The client IP was {v} according to the access log.",
        "Add {v} to the allow-list for the admin API.",
        '{{"source_ip": "{v}", "action": "deny"}}',
        "GET /api/v1/orders 200 from {v} in 38ms",
        "Why is {v} sending so many requests?",
    ]
    out: list[Example] = []
    for i in range(n):
        v = ipv6(rng) if i % 3 == 2 else ipv4(rng)
        t = templates[i % len(templates)]
        if v.count(":") and "{v}:5432" in t:
            t = "Connection refused: [{v}]:5432 (postgres)"
        out.append((t.format(v=v), [("IP_ADDRESS", v)]))
    return out


def iban_examples(rng: random.Random, n: int) -> list[Example]:
    templates = [
        "Transfer EUR 1,250.00 to IBAN {v} (reference INV-{n}).",
        "Please update my bank details: {v}",
        'create_payout(iban="{v}", amount=300)',
        "The supplier's account is {v}, BIC {bic}.",
        "Is {v} a valid IBAN?",
        "Refund to account {v} please.",
    ]
    countries = list(IBAN_LAYOUTS)
    out: list[Example] = []
    for i in range(n):
        v = iban(rng, countries[i % len(countries)], grouped=rng.random() < 0.6)
        t = templates[i % len(templates)]
        bic = rand(rng, string.ascii_uppercase, 6) + rand(rng, UPPER_DIGITS, 2)
        out.append((t.format(v=v, n=rng.randint(1000, 9999), bic=bic), [("IBAN_CODE", v)]))
    return out


KEY_STYLES = [
    "openai_proj",
    "openai_legacy",
    "openai_svc",
    "anthropic",
    "github_classic",
    "github_pat",
    "gitlab",
    "aws",
    "slack",
    "slack_webhook",
    "google",
    "stripe",
    "hf",
    "sendgrid",
    "npm",
]


def api_key_examples(rng: random.Random, n: int) -> list[Example]:
    prefixed = [
        "Here is my key {v}, why does the API return 401?",
        "export OPENAI_API_KEY={v}",
        "The CI job leaked {v} in its logs, rotate it.",
        "Use this token to authenticate: {v}",
        "curl -H 'x-api-key: {v}' https://api.example.com/v1/items",
        '{{"name": "deploy-bot", "credential": "{v}"}}',
        "config.yaml has `key: {v}` under the provider block",
        "git clone https://oauth2:{v}@gitlab.example.com/group/repo.git",
    ]
    generic = [
        ("api_key={v}", "hex32"),
        ("Set API_KEY: {v} in the .env file", "random_mixed"),
        ('headers = {{"Authorization": "Bearer {v}"}}', "random_mixed"),
        ("aws_secret_access_key = {v}", "b64_40"),
        ("token: {v}", "random_mixed"),
        ('client_secret="{v}"', "hex32"),
        ("DB_PASSWORD={v}", "random_mixed"),
        ("Authorization: Bearer {v}", "hex32"),
    ]
    out: list[Example] = []
    for i in range(n):
        if i % 3 == 2:
            t, style = generic[(i // 3) % len(generic)]
        else:
            style = KEY_STYLES[i % len(KEY_STYLES)]
            t = prefixed[i % len(prefixed)]
            if style == "slack_webhook":
                t = "POST the alert to {v}"
        v = api_key(rng, style)
        out.append((t.format(v=v), [("API_KEY", v)]))
    return out


def jwt_examples(rng: random.Random, n: int) -> list[Example]:
    templates = [
        "Authorization: Bearer {v}",
        "Decode this token and tell me when it expires: {v}",
        '{{"access_token": "{v}", "token_type": "Bearer", "expires_in": 3600}}',
        "Cookie: session={v}; Path=/; HttpOnly",
        "The webhook sent id_token={v}",
        "Why does the gateway reject {v} with invalid signature?",
    ]
    return [
        (templates[i % len(templates)].format(v=(v := jwt(rng))), [("JWT", v)]) for i in range(n)
    ]


def pem_examples(rng: random.Random, n: int) -> list[Example]:
    templates = [
        "Here is the deploy key, add it to the server:\n{v}\nThanks!",
        "{v}",
        "Why does ssh say 'invalid format' for this key?\n\n{v}\n",
        "tls.key: |\n{v}",
        "The old signing key was\n{v}\nplease revoke it.",
    ]
    return [
        (templates[i % len(templates)].format(v=(v := pem(rng))), [("PRIVATE_KEY", v)])
        for i in range(n)
    ]


def mixed_examples(rng: random.Random, n: int) -> list[Example]:
    out: list[Example] = []
    for i in range(n):
        e, p = email(rng), phone(rng, PHONE_STYLES[i % len(PHONE_STYLES)])
        _, digits = card_number(rng)
        c = format_card(rng, digits)
        ip = ipv4(rng)
        k = api_key(rng, KEY_STYLES[(i * 7) % len(KEY_STYLES)])
        variant = i % 5
        if variant == 0:
            text = f"New signup: {e}, phone {p}, paid with {c}."
            ents = [("EMAIL_ADDRESS", e), ("PHONE_NUMBER", p), ("CREDIT_CARD", c)]
        elif variant == 1:
            text = f"[{ip}] user {e} authenticated with key {k}"
            ents = [("IP_ADDRESS", ip), ("EMAIL_ADDRESS", e), ("API_KEY", k)]
        elif variant == 2:
            text = json.dumps({"name": "Lena", "email": e, "phone": p, "notes": "VIP since 2019"})
            ents = [("EMAIL_ADDRESS", e), ("PHONE_NUMBER", p)]
        elif variant == 3:
            b = iban(rng, rng.choice(list(IBAN_LAYOUTS)), grouped=True)
            text = f"Invoice for {e}: pay to {b} or by card {c}. Questions? Call {p}."
            ents = [("EMAIL_ADDRESS", e), ("IBAN_CODE", b), ("CREDIT_CARD", c), ("PHONE_NUMBER", p)]
        else:
            text = (
                f"Summarise this log line: 2024-06-11T08:14:55Z WARN auth failed for {e} "
                f"from {ip} (attempt 3/5), request_id=7f3c9a2e-1b4d-4e8a-9c0f-2d6b8e1a5f73"
            )
            ents = [("EMAIL_ADDRESS", e), ("IP_ADDRESS", ip)]
        out.append((text, ents))
    return out


# ---------------------------------------------------------------- negatives


def negative_examples(rng: random.Random) -> list[Example]:
    hexs = lambda n: rand(rng, "0123456789abcdef", n)  # noqa: E731
    uuid = lambda: f"{hexs(8)}-{hexs(4)}-4{hexs(3)}-{rng.choice('89ab')}{hexs(3)}-{hexs(12)}"  # noqa: E731
    texts = [
        "Upgrade numpy from 1.26.4 to 2.0.1 and pin scipy<1.14.",
        "We are on Python 3.11.7; the image is python:3.11-slim.",
        "Release v2.14.3 fixes the memory leak introduced in v2.13.0.",
        "Chrome 126.0.6478.127 crashes when opening the dashboard.",
        "npm install lodash@4.17.21 react@18.3.1 --save",
        "The meeting is on 2024-06-11 at 14:30 CET.",
        "Invoice dated 11/06/2024, due 11.07.2024.",
        "Book a table for 4 on June 14, 2025 at 7:30 pm.",
        "Timestamp 1718304000123 is in milliseconds.",
        "Unix time 1718304000 corresponds to 2024-06-13.",
        "Order ORD-2024-118833 shipped; ETA 3-5 business days.",
        "Ticket JIRA-48213 is blocked by JIRA-48207.",
        "SKU 00012345-B is out of stock in warehouse W-07.",
        "Invoice INV-2024-000123 total $1,299.00 incl. VAT.",
        "Tracking number 1Z999AA10123456784 (UPS Ground).",
        "Your order #100234567 has been delivered.",
        f"request_id={uuid()} took 245 ms",
        f"Delete the resource with id {uuid()}.",
        f"trace {hexs(32)} span {hexs(16)}",
        f"commit {hexs(40)} reverted the config change",
        f"sha256:{hexs(64)} is the image digest",
        f"md5 checksum {hexs(32)} matches the release artifact",
        f"docker pull ghcr.io/acme/api@sha256:{hexs(64)}",
        "The price dropped from $1,499.99 to $1,199.00.",
        "Total: EUR 49.90 + EUR 4.99 shipping = EUR 54.89",
        "Budget is 12,500,000 JPY for FY2025.",
        "Revenue grew 14.2% to 3,284,110.55 USD.",
        "Open /var/log/nginx/access.log and count 5xx responses.",
        "The file is at C:\\Users\\build\\AppData\\Local\\Temp\\setup_2024.exe",
        "Error in src/utils/date_parser.py:128 (function parse_iso)",
        "Read s3://ml-datasets/2024/06/11/part-00017.parquet",
        "Mount the volume at /mnt/data/run-0042/checkpoints/step-12000",
        "Set max_tokens: 4096 and temperature=0.7 for the summariser.",
        "The prompt used 1,532 tokens and the completion 287 tokens.",
        "OPENAI_API_KEY=${OPENAI_API_KEY} is read from the environment.",
        "api_key: <your-api-key-here>",
        "Keys look like sk-... and must never be logged.",
        "Store the token in vault at secret/data/prod/payments.",
        "token_count=12345 and input_tokens=987",
        "Coordinates 52.5200, 13.4050 (Berlin).",
        "Resize the image to 1920x1080 at 72 dpi.",
        "The server listens on localhost:8080 and the metrics on :9090.",
        "ISBN 978-3-16-148410-0 is the second edition.",
        "Use colour #ff8800 for warnings and #2e7d32 for success.",
        "HTTP 404 on /api/v2/users/4821/orders?page=3&limit=50",
        "Kubernetes resource requests: cpu 500m, memory 2Gi, nvidia.com/gpu: 1",
        "Batch 7 of 12: processed 48,213 rows in 00:03:41.",
        "Model checkpoint step 120000, loss 0.0123, lr 3e-5.",
        "The flight LH 2024 departs at 06:45 from gate B17.",
        "Postcode SW1A 1AA and ZIP 94105 are both in scope.",
        "Run pytest -k 'test_redact and not slow' -x -q",
        "Temperature sensor reads 21.5 C at 2024-06-11T08:00:00Z.",
        "Firmware 4.2.1.10 is required for the new controller.",
        "Product code 4006381333931 (EAN-13) is a highlighter pen.",
        "Call the get_weather tool for Berlin and Paris.",
        "Summarise the attached quarterly report in 3 bullet points.",
        "Translate 'the order has shipped' into German and French.",
        "What is 4111 + 1111? Show your working.",
        "Matrix dims are 1024 x 4096 x 128.",
        "Use the sk-learn compatible wrapper for the classifier.",
        "Branch name: feature/sk-pipeline-refactor-for-long-running-jobs",
        "Account number on the statement is masked as ****1234.",
        "Card ending in 4242 was charged EUR 19.00.",
        "The password must be at least 12 characters long.",
        "The regex ^[a-z0-9._%+-]+@[a-z0-9.-]+\\.[a-z]{2,}$ validates emails.",
        "Placeholder values like <EMAIL_ADDRESS_1> and <PHONE_NUMBER_2> were already redacted.",
        "Reference: RFC 5322 section 3.4.1 (addr-spec).",
        "Version string 1.0.0-rc.1+build.5 follows semver.",
        "Python 3.12.4 (main, Jun  6 2024, 18:26:44) [GCC 11.4.0]",
        "Prices: 19.99, 24.99, 129.00, 1299.00",
        "Set the replica count to 3 and the HPA max to 12.",
        "The dataset has 10,000 train and 1,000 eval examples.",
        "Tool call get_stock_price(symbol='NVDA', date='2024-06-11')",
        "Meet at 10.30 on 12.06.2024 in room 4.12.",
        "Serial 1234 5678 9012 is printed under the battery.",
        "GUID {3F2504E0-4F89-11D3-9A0C-0305E82C3301} identifies the COM class.",
        "Loss went from +0.12 to -0.34 after the LR change.",
        "Aspect ratios 16:9, 4:3 and 21:9; time 09:15:30.",
        "Emergency numbers: call 911 (US) or 112 (EU).",
        "Latency p50 12.4 ms, p99 87.1 ms, error rate 0.03%.",
    ]
    out: list[Example] = [(t, []) for t in texts]
    for i in range(10):
        _, digits = card_number(rng, i % len(CARD_BRANDS))
        bad = format_card(rng, break_luhn(digits))
        out.append(
            (
                rng.choice(
                    [
                        "Customer typed {v} but the form rejected it.",
                        "Charge {v} for the annual plan.",
                        "Card number {v} failed validation.",
                    ]
                ).format(v=bad),
                [],
            )
        )
    for i, country in enumerate(["DE", "GB", "FR", "NL", "ES"]):
        bad = iban(rng, country, grouped=i % 2 == 0, valid=False)
        out.append((f"The IBAN {bad} has a wrong checksum, ask the customer again.", []))
    return out


def url_credential_examples(rng: random.Random) -> list[Example]:
    """Passwords in URLs' ``user:password@host``, and URLs and remotes that only look alike.

    Only the password is labelled: the scheme, user and host are kept so the model still sees
    the connection string's shape. The negatives are logins without a password (a URL's user,
    an scp-style git remote), ports, masks and template references.
    """
    pw = [rand(rng, ALNUM, n) for n in (10, 14, 9, 12, 16, 11)]
    at_pw = "p@ss" + pw[5]  # an unescaped "@": the password runs to the authority's last one
    gitlab = "glpat-" + rand(rng, ALNUM, 20)  # a vendor key as the password: one finding
    positives: list[Example] = [
        (
            f"Connect with postgres://admin:{pw[0]}@db.internal:5432/app and list the tables.",
            [("API_KEY", pw[0])],
        ),
        ("GET https://user:hunter2xyz@api.example.com/x returned 401", [("API_KEY", "hunter2xyz")]),
        (
            f"MONGO_URI=mongodb+srv://svc:{pw[1]}!@cluster0.abcd.mongodb.net/?retryWrites=true",
            [("API_KEY", pw[1] + "!")],
        ),
        (f"cache: redis://:{pw[2]}@cache:6379/0", [("API_KEY", pw[2])]),
        (
            json.dumps({"dsn": f"mysql://reporting:{pw[3]}@10.20.4.17:3306/analytics"}),
            [("API_KEY", pw[3]), ("IP_ADDRESS", "10.20.4.17")],
        ),
        (
            f"amqp://deploy:{pw[4]}@rabbit.prod.example.com:5672/%2F is refusing connections",
            [("API_KEY", pw[4])],
        ),
        (f"ftp://upload:{at_pw}@files.example.net/in/", [("API_KEY", at_pw)]),
        (
            f"git clone https://oauth2:{gitlab}@gitlab.example.com/team/app.git",
            [("API_KEY", gitlab)],
        ),
    ]
    negatives: list[Example] = [
        ("The dev server listens on http://localhost:8080/healthz", []),
        ("git remote add origin git@github.com:org/repo.git", []),
        ("Download it from ftp://anonymous@ftp.example.org/pub/", []),
        ("ssh://git@gitlab.example.com:2222/group/project.git is the mirror", []),
        ("DATABASE_URL=postgres://app:${DB_PASSWORD}@db:5432/app", []),
        ("Connection string: postgres://app:****@db.internal:5432/app (masked)", []),
        ("Format: postgresql://user:password@localhost:5432/dbname", []),
        # No credentials, but the proxy's address is an IP address.
        (
            "Proxy at http://10.0.0.1:3128, docs at https://example.com/@team/handbook",
            [("IP_ADDRESS", "10.0.0.1")],
        ),
    ]
    return positives + negatives


def review_examples(rng: random.Random) -> list[Example]:
    """Forms a review found leaking: secret names beyond ``password``/``api_key`` (secret_key,
    AccountKey, passphrase, pwd, cookies), labelled passwords that are short or not random,
    AWS key ids without a digit, cards spelled with double spaces, non-breaking spaces or
    dots; and the look-alikes those rules must leave alone."""
    b64 = rand(rng, ALNUM + "/+", 40)
    hex32 = rand(rng, "0123456789abcdef", 32)
    azure = rand(rng, ALNUM + "/+", 86) + "=="
    session, csrf = rand(rng, "0123456789abcdef", 32), rand(rng, ALNUM, 32)
    aws = "AKIA" + rand(rng, string.ascii_uppercase, 16)
    pw1, pw2 = rand(rng, ALNUM, 8) + "!", rand(rng, string.ascii_letters, 14)
    _, visa = card_number(rng, 0)
    _, master = card_number(rng, 1)
    _, amex = card_number(rng, 3)
    nbsp_card = "\u00a0".join(visa[i : i + 4] for i in range(0, 16, 4))
    dotted_card = ".".join(master[i : i + 4] for i in range(0, 16, 4))
    spaced_card = "  ".join(visa[i : i + 4] for i in (0, 4, 8, 12))
    amex_nbsp = f"{amex[:4]}\u00a0{amex[4:10]}\u00a0{amex[10:]}"
    bad_card = break_luhn(master)
    bad_dotted = ".".join(bad_card[i : i + 4] for i in range(0, 16, 4))
    positives: list[Example] = [
        (f'aws_secret_key = "{b64}"', [("API_KEY", b64)]),
        (json.dumps({"SECRET_KEY": b64, "DEBUG": False}), [("API_KEY", b64)]),
        (f"encryption_key: {hex32}", [("API_KEY", hex32)]),
        (
            f"DefaultEndpointsProtocol=https;AccountName=acct;AccountKey={azure};"
            "EndpointSuffix=core.windows.net",
            [("API_KEY", azure)],
        ),
        (
            f"Cookie: sessionid={session}; csrftoken={csrf}",
            [("API_KEY", session), ("API_KEY", csrf)],
        ),
        (f"password={pw2}", [("API_KEY", pw2)]),
        (f"Server=db;Database=app;User Id=sa;Password={pw1};", [("API_KEY", pw1)]),
        (f"jdbc:postgresql://db:5432/app?user=admin&password={pw1}&ssl=true", [("API_KEY", pw1)]),
        (f"unlock it with passphrase: {pw2}", [("API_KEY", pw2)]),
        (f"mysql -u root --pwd={pw1} app", [("API_KEY", pw1)]),
        (f"aws_access_key_id = {aws}", [("API_KEY", aws)]),
        (f"Card number {nbsp_card}, exp 04/29", [("CREDIT_CARD", nbsp_card)]),
        (f"pay with {dotted_card} please", [("CREDIT_CARD", dotted_card)]),
        (f"card: {spaced_card}", [("CREDIT_CARD", spaced_card)]),
        (f"Amex {amex_nbsp}", [("CREDIT_CARD", amex_nbsp)]),
    ]
    negatives: list[Example] = [
        ('{"secret_key_rotation_days": 30, "password_min_length": 12}', []),
        ("interface Login { username: string; password: string }", []),
        ("db = connect(host=h, user=u, password=settings.DB_PASSWORD)", []),
        ("PWD=/home/jane/project OLDPWD=/home/jane", []),
        ("Set-Cookie: lang=en; Path=/; HttpOnly", []),
        ("Forgot password: click the link we sent", []),
        (f"release 2024.0101.1200.0001 built from {bad_dotted}", []),
    ]
    return positives + negatives


def auth_review_examples(rng: random.Random) -> list[Example]:
    """A second review's leaks: Bearer tokens shorter than the assigned-secret rule takes,
    curl's ``-u user:password``, Slack app-level, Shopify, Databricks and Discord webhook
    tokens, and "my password is ..." sentences; and the prose, stand-ins and other tools'
    options those rules must leave alone."""
    hexd = "0123456789abcdef"
    short = "tok_" + rand(rng, hexd, 6)
    mixed = rand(rng, string.ascii_lowercase, 3) + rand(rng, string.digits, 3)
    mixed += rand(rng, ALNUM, 6)
    pw1 = rand(rng, ALNUM, 9) + "7"
    pw2 = rand(rng, string.ascii_letters, 6) + "#" + rand(rng, string.digits, 3)
    xapp = f"xapp-1-A0{rand(rng, UPPER_DIGITS, 9)}-{rand(rng, string.digits, 13)}-"
    xapp += rand(rng, hexd, 64)
    shop = [p + "_" + rand(rng, hexd, 31) + "5" for p in ("shpat", "shpca", "shppa")]
    dapi = "dapi" + rand(rng, "abcdefgh0123456789", 31) + "3"
    discord = f"https://discord.com/api/webhooks/{rand(rng, string.digits, 18)}/"
    discord += rand(rng, ALNUM + "_-", 68)
    stated = rand(rng, string.ascii_lowercase, 6) + rand(rng, string.digits, 3)
    pin = "7" + rand(rng, string.digits, 5)
    positives: list[Example] = [
        (
            f"curl -H 'Authorization: Bearer {short}' https://api.example.com/v1/me",
            [("API_KEY", short)],
        ),
        (f"Authorization: Bearer {mixed}", [("API_KEY", mixed)]),
        (
            f'fetch(url, {{headers: {{"Authorization": "Bearer {mixed}"}}}})',
            [("API_KEY", mixed)],
        ),
        (f"curl -u deploy:{pw1} https://ci.example.com/api/json", [("API_KEY", pw1)]),
        (
            f"curl --user 'admin:{pw2}' -X POST https://jenkins.internal/job/build",
            [("API_KEY", pw2)],
        ),
        ("curl -u elastic:changeme http://localhost:9200/_cat/indices", [("API_KEY", "changeme")]),
        (f"SLACK_APP_TOKEN={xapp}", [("API_KEY", xapp)]),
        (
            json.dumps({"shop": "acme.myshopify.com", "access_token": shop[0]}),
            [("API_KEY", shop[0])],
        ),
        (
            f"custom app {shop[1]} and private app {shop[2]}",
            [("API_KEY", shop[1]), ("API_KEY", shop[2])],
        ),
        (
            f"databricks configure --host https://adb-1.azuredatabricks.net --token {dapi}",
            [("API_KEY", dapi)],
        ),
        (f"post the alert to {discord} when it fails", [("API_KEY", discord)]),
        (f"hey, my password is {stated} if you need to log in", [("API_KEY", stated)]),
        (f"The door passcode was {pin}.", [("API_KEY", pin)]),
    ]
    negatives: list[Example] = [
        ("He was the Bearer of bad news about the outage.", []),
        ("curl -u $USER https://api.example.com/v1/me", []),
        ('curl -H "Authorization: Bearer ${TOKEN}" https://api.example.com/v1/me', []),
        ("Send the header Authorization: Bearer <token> with every request.", []),
        ("curl -u user:password https://httpbin.org/basic-auth/user/password", []),
        ("docker run --rm -u 1000:1000 -v $PWD:/app node:20 npm test", []),
        ("The password is required and must be 12 characters.", []),
        ("Login failed: password is incorrect", []),
        ("if password is None: raise ValueError('password is required')", []),
        ("Shopify tokens start with shpat_, Databricks tokens with dapi.", []),
    ]
    return positives + negatives


def third_review_examples(rng: random.Random) -> list[Example]:
    """A third review's leaks: passwords phrased without "password is" right before them
    ("the password for the db is ...", "use password ...", "'...' as the password", "login
    with admin / ..."), letter-only passphrases and random tokens without a digit, curl's
    ``-u`` across a CRLF continuation, and ~40 more vendors' fixed-prefix tokens; and the
    prose, code and look-alikes these rules must leave alone."""
    hexd = "0123456789abcdef"
    lower = string.ascii_lowercase

    def pw() -> str:
        return rand(rng, string.ascii_letters, 5) + rand(rng, string.digits, 2) + "!" + "x"

    def letters(n: int) -> str:  # random mixed case, no digit
        return "".join(rng.choice((c, c.upper())) for c in rand(rng, lower, n))

    pws = [pw() for _ in range(9)]
    phrase = "".join(
        rng.choice(["correct", "horse", "battery", "staple", "orbit", "violin"]) for _ in range(4)
    )
    snowflake = str(rng.randint(10**17, 10**18 - 1)).encode()
    discord = base64.urlsafe_b64encode(snowflake).decode().rstrip("=")
    discord += "." + rand(rng, ALNUM, 6) + "." + rand(rng, ALNUM + "_-", 37) + "Q"
    pypi = "pypi-AgEIcHlwaS5vcmc" + rand(rng, ALNUM + "_-", 120) + "7"
    twilio = "SK" + rand(rng, hexd, 31) + "3"
    whsec = "whsec_" + rand(rng, ALNUM, 31) + "8"
    do_tok = "dop_v1_" + rand(rng, hexd, 64)
    vault = "hvs." + rand(rng, ALNUM + "_-", 90)
    gsk = "gsk_" + rand(rng, ALNUM, 51) + "4"
    glrt = "glrt-" + rand(rng, ALNUM, 19) + "2"
    telegram = f"{rng.randint(10**8, 10**9 - 1)}:AA" + rand(rng, ALNUM + "_-", 32) + "w"
    xoxe = "xoxe-1-" + rand(rng, ALNUM, 40) + "5"
    random_key = letters(28)
    positives: list[Example] = [
        (f"the password for the staging db is {pws[0]}", [("API_KEY", pws[0])]),
        (f"password for the router: {pws[1]} (admin user)", [("API_KEY", pws[1])]),
        (f"the pw I think is '{pws[2]}', try it", [("API_KEY", pws[2])]),
        (f"use password {pws[3]} to log in to the console", [("API_KEY", pws[3])]),
        (
            f"Add a server with 'admin_user' as username and '{pws[4]}' as the password.",
            [("API_KEY", pws[4])],
        ),
        (f"login with deploy / {pws[5]} on the jump host", [("API_KEY", pws[5])]),
        (f"pass phrase is {pws[6]}", [("API_KEY", pws[6])]),
        (f"My password is '{phrase}'.", [("API_KEY", phrase)]),
        (f"API_KEY={random_key}", [("API_KEY", random_key)]),
        (
            f"curl https://ci.example.com/api \\\r\n  -u builder:{pws[7]}",
            [("API_KEY", pws[7])],
        ),
        (f"DISCORD_BOT={discord}", [("API_KEY", discord)]),
        (f"twine upload -u __token__ -p {pypi} dist/*", [("API_KEY", pypi)]),
        (f"twilio api key {twilio} (secret in vault)", [("API_KEY", twilio)]),
        (
            json.dumps({"endpoint": "https://x.example.com/hook", "signing": whsec}),
            [("API_KEY", whsec)],
        ),
        (f"doctl auth init -t {do_tok}", [("API_KEY", do_tok)]),
        (f"export VAULT_TOKEN={vault}", [("API_KEY", vault)]),
        (f"client = Groq(api_key='{gsk}')", [("API_KEY", gsk)]),
        (f"gitlab-runner register --token {glrt}", [("API_KEY", glrt)]),
        (f"https://api.telegram.org/bot{telegram}/sendMessage", [("API_KEY", telegram)]),
        (f"refresh with {xoxe} tomorrow", [("API_KEY", xoxe)]),
        (f"CREATE USER app WITH LOGIN PASSWORD '{pws[8]}';", [("API_KEY", pws[8])]),
    ]
    negatives: list[Example] = [
        ("The password field is required.", []),
        ("Reset your password from the account page.", []),
        ("Passwords must be 8 characters or more.", []),
        ("store password_hash = bcrypt(password2), never the password", []),
        ("read it from /etc/app/password.txt or ~/.pgpass", []),
        ("the password for the admin account is required", []),
        ("set the password to expire in 90 days", []),
        ("hash the password SHA256 first, then compare", []),
        ("login with email/password or sign in with Google/GitHub", []),
        ("the password is compromised; rotate it", []),
        ("the password is 'incorrect' says the log", []),
        ("token: accessTokenFromSecretsManager", []),
        ("Authorization: Bearer getAccessTokenForUser", []),
        ("AC" + rand(rng, hexd, 32) + " is the account SID", []),
        ("whsec_ and glrt- are token prefixes", []),
        ("curl https://x.example.com\r\nsudo -u www:data ls", []),
    ]
    return positives + negatives


def fourth_review_examples() -> list[Example]:
    """Session 27's review: values glued to text in scripts written without spaces (Chinese,
    Japanese, Korean), phone extensions written "ext.", a key inside a URL query followed by
    other fields, a percent-encoded address in a URL, an Azure SAS signature; and negatives
    those rules must leave alone (dates and prices in Chinese, a query without a secret)."""
    return [
        ("メールはyuki.tanaka@example.co.jpです", [("EMAIL_ADDRESS", "yuki.tanaka@example.co.jp")]),
        ("请把报告发到li.wei@corp.example.com谢谢", [("EMAIL_ADDRESS", "li.wei@corp.example.com")]),
        ("minji.kim@example.kr으로 보내 주세요", [("EMAIL_ADDRESS", "minji.kim@example.kr")]),
        ("请拨打+86 139 1234 5678联系我", [("PHONE_NUMBER", "+86 139 1234 5678")]),
        ("電話番号は+81-3-1234-5678です", [("PHONE_NUMBER", "+81-3-1234-5678")]),
        ("+82 10-9876-5432로 전화 주세요", [("PHONE_NUMBER", "+82 10-9876-5432")]),
        ("服务器IP是192.168.10.24吗", [("IP_ADDRESS", "192.168.10.24")]),
        ("卡号5555555555554444\uff0c有效期12/27", [("CREDIT_CARD", "5555555555554444")]),
        (
            "키는sk-proj-Q7xLm2Rw9Kp4Tz8Vb3Nc6Yd1Hf5Jg0Sa입니다",
            [("API_KEY", "sk-proj-Q7xLm2Rw9Kp4Tz8Vb3Nc6Yd1Hf5Jg0Sa")],
        ),
        (
            "Please call me back at (212) 736-5000 ext. 41, ticket 7",
            [("PHONE_NUMBER", "(212) 736-5000 ext. 41")],
        ),
        ('{"phone": "646-555-0187 ext. 3"}', [("PHONE_NUMBER", "646-555-0187 ext. 3")]),
        (
            "GET https://api.example.com/v1/search?api_key=Hq72mZp0Lx4Rk9Vw1Tb8&q=red+shoes&page=2",
            [("API_KEY", "Hq72mZp0Lx4Rk9Vw1Tb8")],
        ),
        (
            "GET /v1/customers?email=john.smith%40acme.co.uk&limit=5",
            [("EMAIL_ADDRESS", "john.smith%40acme.co.uk")],
        ),
        (
            "Download https://acct.blob.core.windows.net/reports/q3.pdf?sv=2022-11-02&sp=r&se=2030-01-01&sig=Pq4Zr8t%2BWm2Kx7Yb0Nc5Vd9Lh3Jf6Gs1Ta%3D",
            [("API_KEY", "Pq4Zr8t%2BWm2Kx7Yb0Nc5Vd9Lh3Jf6Gs1Ta%3D")],
        ),
        ("会议在2024年3月12日14点30分举行\uff0c共有1203人参加", []),
        ("价格1299元\uff0c折扣200元\uff0c第1章第2节", []),
        ("the function signature: getWeatherForecast(location, unit)", []),
        ("sort=price&page=12&per_page=50#results", []),
        # Version and clause numbers glued to the same scripts are no IP addresses.
        ("固件版本2.0.0.1已发布", []),
        ("请升级到1.2.3.4版本后重试", []),
        ("バージョン1.0.0.1をインストールしてください", []),
        ("버전1.0.0.1을 설치하세요", []),
        ("根据第1.2.3.4条规定处理", []),
        ("版本为\uff1a2.0.0.1", []),
        ("バージョン番号は1.0.0.1です", []),
        ("버전 번호: 1.0.0.1", []),
        # An address named before the word for "version" is still an address.
        ("请检查192.168.1.20固件版本", [("IP_ADDRESS", "192.168.1.20")]),
        ("设备10.0.0.5版本过旧", [("IP_ADDRESS", "10.0.0.5")]),
        ("ルーター192.168.0.1バージョン確認", [("IP_ADDRESS", "192.168.0.1")]),
        ("节点10.0.0.7 버전 확인", [("IP_ADDRESS", "10.0.0.7")]),
    ]


def main() -> None:
    rng = random.Random(SEED)
    examples: list[Example] = []
    examples += email_examples(rng, 32)
    examples += phone_examples(rng, 42)
    examples += card_examples(rng, 30)
    examples += ip_examples(rng, 20)
    examples += iban_examples(rng, 22)
    examples += api_key_examples(rng, 48)
    examples += jwt_examples(rng, 12)
    examples += pem_examples(rng, 8)
    examples += mixed_examples(rng, 20)
    examples += negative_examples(rng)
    rng_extra = random.Random(SEED + 1)
    pw = rand(rng_extra, ALNUM, 10) + "&" + rand(rng_extra, ALNUM, 5) + "!"
    examples += [
        (f"DB_PASSWORD={pw}", [("API_KEY", pw)]),
        ("My phone: 4155550132, call after 6pm.", [("PHONE_NUMBER", "4155550132")]),
        (
            "Reach me on +1 (415) 555-0132 ext. 12 tomorrow.",
            [("PHONE_NUMBER", "+1 (415) 555-0132 ext. 12")],
        ),
        (
            "ssh admin@10.20.30.40 and ping 2001:db8::42",
            [("IP_ADDRESS", "10.20.30.40"), ("IP_ADDRESS", "2001:db8::42")],
        ),
    ]
    # HTTP Basic credentials: base64 of "user:password", in a header, JSON and a log line.
    basic = [
        base64.b64encode(f"{user}:{rand(rng_extra, ALNUM, n)}!".encode()).decode()
        for user, n in (("admin", 14), ("svc-deploy", 9), ("jane", 22))
    ]
    examples += [
        (
            f"curl -H 'Authorization: Basic {basic[0]}' https://api.example.com/v1/items",
            [("API_KEY", basic[0])],
        ),
        (
            json.dumps(
                {
                    "url": "https://registry.internal/v2/",
                    "headers": {"Authorization": f"Basic {basic[1]}"},
                }
            ),
            [("API_KEY", basic[1])],
        ),
        (f"proxy-authorization: basic {basic[2]}", [("API_KEY", basic[2])]),
        ("Basic setup: install the CLI, then run slm-fleet init --defaults", []),
        ('WWW-Authenticate: Basic realm="registry", charset="UTF-8"', []),
        (
            "Saved the upload as priya.k@mail.co.in-resume.pdf",
            [("EMAIL_ADDRESS", "priya.k@mail.co.in")],
        ),
    ]
    examples += url_credential_examples(random.Random(SEED + 2))
    examples += review_examples(random.Random(SEED + 3))
    examples += auth_review_examples(random.Random(SEED + 4))
    examples += third_review_examples(random.Random(SEED + 5))
    examples += fourth_review_examples()
    for text, ents in examples:
        for _, value in ents:
            assert value in text, (value, text)
    with OUT.open("w", encoding="utf-8") as fh:
        for text, ents in examples:
            row = {"text": text, "entities": [{"kind": k, "value": v} for k, v in ents]}
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    negatives = sum(1 for _, ents in examples if not ents)
    print(f"wrote {len(examples)} examples ({negatives} negatives) to {OUT}")


if __name__ == "__main__":
    main()
