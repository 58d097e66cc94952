"""`sdserve keys new`: a strong API key and the hash the server's config keeps of it.

The key is 32 random bytes from the OS (`secrets`), URL-safe base64 with an `sds_` prefix so
that secret scanners and people recognise it. The server stores only its sha256 (`key_sha256`
in a [[tenants]] table); the key itself goes to the tenant once and is never written by sdserve.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import secrets

KEY_PREFIX = "sds_"
KEY_BYTES = 32  # 256 bits: not guessable, and sha256 of it cannot be inverted


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(KEY_BYTES)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("keys", help="make API keys for the server's [[tenants]]")
    sub = parser.add_subparsers(dest="keys_command", required=True)
    new = sub.add_parser(
        "new",
        help="print a new random API key and its sha256 (the config keeps only the hash)",
        description="Print a new random API key (give it to the tenant) and the [[tenants]] line "
        "for the server's config (key_sha256 = its sha256). Nothing is stored.",
    )
    new.add_argument("--tenant", default="NAME", help="tenant name to put in the printed config lines")
    new.add_argument("--json", action="store_true", help="print {key, key_sha256} as JSON instead")
    new.set_defaults(func=_new)


def _new(args: argparse.Namespace) -> None:
    key = new_key()
    digest = hashlib.sha256(key.encode()).hexdigest()
    if args.json:
        print(json.dumps({"key": key, "key_sha256": digest}))
        return
    print(f"key:        {key}")
    print(f"key_sha256: {digest}")
    print()
    print("# for the server's config (the key itself is not stored there):")
    print("[[tenants]]")
    print(f'name = "{args.tenant}"')
    print(f'key_sha256 = "{digest}"')
