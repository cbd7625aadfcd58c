#!/usr/bin/env python3
"""Write jwks.json from the public keys beside this script.

Needs only the Python standard library and the `openssl` command. Run it from
anywhere: `python3 gateway/tests/data/jwt/make_jwks.py`. It was run once and
its output committed; rerun it only after regenerating the keys (see README.md).
"""

import base64
import json
import pathlib
import re
import subprocess

HERE = pathlib.Path(__file__).resolve().parent


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def pubkey_text(pem: str) -> str:
    return subprocess.run(
        ["openssl", "pkey", "-pubin", "-in", str(HERE / pem), "-text", "-noout"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout


def hex_block(text: str, label: str) -> bytes:
    """The colon-separated hex dump that follows `label` in openssl's text output."""
    lines = text.splitlines()
    start = next(i for i, l in enumerate(lines) if l.strip().startswith(label))
    out = []
    for line in lines[start + 1 :]:
        if not re.fullmatch(r"\s+[0-9a-f:]+", line):
            break
        out.append(line.strip())
    return bytes.fromhex("".join(out).replace(":", ""))


def rsa_jwk(pem: str, kid: str) -> dict:
    text = pubkey_text(pem)
    n = hex_block(text, "Modulus:").lstrip(b"\x00")
    e = int(re.search(r"Exponent: (\d+)", text).group(1))
    e_bytes = e.to_bytes((e.bit_length() + 7) // 8, "big")
    return {"kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256", "n": b64url(n), "e": b64url(e_bytes)}


def ec_jwk(pem: str, kid: str, crv: str, alg: str) -> dict:
    point = hex_block(pubkey_text(pem), "pub:")
    assert point[0] == 4, "expected an uncompressed EC point"
    half = (len(point) - 1) // 2
    return {
        "kty": "EC",
        "kid": kid,
        "use": "sig",
        "alg": alg,
        "crv": crv,
        "x": b64url(point[1 : 1 + half]),
        "y": b64url(point[1 + half :]),
    }


def main() -> None:
    keys = [
        rsa_jwk("rsa_public.pem", "rsa-1"),
        rsa_jwk("rsa2_public.pem", "rsa-2"),
        ec_jwk("ec_public.pem", "ec-1", "P-256", "ES256"),
    ]
    (HERE / "jwks.json").write_text(json.dumps({"keys": keys}, indent=2) + "\n")


if __name__ == "__main__":
    main()
