"""Request bodies that are not strict JSON get 422 in the error body, naming the field."""

# Fixtures are imported from svc_support, so every test parameter redefines one.
# ruff: noqa: F811

from __future__ import annotations

import pytest
from svc_support import (  # noqa: F401 - fixtures
    StartService,
    auth,
    derive_body,
    sign_body,
    start_service,
    svc_backend,
    svc_tls,
)

from plings_hsm.service.json_body import JsonBodyError, parse_json_body

JSON_HEADERS = {**auth(), "Content-Type": "application/json"}


def _body_with(manufacturer: str) -> bytes:
    return (
        '{"manufacturer": ' + manufacturer + ', "category": 1, "classId": 1, '
        '"batch": 99999, "quantity": 1, "walletVersion": 1}'
    ).encode("ascii")


class TestBodyParsingOverHttps:
    """Each malformed body gets 422 with a code, a clear message and a field."""

    def test_huge_integer_names_field(self, start_service: StartService) -> None:
        svc = start_service()
        response = svc.client.post(
            "/api/derive-keys", headers=JSON_HEADERS, content=_body_with("9" * 5000)
        )
        error = response.json()["error"]
        assert response.status_code == 422
        assert error["field"] == "manufacturer"
        assert error["code"] == "invalid_request"
        assert "5000 digits; the limit is 20 digits" in error["message"]
        assert len(error["message"]) < 200

    def test_21_digit_integer_names_field(self, start_service: StartService) -> None:
        svc = start_service()
        response = svc.client.post(
            "/api/derive-keys", headers=JSON_HEADERS, content=_body_with("1" * 21)
        )
        assert response.status_code == 422
        assert response.json()["error"]["field"] == "manufacturer"

    def test_huge_integer_in_array(self, start_service: StartService) -> None:
        svc = start_service()
        content = b'{"manufacturer": [1, ' + b"7" * 5000 + b"]}"
        response = svc.client.post("/api/derive-keys", headers=JSON_HEADERS, content=content)
        assert response.status_code == 422
        assert response.json()["error"]["field"] == "manufacturer"

    def test_top_level_huge_integer(self, start_service: StartService) -> None:
        svc = start_service()
        response = svc.client.post("/api/derive-keys", headers=JSON_HEADERS, content=b"8" * 5000)
        assert response.status_code == 422
        assert response.json()["error"]["field"] == "body"

    def test_nan_names_field(self, start_service: StartService) -> None:
        svc = start_service()
        response = svc.client.post(
            "/api/derive-keys", headers=JSON_HEADERS, content=_body_with("NaN")
        )
        assert response.status_code == 422
        assert response.json()["error"]["field"] == "manufacturer"
        assert "NaN" in response.json()["error"]["message"]

    def test_invalid_utf8(self, start_service: StartService) -> None:
        svc = start_service()
        content = b'{"manufacturer": "\xff\xfe"}'
        response = svc.client.post("/api/derive-keys", headers=JSON_HEADERS, content=content)
        error = response.json()["error"]
        assert response.status_code == 422
        assert error["code"] == "invalid_json"
        assert error["field"] == "body"
        assert error["message"].startswith("body is not UTF-8: byte 0xff at offset 18")

    def test_malformed_json_message(self, start_service: StartService) -> None:
        svc = start_service()
        response = svc.client.post(
            "/api/derive-keys", headers=JSON_HEADERS, content=b'{"manufacturer": 1,'
        )
        error = response.json()["error"]
        assert response.status_code == 422
        assert error["code"] == "invalid_json"
        assert error["field"] == "body"
        assert error["message"].startswith("body is not valid JSON: ")
        assert "line 1, column 20" in error["message"]

    def test_too_deep_body(self, start_service: StartService) -> None:
        svc = start_service(json_depth_max=4)
        content = b'{"manufacturer": [[[[[1]]]]]}'
        response = svc.client.post("/api/derive-keys", headers=JSON_HEADERS, content=content)
        assert response.status_code == 422
        assert response.json()["error"]["field"] == "body"

    def test_no_framework_400(self, start_service: StartService) -> None:
        svc = start_service()
        bodies = [_body_with("9" * 5000), b'{"a": "\xc3\x28"}', b"[" * 10 + b"]" * 10]
        for content in bodies:
            response = svc.client.post("/api/derive-keys", headers=JSON_HEADERS, content=content)
            assert response.status_code == 422, content[:40]
            assert "error parsing the body" not in response.text


