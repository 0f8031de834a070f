"""Access control of the HTTP API (spec http-api.md "Access control"): none / token / oidc, over real HTTP."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest

from cscs_storage_daemon.api.auth import (
    AuthResult,
    JwksCache,
    NoAuth,
    OidcAuth,
    TokenAuth,
    bearer_token,
    build_authenticator,
    check_listen_allowed,
    claim_values,
    is_loopback_listen,
)
from cscs_storage_daemon.config import ConfigError, HttpSettings
from tests.fixtures.api import ApiServerFactory, OidcIssuer, fill_mirror

TOKEN = "api-token-0123456789abcdefghijkl"
OTHER = "api-token-second-000000000000000"
UNAUTHENTICATED = b'{"detail":"Not authenticated"}'
FORBIDDEN = b'{"detail":"Forbidden"}'
PROTECTED = ("/api/storage-resources/?storage_system=capstor", "/metrics", "/openapi.json", "/docs", "/nowhere")


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _assert_401(response: Any) -> None:
    assert response.status_code == 401
    assert response.content == UNAUTHENTICATED
    assert response.headers["www-authenticate"] == "Bearer"


# ------------------------------------------------------------------------------------------------------ token


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "api-tokens"
    path.write_text(f"# rotated 2025-08\n{TOKEN}\n\n  {OTHER}  \n", encoding="utf-8")
    return path


@pytest.fixture
def token_server(api_server: ApiServerFactory, token_file: Path) -> Any:
    return api_server({"capstor": fill_mirror("capstor", 3)}, auth=TokenAuth(token_file=token_file, recheck=0))


@pytest.mark.parametrize("path", PROTECTED)
def test_token_missing_is_401_everywhere_but_healthz(token_server: Any, path: str) -> None:
    _assert_401(token_server.get(path))


def test_token_accepted(token_server: Any) -> None:
    for token in (TOKEN, OTHER):
        response = token_server.get(
            "/api/storage-resources/", params={"storage_system": "capstor"}, headers=_bearer(token)
        )
        assert response.status_code == 200
        assert response.json()["result"]["paginate"]["total"] == 3
    assert token_server.get("/metrics", headers=_bearer(TOKEN)).status_code == 200
    assert token_server.get("/openapi.json", headers=_bearer(TOKEN)).status_code == 200
    assert token_server.get("/docs", headers=_bearer(TOKEN)).status_code == 200
    assert token_server.get("/nowhere", headers=_bearer(TOKEN)).status_code == 404


def test_healthz_is_open(token_server: Any) -> None:
    assert token_server.get("/healthz").status_code == 200


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": "Bearer wrong-token-0123456789abcdefgh"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Bearer {TOKEN[:-1]}"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer # rotated 2025-08"},
        {"Authorization": f"Bearer {TOKEN} {TOKEN}"},
    ],
)
def test_token_wrong_is_401_with_the_same_body(token_server: Any, headers: dict[str, str]) -> None:
    _assert_401(token_server.get("/api/storage-resources/", params={"storage_system": "capstor"}, headers=headers))


def test_token_bearer_scheme_is_case_insensitive(token_server: Any) -> None:
    response = token_server.get("/healthz", headers={"Authorization": f"bearer {TOKEN}"})
    assert response.status_code == 200
    response = token_server.get("/metrics", headers={"Authorization": f"BEARER {TOKEN}"})
    assert response.status_code == 200


def test_token_two_authorization_headers_are_refused(token_server: Any) -> None:
    response = token_server.client.get(
        "/metrics", headers=[("Authorization", f"Bearer {TOKEN}"), ("Authorization", f"Bearer {OTHER}")]
    )
    _assert_401(response)


def test_token_file_is_reread_when_it_changes(token_server: Any, token_file: Path) -> None:
    new = "rotated-token-abcdefghijklmnopqrstu"
    token_file.write_text(new + "\n", encoding="utf-8")
    stat = token_file.stat()
    os.utime(token_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10_000_000))
    assert token_server.get("/metrics", headers=_bearer(new)).status_code == 200
    _assert_401(token_server.get("/metrics", headers=_bearer(TOKEN)))


def test_token_file_emptied_keeps_the_old_tokens(token_file: Path) -> None:
    auth = TokenAuth(token_file=token_file, recheck=0)
    token_file.write_text("\n", encoding="utf-8")
    assert auth.check(f"Bearer {TOKEN}") is AuthResult.ALLOWED


def test_token_unit() -> None:
    auth = TokenAuth([TOKEN])
    assert auth.check(f"Bearer {TOKEN}") is AuthResult.ALLOWED
    assert auth.check(None) is AuthResult.UNAUTHENTICATED
    assert auth.check("Bearer " + "x" * 10_000) is AuthResult.UNAUTHENTICATED
    assert auth.check(f"Bearer {TOKEN}é") is AuthResult.UNAUTHENTICATED
    assert bearer_token("Bearer  abc ") == "abc"
    assert bearer_token("Token abc") is None


def test_token_empty_or_missing_file_is_a_config_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="no token"):
        TokenAuth(token_file=empty)
    with pytest.raises(ConfigError, match="cannot read"):
        TokenAuth(token_file=tmp_path / "missing")


def test_build_token_authenticator_from_settings(token_file: Path) -> None:
    http = HttpSettings.model_validate({"listen": "0.0.0.0:8080", "auth": "token", "token_file": str(token_file)})
    auth = build_authenticator(http)
    assert auth.scheme == "token"
    assert auth.check(f"Bearer {OTHER}") is AuthResult.ALLOWED


def test_build_token_authenticator_from_the_credentials_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "http-token").write_text(TOKEN + "\n", encoding="utf-8")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    http = HttpSettings.model_validate({"listen": "10.1.2.3:8080", "auth": "token"})
    auth = build_authenticator(http)
    assert auth.check(f"Bearer {TOKEN}") is AuthResult.ALLOWED


# ------------------------------------------------------------------------------------------------------- none


@pytest.mark.parametrize("listen", ["0.0.0.0:8080", "10.0.0.1:8080", "[::]:8080", "head-node:8080", ":8080"])
def test_auth_none_off_loopback_is_refused(listen: str) -> None:
    assert not is_loopback_listen(listen)
    with pytest.raises(ConfigError) as raised:
        check_listen_allowed(listen, "none")
    assert "loopback" in str(raised.value)
    assert raised.value.path == "daemon.http.auth"
    check_listen_allowed(listen, "token")
    check_listen_allowed(listen, "oidc")


@pytest.mark.parametrize("listen", ["127.0.0.1:8080", "127.1.2.3:80", "[::1]:8080", "localhost:8080"])
def test_auth_none_on_loopback_is_allowed(listen: str) -> None:
    assert is_loopback_listen(listen)
    check_listen_allowed(listen, "none")


def test_build_authenticator_checks_a_listen_override() -> None:
    http = HttpSettings.model_validate({})
    assert isinstance(build_authenticator(http), NoAuth)
    with pytest.raises(ConfigError):
        build_authenticator(http, listen="0.0.0.0:9000")


def test_auth_none_serves_without_credentials(api_server: ApiServerFactory) -> None:
    harness = api_server({"capstor": fill_mirror("capstor", 1)})
    assert harness.get("/metrics").status_code == 200
    assert harness.resources(storage_system="capstor").status_code == 200


# ------------------------------------------------------------------------------------------------------- oidc


@pytest.fixture
def oidc_server(api_server: ApiServerFactory, oidc_issuer: OidcIssuer) -> Any:
    auth = OidcAuth(
        issuer=oidc_issuer.issuer,
        audience=oidc_issuer.audience,
        jwks_url=oidc_issuer.jwks_url,
        required_role="storage-reader",
        role_claim="realm_access.roles",
    )
    return api_server({"capstor": fill_mirror("capstor", 2)}, auth=auth)


def _get(server: Any, token: str) -> Any:
    return server.get("/api/storage-resources/", params={"storage_system": "capstor"}, headers=_bearer(token))


def test_oidc_valid_rs256_and_es256_tokens(oidc_server: Any, oidc_issuer: OidcIssuer) -> None:
    assert _get(oidc_server, oidc_issuer.token()).status_code == 200
    assert _get(oidc_server, oidc_issuer.token(alg="ES256", kid="ec-1")).status_code == 200
    assert oidc_server.get("/metrics", headers=_bearer(oidc_issuer.token())).status_code == 200
    assert oidc_server.get("/openapi.json", headers=_bearer(oidc_issuer.token())).status_code == 200


def test_oidc_issuer_with_trailing_slash_is_the_same_issuer(oidc_server: Any, oidc_issuer: OidcIssuer) -> None:
    assert _get(oidc_server, oidc_issuer.token(iss=oidc_issuer.issuer + "/")).status_code == 200


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "expired",
        "wrong_audience",
        "wrong_issuer",
        "no_exp",
        "no_iss",
        "no_aud",
        "not_yet_valid",
        "bad_signature",
        "unknown_kid",
        "alg_none",
        "hs256_with_public_key",
        "rs256_header_on_ec_key",
        "garbage",
    ],
)
def test_oidc_bad_tokens_are_401(oidc_server: Any, oidc_issuer: OidcIssuer, case: str) -> None:
    now = int(time.time())
    tokens: dict[str, Callable[[], str]] = {
        "expired": lambda: oidc_issuer.token(exp=now - 3600, iat=now - 7200),
        "wrong_audience": lambda: oidc_issuer.token(aud="someone-else"),
        "wrong_issuer": lambda: oidc_issuer.token(iss="http://127.0.0.1:1/realms/evil"),
        "no_exp": lambda: oidc_issuer.token(exp=None),
        "no_iss": lambda: oidc_issuer.token(iss=None),
        "no_aud": lambda: oidc_issuer.token(aud=None),
        "not_yet_valid": lambda: oidc_issuer.token(nbf=now + 3600),
        "bad_signature": lambda: oidc_issuer.token(key=oidc_issuer.other_rsa_key),
        "unknown_kid": lambda: oidc_issuer.token(kid="rsa-404"),
        "alg_none": lambda: jwt.encode(oidc_issuer.claims(), "", algorithm="none", headers={"kid": "rsa-1"}),
        "hs256_with_public_key": lambda: _hs256_confusion(oidc_issuer),
        "rs256_header_on_ec_key": lambda: oidc_issuer.token(kid="ec-1"),
        "garbage": lambda: "not.a.jwt",
    }
    if case == "missing":
        response = oidc_server.get("/api/storage-resources/", params={"storage_system": "capstor"})
    else:
        response = _get(oidc_server, tokens[case]())
    _assert_401(response)


def _hs256_confusion(issuer: OidcIssuer) -> str:
    """An HS256 token whose HMAC key is the RSA public key's JWK JSON: the classic algorithm confusion."""
    import json

    import jwt.algorithms

    secret = json.dumps(json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(issuer.rsa_key.public_key())))
    import base64
    import hashlib
    import hmac

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}).encode())
    payload = b64(json.dumps(issuer.claims()).encode())
    signature = hmac.new(secret.encode(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{b64(signature)}"


def test_oidc_valid_token_without_the_role_is_403(oidc_server: Any, oidc_issuer: OidcIssuer) -> None:
    for claims in ({"realm_access": {"roles": ["offline_access"]}}, {"realm_access": None}, {"realm_access": "x"}):
        response = _get(oidc_server, oidc_issuer.token(**claims))
        assert response.status_code == 403
        assert response.content == FORBIDDEN
    # the role in another claim does not count
    token = oidc_issuer.token(realm_access={"roles": []}, roles=["storage-reader"])
    assert _get(oidc_server, token).status_code == 403


def test_oidc_without_required_role_accepts_any_valid_token(
    api_server: ApiServerFactory, oidc_issuer: OidcIssuer
) -> None:
    auth = OidcAuth(issuer=oidc_issuer.issuer, audience=oidc_issuer.audience, jwks_url=oidc_issuer.jwks_url)
    server = api_server({"capstor": fill_mirror("capstor", 1)}, auth=auth)
    assert _get(server, oidc_issuer.token(realm_access=None)).status_code == 200
    _assert_401(_get(server, oidc_issuer.token(aud="other")))


def test_oidc_audience_in_a_list(oidc_server: Any, oidc_issuer: OidcIssuer) -> None:
    assert _get(oidc_server, oidc_issuer.token(aud=["account", oidc_issuer.audience])).status_code == 200


def test_oidc_jwks_from_discovery_and_groups_claim(oidc_issuer: OidcIssuer) -> None:
    http = HttpSettings.model_validate(
        {
            "listen": "0.0.0.0:8080",
            "auth": "oidc",
            "oidc": {
                "issuer": oidc_issuer.issuer,
                "audience": oidc_issuer.audience,
                "required_role": "/cscs/storage",
                "role_claim": "groups",
            },
        }
    )
    auth = build_authenticator(http)
    assert auth.scheme == "oidc" and auth.blocking
    assert auth.check(f"Bearer {oidc_issuer.token(groups=['/cscs/storage'])}") is AuthResult.ALLOWED
    assert auth.check(f"Bearer {oidc_issuer.token(groups=['/cscs'])}") is AuthResult.FORBIDDEN
    assert auth.check(f"Bearer {oidc_issuer.token(groups='/cscs/storage /other')}") is AuthResult.ALLOWED


def test_oidc_key_rotation_and_refetch_limit(oidc_issuer: OidcIssuer) -> None:
    clock = [1000.0]
    jwks = JwksCache(oidc_issuer.issuer, oidc_issuer.jwks_url, min_refresh=30, ttl=300, monotonic=lambda: clock[0])
    auth = OidcAuth(issuer=oidc_issuer.issuer, audience=oidc_issuer.audience, jwks=jwks)
    assert auth.check(f"Bearer {oidc_issuer.token()}") is AuthResult.ALLOWED
    assert oidc_issuer.jwks_fetches == 1
    # made-up key ids do not make the daemon fetch the JWKS again and again
    for i in range(5):
        assert auth.check(f"Bearer {oidc_issuer.token(kid=f'made-up-{i}')}") is AuthResult.UNAUTHENTICATED
    assert oidc_issuer.jwks_fetches == 1
    # a rotated key is picked up once the refetch interval has passed
    import json

    new_key = oidc_issuer.other_rsa_key
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(new_key.public_key()))
    jwk.update({"kid": "rsa-2", "alg": "RS256", "use": "sig"})
    oidc_issuer.extra_keys.append(jwk)
    token = oidc_issuer.token(kid="rsa-2", key=new_key)
    assert auth.check(f"Bearer {token}") is AuthResult.UNAUTHENTICATED
    clock[0] += 31
    assert auth.check(f"Bearer {token}") is AuthResult.ALLOWED
    assert oidc_issuer.jwks_fetches == 2
    # keys expire after the ttl and are fetched again; an outage keeps the old keys
    clock[0] += 301
    oidc_issuer.stop()
    assert auth.check(f"Bearer {oidc_issuer.token()}") is AuthResult.ALLOWED


def test_oidc_issuer_unreachable_is_401_not_500(api_server: ApiServerFactory) -> None:
    auth = OidcAuth(issuer="http://127.0.0.1:9/realms/x", audience="a", jwks_url="http://127.0.0.1:9/certs")
    server = api_server({"capstor": fill_mirror("capstor", 1)}, auth=auth)
    token = jwt.encode({"iss": "x", "aud": "a", "exp": 2**40}, "k" * 32, algorithm="HS256", headers={"kid": "k"})
    _assert_401(_get(server, token))


def test_jwks_keeps_only_rs256_and_es256_signing_keys() -> None:
    import json

    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    p384 = ec.generate_private_key(ec.SECP384R1())
    keys = []
    for kid, jwk_json, extra in (
        ("ok", jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key.public_key()), {}),
        ("enc", jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key.public_key()), {"use": "enc"}),
        ("rs384", jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key.public_key()), {"alg": "RS384"}),
        ("p384", jwt.algorithms.ECAlgorithm.to_jwk(p384.public_key()), {}),
        ("hmac", json.dumps({"kty": "oct", "k": "c2VjcmV0"}), {}),
    ):
        jwk = json.loads(jwk_json)
        jwk.update({"kid": kid, **extra})
        keys.append(jwk)
    jwks = JwksCache("https://issuer", "https://issuer/certs", fetch=lambda url, timeout: {"keys": keys})
    assert jwks.key_for("ok") is not None
    for kid in ("enc", "rs384", "p384", "hmac"):
        assert jwks.key_for(kid) is None
    assert jwks.key_for(None) is not None  # exactly one usable key: a token without kid may use it


def test_claim_values() -> None:
    claims = {
        "roles": ["a", 1, "b"],
        "scope": "read write",
        "realm_access": {"roles": ["r"]},
        "resource_access": {"cscs-api": {"roles": ["storage"]}},
        "https://example.org/roles": ["dotted"],
    }
    assert claim_values(claims, "roles") == ["a", "b"]
    assert claim_values(claims, "scope") == ["read", "write"]
    assert claim_values(claims, "realm_access.roles") == ["r"]
    assert claim_values(claims, "resource_access.cscs-api.roles") == ["storage"]
    assert claim_values(claims, "https://example.org/roles") == ["dotted"]
    assert claim_values(claims, "missing.path") == []
    assert claim_values(claims, "realm_access") == []


def test_openapi_declares_bearer_security(token_server: Any) -> None:
    schema = token_server.get("/openapi.json", headers=_bearer(TOKEN)).json()
    assert schema["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}
    operation = schema["paths"]["/api/storage-resources/"]["get"]
    assert operation["security"] == [{"bearer": []}]
    assert {"401", "403"} <= set(operation["responses"])
    assert "security" not in schema["paths"]["/healthz"]["get"]
