"""The shim's policy for form fields and query parameters (README, "The HTTP shim"), over the
class: every numeric field of every ``/api`` task's form, every query parameter of every
``/v1`` route, duplicates of every singular field, two files for one input."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
from google.protobuf import descriptor

from aiserver.gateway import Gateway
from aiserver.gateway.app import ROUTES, TASKS
from aiserver.gateway.fields import is_map, is_repeated
from aiserver.gateway.routes import Route
from tests.gateway.fake_backend import FakeBackend, png

FD = descriptor.FieldDescriptor
INTEGERS = {
    FD.TYPE_INT32,
    FD.TYPE_INT64,
    FD.TYPE_UINT32,
    FD.TYPE_UINT64,
    FD.TYPE_SINT32,
    FD.TYPE_SINT64,
    FD.TYPE_FIXED32,
    FD.TYPE_FIXED64,
    FD.TYPE_SFIXED32,
    FD.TYPE_SFIXED64,
}
FLOATS = {FD.TYPE_FLOAT, FD.TYPE_DOUBLE}
BAD_INTEGERS = ["٣", "1_0", " 5", "5 ", "", "0x10", "1.5", "+-1", "١٢"]
BAD_FLOATS = ["٣", "1_0.5", " 0.5", "", "nan", "inf", "-Infinity", "1e999", "0x1p3"]
IMAGE = png((10, 20, 30))


def numeric_fields(desc: descriptor.Descriptor, prefix: str = "") -> Iterator[tuple[str, FD]]:
    """(dotted name, field) of each singular numeric field, one level into message fields."""
    for f in desc.fields:
        if is_repeated(f) or is_map(f):
            continue
        if f.type in INTEGERS | FLOATS:
            yield prefix + f.name, f
        elif (
            f.type == FD.TYPE_MESSAGE
            and not prefix
            and not f.message_type.full_name.startswith("google.protobuf.")
        ):
            yield from numeric_fields(f.message_type, f.name + ".")


def singular_scalars(desc: descriptor.Descriptor) -> Iterator[FD]:
    for f in desc.fields:
        if not is_repeated(f) and f.type != FD.TYPE_MESSAGE:
            yield f


def bad_values(f: FD) -> list[str]:
    return BAD_FLOATS if f.type in FLOATS else BAD_INTEGERS


def concrete(route: Route) -> str:
    path = route.template.openapi_path
    for var in route.template.variables:
        path = path.replace("{" + var + "}", "x")
    return path


def query_routes(gw: Gateway) -> list[Route]:
    assert gw.app is not None
    return [r for r in gw.app[ROUTES] if r.body != "*"]


def _errors(res: httpx.Response) -> list[tuple[str, str]]:
    assert res.status_code == 400, res.text
    return [(e["fieldName"], e["errorCode"]) for e in res.json()["responseStatus"]["errors"]]


def multipart(fields: list[tuple[str, str]], files: list[tuple[str, str]]) -> bytes:
    """A form in exactly this order, duplicates kept: text fields, then files (name, file)."""
    out = b""
    for name, value in fields:
        out += f'--B\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
    for name, file_name in files:
        out += (
            (
                f'--B\r\nContent-Disposition: form-data; name="{name}"; filename="{file_name}"\r\n'
                "Content-Type: image/png\r\n\r\n"
            ).encode()
            + IMAGE
            + b"\r\n"
        )
    return out + b"--B--\r\n"


async def _form(
    http: httpx.AsyncClient,
    path: str,
    fields: list[tuple[str, str]],
    files: tuple[tuple[str, str], ...] = (("image", "a.png"),),
) -> Any:
    return await http.post(
        path,
        content=multipart(fields, list(files)),
        headers={"Content-Type": "multipart/form-data; boundary=B"},
    )


async def test_every_numeric_form_field_takes_ascii_numbers_only(
    fake_gateway: Gateway, fake_http: httpx.AsyncClient
) -> None:
    assert fake_gateway.app is not None
    tasks = {t.name: t for t in fake_gateway.app[TASKS].values()}
    checked = 0
    for name, task in sorted(tasks.items()):
        for field_name, f in numeric_fields(task.upload.params):
            sent = field_name.rsplit(".", 1)[-1] if "." in field_name else field_name
            for value in bad_values(f):
                res = await _form(fake_http, f"/api/{name}", [(sent, value)])
                assert _errors(res) == [(sent, "INVALID_VALUE")], (name, sent, value, res.text)
                checked += 1
    assert checked >= 50


async def test_every_singular_form_field_given_twice_is_refused(
    fake_gateway: Gateway, fake_http: httpx.AsyncClient
) -> None:
    assert fake_gateway.app is not None
    for task in fake_gateway.app[TASKS].values():
        for f in singular_scalars(task.upload.params):
            spelled = f.json_name[0].upper() + f.json_name[1:]  # AI Server's spelling
            fields = [(f.name, "1"), (spelled, "1")]
            res = await _form(fake_http, f"/api/{task.name}", fields)
            assert "DUPLICATE_FIELD" in {code for _, code in _errors(res)}, (task.name, f.name)
        # The query and the form name the same field.
        f = next(singular_scalars(task.upload.params))
        value = "1" if f.type != FD.TYPE_STRING else "a"
        res = await _form(fake_http, f"/api/{task.name}?{f.name}={value}", [(f.json_name, value)])
        assert "DUPLICATE_FIELD" in {code for _, code in _errors(res)}, (task.name, res.text)


async def test_two_files_for_one_input_are_refused(
    fake_gateway: Gateway, fake_http: httpx.AsyncClient
) -> None:
    assert fake_gateway.app is not None
    for task in fake_gateway.app[TASKS].values():
        # Streamed (a field first: the call opens at the first file) and spooled (files first:
        # refused before any call). The fake backend serves only the generative tasks; a light
        # one would end the opened call as UNIMPLEMENTED, racing the duplicate's refusal.
        streamed = [[("Tag", "x")]] if task.generative else []
        for fields in [*streamed, []]:
            files = (("image", "a.png"), ("IMAGE", "b.png"))
            res = await _form(fake_http, f"/api/{task.name}", fields, files)
            assert _errors(res) == [("IMAGE", "DUPLICATE_FILE")], (task.name, res.text)


async def test_every_query_parameter_follows_the_policy(
    fake_gateway: Gateway, fake_http: httpx.AsyncClient
) -> None:
    numeric = duplicated = 0
    for route in query_routes(fake_gateway):
        path = concrete(route)
        desc = route.method.input_type
        for name, f in numeric_fields(desc):
            for value in bad_values(f):
                res = await fake_http.request(route.http_method, path, params=[(name, value)])
                assert _errors(res) == [(name, "INVALID_VALUE")], (path, name, value, res.text)
                numeric += 1
        for f in singular_scalars(desc):
            if f.name in route.template.variables:
                res = await fake_http.request(route.http_method, path, params={f.name: "y"})
                assert _errors(res) == [(f.name, "DUPLICATE_FIELD")], (path, f.name)
                continue
            value = "1" if f.type in INTEGERS | FLOATS else "true" if f.type == FD.TYPE_BOOL else ""
            if f.type == FD.TYPE_ENUM:
                value = "1"
            res = await fake_http.request(
                route.http_method,
                path,
                params=[(f.name, value or "a"), (f.json_name, value or "b")],
            )
            assert _errors(res) == [(f.name, "DUPLICATE_FIELD")], (path, f.name, res.text)
            duplicated += 1
    assert numeric >= 9 and duplicated >= 5


async def test_a_form_carries_at_most_max_files_files(
    fake: FakeBackend, fake_http: httpx.AsyncClient
) -> None:
    """Each file part sent before any text field holds a spooled file (a descriptor) until
    the body ends: one past the limit (8) is refused before it is read or spooled."""
    eight = [(f"f{i}", "a.png") for i in range(7)] + [("image", "a.png")]
    for fields in ([("Tag", "x")], []):  # streamed, spooled
        res = await _form(fake_http, "/api/ImageUpscale", fields, tuple(eight))
        assert res.status_code == 200, res.text
        assert len(fake.state.uploads[-1].files) == 8
        for files in ([*eight, ("f9", "b.png")], [(f"e{i}", "") for i in range(3000)]):
            uploads = len(fake.state.uploads)
            res = await _form(fake_http, "/api/ImageUpscale", fields, tuple(files))
            assert res.status_code == 413, res.text
            body = res.json()["responseStatus"]
            assert body["errorCode"] == "TOO_MANY_FILES", res.text
            assert [(e["fieldName"], e["errorCode"]) for e in body["errors"]] == [
                (files[8][0], "TOO_MANY_FILES")
            ]
            if not fields:  # spooled: refused before the call opens (a streamed call's
                # cancel races the server's read of the half-sent stream)
                assert len(fake.state.uploads) == uploads