class TestParseJsonBody:
    """The parser itself, for cases the service's depth limit stops first."""

    def test_recursion_is_too_deep(self) -> None:
        with pytest.raises(JsonBodyError) as caught:
            parse_json_body(b"[" * 100_000 + b"]" * 100_000)
        assert caught.value.code == "too_deep"
        assert caught.value.field == "body"

    def test_valid_body_parsed(self) -> None:
        assert parse_json_body(b'{"a": [1, -2, 3.5]}') == {"a": [1, -2, 3.5]}

    def test_20_digit_integer_accepted(self) -> None:
        assert parse_json_body(b'{"a": 18446744073709551615}') == {"a": 2**64 - 1}


class TestFieldValidation:
    """Field errors quote the value cut short, with the rule; strays and repeats are 422."""

    def test_message_shows_value(self, start_service: StartService) -> None:
        svc = start_service()
        response = svc.client.post(
            "/api/derive-keys", headers=auth(), json=derive_body(manufacturer="abc")
        )
        error = response.json()["error"]
        assert response.status_code == 422
        assert error["field"] == "manufacturer"
        assert error["message"] == 'manufacturer "abc" is invalid: Input should be a valid integer'

    def test_long_value_cut(self, start_service: StartService) -> None:
        svc = start_service()
        response = svc.client.post(
            "/api/derive-keys", headers=auth(), json=derive_body(manufacturer="m" * 500)
        )
        message = response.json()["error"]["message"]
        assert response.status_code == 422
        assert message.startswith('manufacturer "' + "m" * 23 + "... (502 characters)")
        assert "m" * 30 not in message

    def test_limit_in_message(self, start_service: StartService) -> None:
        svc = start_service()
        response = svc.client.post(
            "/api/derive-keys", headers=auth(), json=derive_body(batch=2**31)
        )
        message = response.json()["error"]["message"]
        assert response.status_code == 422
        assert message.startswith("batch 2147483648 is invalid: ")
        assert "2147483647" in message

    def test_misspelt_field_rejected(self, start_service: StartService) -> None:
        svc = start_service()
        body = derive_body()
        del body["walletVersion"]
        body["walletversion"] = 2
        response = svc.client.post("/api/derive-keys", headers=auth(), json=body)
        assert response.status_code == 422
        assert response.json()["error"]["field"] == "walletversion"
        assert "not a field of this request" in response.json()["error"]["message"]

    def test_sign_unknown_field_rejected(self, start_service: StartService) -> None:
        svc = start_service()
        response = svc.client.post("/api/sign", headers=auth(), json=sign_body(b"tag", quantity=1))
        assert response.status_code == 422
        assert response.json()["error"]["field"] == "quantity"

    def test_duplicate_key_rejected(self, start_service: StartService) -> None:
        svc = start_service()
        content = (
            b'{"manufacturer": 1, "category": 1, "classId": 1, "batch": 99999, '
            b'"quantity": 99999999, "quantity": 1}'
        )
        response = svc.client.post("/api/derive-keys", headers=JSON_HEADERS, content=content)
        error = response.json()["error"]
        assert response.status_code == 422
        assert error["field"] == "quantity"
        assert (
            error["message"]
            == "quantity appears more than once in one object; send each field once"
        )

    @pytest.mark.parametrize("route", ["/api/derive-keys", "/api/sign"])
    def test_null_wallet_rejected(self, start_service: StartService, route: str) -> None:
        svc = start_service()
        body = (
            derive_body(walletVersion=None)
            if "derive" in route
            else sign_body(b"tag", walletVersion=None)
        )
        response = svc.client.post(route, headers=auth(), json=body)
        assert response.status_code == 422
        assert response.json()["error"]["field"] == "walletVersion"
        assert "null is not allowed" in response.json()["error"]["message"]

    def test_missing_field_named(self, start_service: StartService) -> None:
        svc = start_service()
        body = derive_body()
        del body["batch"]
        response = svc.client.post("/api/derive-keys", headers=auth(), json=body)
        assert response.status_code == 422
        assert response.json()["error"]["field"] == "batch"
        assert response.json()["error"]["message"] == "batch is missing; it is required"
