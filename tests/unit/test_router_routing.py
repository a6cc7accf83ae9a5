"""The router's routing decision (lmproxy.router.routing), its answers and its settings: pure
functions, tested on their own and, where the input space is large, exhaustively by
generated cases."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lmproxy.config import parse_config
from lmproxy.config.model import Router
from lmproxy.paths import Paths
from lmproxy.router import answers
from lmproxy.router.requestlog import _field
from lmproxy.router.routing import (
    BODY_ROUTES,
    QUERY_ROUTES,
    Catalog,
    Kind,
    Listing,
    MultipartModel,
    Refusal,
    Upstream,
    classify,
    model_from_json,
    model_from_query,
    multipart_boundary,
)
from lmproxy.router.settings import KeysFileError, digest, file_keys, settings_of

# --- What a path asks for ----------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(BODY_ROUTES))
def test_every_body_route_takes_post_only(path: str) -> None:
    assert classify("POST", path).kind is Kind.BODY
    assert classify("POST", path + "?x=1").kind is Kind.BODY
    assert classify("GET", path).kind is Kind.WRONG_METHOD


@pytest.mark.parametrize("path", sorted(QUERY_ROUTES))
def test_query_routes_take_get_and_the_model_from_the_query(path: str) -> None:
    route = classify("GET", f"{path}?model=qwen-7b&x=1")
    assert route.kind is Kind.QUERY and route.path == path
    assert model_from_query(route.query) == "qwen-7b"
    refused = model_from_query("x=1")
    assert isinstance(refused, Refusal) and refused.status == 400 and refused.param == "model"


def test_the_model_list_and_one_model_by_an_id_with_a_slash() -> None:
    assert classify("GET", "/v1/models").kind is Kind.MODELS
    assert classify("HEAD", "/v1/models").kind is Kind.MODELS
    route = classify("GET", "/v1/models/Qwen/Qwen2.5-7B-Instruct")
    assert route.kind is Kind.MODEL and route.model == "Qwen/Qwen2.5-7B-Instruct"
    assert classify("GET", "/v1/models/Qwen%2FQwen2.5").model == "Qwen/Qwen2.5"
    assert classify("DELETE", "/v1/models/x").kind is Kind.WRONG_METHOD
    assert classify("GET", "/health").kind is Kind.HEALTH


@given(st.sampled_from(["GET", "POST", "PUT"]), st.text(min_size=1).map(lambda t: "/" + t))
def test_any_other_path_is_unknown(method: str, path: str) -> None:
    route = classify(method, path)
    known = path.split("?", 1)[0]
    if (
        known not in BODY_ROUTES | QUERY_ROUTES
        and not known.startswith(("/v1/models", "/models"))
        and known not in ("/health", "/v1/health")
    ):
        assert route.kind is Kind.UNKNOWN


# --- The model of a JSON body --------------------------------------------------------------------


@given(
    st.text(min_size=1),
    st.dictionaries(
        st.text(max_size=10).filter(lambda k: k != "model"),
        st.recursive(st.none() | st.integers() | st.text(max_size=20), st.lists, max_leaves=8),
        max_size=5,
    ),
)
def test_the_model_of_any_json_object(model: str, others: dict[str, object]) -> None:
    body = json.dumps({**others, "model": model}).encode()
    assert model_from_json(body) == model


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"prompt": "x"}', "you must provide a model parameter"),
        (b'{"model": 7}', "non-empty string"),
        (b'{"model": ""}', "non-empty string"),
        (b"[" * 100_000, "not valid JSON"),  # too deep: no RecursionError escapes
        (b"\xff\xfe", "not valid JSON"),
    ],
)
def test_bad_json_bodies_are_400s_that_say_why(body: bytes, says: str) -> None:
    refused = model_from_json(body)
    assert isinstance(refused, Refusal) and refused.status == 400
    assert says in refused.message


# --- The model field of a multipart body ----------------------------------------------------------


def multipart(boundary: str, fields: list[tuple[str, bytes]]) -> bytes:
    body = b""
    for name, value in fields:
        filename = '; filename="f.bin"' if name == "file" else ""
        body += (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"{filename}\r\n\r\n'
        ).encode()
        body += value + b"\r\n"
    return body + f"--{boundary}--\r\n".encode()


BOUNDARY = "----lmproxy7d93b2"
values = st.binary(max_size=300).filter(lambda v: BOUNDARY.encode() not in v)
names = st.sampled_from(["file", "language", "prompt", "temperature"])


@given(
    st.lists(st.tuples(names, values), max_size=4),
    st.text(min_size=1, max_size=40).filter(lambda t: "\r" not in t and "-" not in t),
    st.integers(0, 4),
    st.lists(st.integers(1, 200), min_size=1, max_size=30),
)
def test_the_model_field_is_found_wherever_it_is_and_however_the_body_comes(
    others: list[tuple[str, bytes]], model: str, at: int, chunks: list[int]
) -> None:
    fields = list(others)
    fields.insert(min(at, len(fields)), ("model", model.encode()))
    body = multipart(BOUNDARY, fields)
    finder = MultipartModel(BOUNDARY.encode())
    end = 0
    found = None
    for size in [*chunks, len(body)]:
        end = min(len(body), end + size)
        found = finder.feed(body[:end], complete=end == len(body))
        if found is not None:
            break
    assert found == model
    # Never later than the model field's end (what comes after it is never waited for).
    assert end <= len(body)


def test_a_multipart_body_without_a_model_is_refused_once_complete() -> None:
    body = multipart(BOUNDARY, [("file", b"x" * 1000)])
    finder = MultipartModel(BOUNDARY.encode())
    assert finder.feed(body[:500], complete=False) is None
    refused = finder.feed(body, complete=True)
    assert isinstance(refused, Refusal) and refused.param == "model"


def test_the_boundary_of_a_content_type() -> None:
    assert multipart_boundary(b"multipart/form-data; boundary=abc") == b"abc"
    assert multipart_boundary(b'Multipart/Form-Data; charset=x; boundary="a b"') == b"a b"
    assert multipart_boundary(b"application/json") is None
    assert multipart_boundary(b"multipart/form-data") == b""
    refused = MultipartModel(b"").feed(b"--x\r\n", complete=True)
    assert isinstance(refused, Refusal) and "boundary" in refused.message


# --- Model ids to services, and the answers ------------------------------------------------


def test_the_catalog_routes_known_ids_and_names_the_others() -> None:
    a, b = Upstream("a", host="127.0.0.1", port=1), Upstream("b", path="/run/b.sock")
    catalog = Catalog(
        {"a": a, "b": b}, [Listing("m1", "a"), Listing("m2", "b"), Listing("m3", "b")]
    )
    assert catalog.route("m1") is a and catalog.route("m3") is b
    refused = catalog.route("gpt-9")
    assert isinstance(refused, Refusal)
    assert (refused.status, refused.code, refused.param) == (404, "model_not_found", "model")
    assert "m1, m2, m3" in refused.message


def test_errors_have_openais_shape_and_a_complete_http_frame() -> None:
    data = answers.error(answers.missing_key(), keep_alive=True)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401 Unauthorized\r\n")
    assert b"WWW-Authenticate: Bearer" in head and b"Connection: keep-alive" in head
    assert f"Content-Length: {len(body)}".encode() in head
    assert json.loads(body) == {
        "error": {
            "message": answers.missing_key().message,
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }
    assert answers.response(200, {}, keep_alive=False, head_only=True).endswith(b"\r\n\r\n")


def test_models_document_is_openais_list_with_lmproxys_fields() -> None:
    listing = [Listing("qwen", "Qwen/Qwen2.5"), Listing("qwen-7b", "Qwen/Qwen2.5")]
    document = answers.models_document(listing, 1700000000, {"Qwen/Qwen2.5": "running"})
    assert document["object"] == "list"
    assert [m["id"] for m in document["data"]] == ["qwen", "qwen-7b"]
    assert document["data"][0] == {
        "id": "qwen",
        "object": "model",
        "created": 1700000000,
        "owned_by": "lmproxy",
        "lmproxy": {"service": "Qwen/Qwen2.5", "state": "running"},
    }
    assert answers.models_document(listing, 0, {})["data"][1]["lmproxy"]["state"] == "stopped"


# --- Settings from a config ----------------------------------------------------------------------


def router_config(tmp_path: Path, **router: object) -> str:
    return json.dumps(
        {
            "OpenAiApi": {"ListenPort": 8080, **router},
            "Services": [
                {
                    "Name": "Qwen/Qwen2.5-7B-Instruct",
                    "OpenAiApi": True,
                    "OpenAiApiModels": ["qwen", "qwen-7b"],
                    "ProxyTargetHost": "127.0.0.1",
                    "ProxyTargetPort": 9001,
                    "Command": "/bin/true",
                },
                {
                    "Name": "direct",
                    "ListenPort": 8081,
                    "ListenAddress": "0.0.0.0",
                    "OpenAiApi": True,
                    "ProxyTargetHost": "127.0.0.1",
                    "ProxyTargetPort": 9002,
                    "Command": "/bin/true",
                },
                {
                    "Name": "not-routed",
                    "ListenPort": 8082,
                    "ProxyTargetHost": "127.0.0.1",
                    "ProxyTargetPort": 9003,
                    "Command": "/bin/true",
                },
            ],
        }
    )


def test_settings_route_to_each_services_own_socket(tmp_path: Path) -> None:
    config = parse_config(router_config(tmp_path), base_dir=tmp_path)
    paths = Paths(tmp_path, tmp_path, tmp_path / "run" / "lmproxy")
    settings = settings_of(config, paths, 1)
    qwen = settings.catalog.route("qwen-7b")
    assert isinstance(qwen, Upstream) and qwen.path is not None
    assert qwen.path.startswith(str(tmp_path / "run" / "lmproxy-private") + "/")
    assert settings.catalog.route("direct") == Upstream("direct", host="127.0.0.1", port=8081)
    assert isinstance(settings.catalog.route("not-routed"), Refusal)
    assert settings.authorized(None) is True  # no keys: anyone


def test_keys_from_the_config_and_a_file_and_a_file_that_cannot_be_read(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# a comment\n\n  sk-file  \n")
    text = router_config(tmp_path, ApiKeys=["sk-config"], ApiKeysFile="keys")
    config = parse_config(text, base_dir=tmp_path)
    assert config.router.api_keys_file == str(keys)  # relative: from the base directory
    settings = settings_of(config, Paths(tmp_path, tmp_path, tmp_path), 1)
    assert settings.authorized(b"Bearer sk-config") is True
    assert settings.authorized(b"bearer sk-file") is True
    assert settings.authorized(b"Bearer sk-other") is False
    assert settings.authorized(b"Basic sk-config") is False
    assert settings.authorized(None) is False
    assert file_keys(Router(api_keys_file=str(keys))) == ["sk-file"]
    keys.unlink()
    settings = settings_of(config, Paths(tmp_path, tmp_path, tmp_path), 1)
    assert isinstance(settings.authorized(b"Bearer sk-config"), KeysFileError)
    assert digest("x") != digest("y")


def test_journal_fields_with_a_newline_use_the_binary_form() -> None:
    assert _field("LMPROXY_MODEL", "qwen") == b"LMPROXY_MODEL=qwen\n"
    value = "a\nb"
    assert _field("MESSAGE", value) == b"MESSAGE\n" + struct.pack("<Q", 3) + b"a\nb\n"
