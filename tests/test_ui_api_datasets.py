"""The dataset endpoints of `dopsd ui` through Starlette's test client: creating a dataset, uploading images and
captions (with the dataset check's refusals), editing captions, moving files to the trash, the upload size limit,
and the per-file problems of a folder made outside the app."""

from __future__ import annotations

import pytest
from conftest import write_concept_folder
from starlette.testclient import TestClient
from ui_support import HEADERS, close_ctx, make_ctx, png_bytes

from dopsd.ui.server import create_app


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A home with the miniature's concept dataset; these endpoints start no job, so nothing else is needed."""
    home = tmp_path_factory.mktemp("ui-home")
    ctx = make_ctx(home)
    client = TestClient(create_app(ctx), headers=HEADERS)
    try:
        assert client.post("/api/datasets", json={"mini": True}).status_code == 200
        yield {"home": home, "ctx": ctx, "client": client}
    finally:
        close_ctx(ctx)


def test_dataset_create_upload_caption_remove(world, tmp_path):
    c, home = world["client"], world["home"]
    assert c.post("/api/datasets", json={"name": "cats"}).status_code == 200
    assert c.post("/api/datasets", json={"name": "cats"}).status_code == 409
    assert c.post("/api/datasets", json={"name": "../cats"}).status_code == 400
    files = [
        ("files", ("photo one.png", png_bytes((32, 32)), "image/png")),
        ("files", ("photo one.txt", b"a [V] circle\n", "text/plain")),
        ("files", ("broken.png", b"\x89PNG\r\n\x1a\nnot really", "image/png")),
        ("files", ("tiny.png", png_bytes((4, 4)), "image/png")),
        ("files", ("notes.exe", b"MZ", "application/octet-stream")),
    ]
    r = c.post("/api/datasets/cats/files", files=files, data={"preset": "mini"})
    assert r.status_code == 200, r.text
    saved, refused = r.json()["saved"], {x["file"]: x["problems"] for x in r.json()["refused"]}
    assert [s["saved"] for s in saved] == ["photo_one.png"] and saved[0]["caption"]
    # the dataset check's own words (it names the problem); the app adds only what it checks itself
    assert refused["broken.png"] and refused["tiny.png"]  # undecodable; under the mini preset's minimum side
    assert "not an image" in refused["notes.exe"][0]
    assert sorted(p.name for p in (home / "datasets/cats").iterdir()) == ["photo_one.png", "photo_one.txt"]
    assert r.json()["counts"] == {"images": 1, "captions": 1}  # counted apart, not "2 files"
    assert refused["broken.png"] == ["cannot read image (Truncated File Read)"]  # no exception name, no temp path
    # the same name again is refused (nothing overwritten, nothing added under another name) unless asked to keep both
    same = ("files", ("photo one.png", png_bytes((32, 32), (1, 2, 3)), "image/png"))
    refused_again = c.post("/api/datasets/cats/files", files=[same])
    assert (
        refused_again.status_code == 400
        and "already has photo_one.png" in refused_again.json()["refused"][0]["problems"][0]
    )
    again = c.post("/api/datasets/cats/files", files=[same], data={"on_exists": "keep"})
    assert again.json()["saved"][0]["saved"] == "photo_one-2.png"
    # a larger preset refuses the same small image (zimage-turbo trains at 1024²: min side 512)
    big = c.post(
        "/api/datasets/cats/files",
        files=[("files", ("x.png", png_bytes((64, 64)), "image/png"))],
        data={"preset": "zimage-turbo"},
    )
    assert big.status_code == 400 and big.json()["refused"][0]["problems"]

    view = c.get("/api/datasets/cats", params={"trigger_word": "sks"}).json()
    by_name = {f["name"]: f for f in view["files"]}
    assert by_name["photo_one.png"]["trained_as"] == ["a sks circle"]
    assert not view["ok"] and any("photo_one-2.txt" in p for p in by_name["photo_one-2.png"]["problems"])
    assert view["problems"] == []  # every problem is shown with its file
    assert (
        c.put("/api/datasets/cats/captions", json={"image": "photo_one-2.png", "text": "a [V] square"}).status_code
        == 200
    )
    assert (home / "datasets/cats/photo_one-2.txt").read_text() == "a [V] square\n"
    assert c.get("/api/datasets/cats", params={"trigger_word": "sks"}).json()["ok"]
    assert c.put("/api/datasets/cats/captions", json={"image": "../../x.png", "text": "t"}).status_code == 404
    assert c.put("/api/datasets/cats/settings", json={"preset": "mini", "trigger_word": "sks"}).status_code == 200
    listed = {d["name"]: d for d in c.get("/api/datasets").json()["datasets"]}
    assert listed["cats"]["trigger_word"] == "sks" and listed["cats"]["images"] == 2

    # a caption uploaded on its own joins its image, unless that image has one already
    c.post("/api/datasets/cats/files", files=[("files", ("lonely.png", png_bytes((32, 32)), "image/png"))])
    alone = c.post(
        "/api/datasets/cats/files",
        files=[
            ("files", ("lonely.txt", b"[V] alone", "text/plain")),
            ("files", ("photo_one.txt", b"replaced?", "text/plain")),
            ("files", ("nobody.txt", b"x", "text/plain")),
        ],
    ).json()
    assert [s["saved"] for s in alone["saved"]] == ["lonely.txt"]
    assert (home / "datasets/cats/lonely.txt").read_text() == "[V] alone"
    assert (home / "datasets/cats/photo_one.txt").read_text() == "a [V] circle\n"  # not overwritten
    assert {r["file"] for r in alone["refused"]} == {"photo_one.txt", "nobody.txt"}

    moved = c.post("/api/datasets/cats/remove", json={"image": "photo_one-2.png"}).json()
    assert sorted(moved["moved"]) == ["photo_one-2.png", "photo_one-2.txt"]
    assert (home / moved["to"] / "photo_one-2.png").is_file()  # in the trash, not deleted
    assert not (home / "datasets/cats/photo_one-2.png").exists()


def test_upload_size_limit(world):
    c, ctx = world["client"], world["ctx"]
    old = ctx.max_upload
    ctx.max_upload = 1000
    try:
        r = c.post(
            "/api/datasets/mini-concept/files",
            files=[("files", ("big.png", png_bytes((300, 300)) + b"\0" * 2000, "image/png"))],
        )
    finally:
        ctx.max_upload = old
    assert r.status_code == 400 and "over the upload limit" in r.json()["refused"][0]["problems"][0]


def test_dataset_check_lists_problems_per_file_for_cli_made_folders(world):
    c, home = world["client"], world["home"]
    folder = home / "datasets/from-cli"
    write_concept_folder(folder, n=2)
    (folder / "img01.txt").unlink()
    (folder / "img02.png").write_bytes(b"garbage")
    (folder / "img02.txt").write_text("a sks circle\n")
    view = c.get("/api/datasets/from-cli").json()
    problems = {f["name"]: f["problems"] for f in view["files"]}
    assert problems["img00.png"] == []
    assert len(problems["img01.png"]) == 1 and "img01.txt" in problems["img01.png"][0]  # its caption is missing
    assert len(problems["img02.png"]) == 1  # not an image
    assert view["problem_count"] == 2 and not view["ok"]
