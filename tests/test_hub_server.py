"""The local Hub server (`tests/hub_server.py`) driven by the real `huggingface_hub` and `transformers` clients."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from huggingface_hub import (
    HfApi,
    constants,
    create_repo,
    hf_hub_download,
    hf_hub_url,
    list_repo_files,
    model_info,
    snapshot_download,
    upload_folder,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import httpx  # `httpx2` in huggingface_hub 2.x

try:
    from hub_server import HubServer, serve_hub
except ImportError:
    from tests.hub_server import HubServer, serve_hub

REPO = "user/demo"
FILES = ("README.md", "config.json", "model.safetensors", "sub/notes.txt")


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A small model folder: JSON, model card, ~1 MB safetensors-named binary (LFS by extension), a subfolder."""
    root = tmp_path / "upload"
    (root / "sub").mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"hidden_size": 32, "model_type": "vit"}))
    (root / "README.md").write_text("---\nlicense: apache-2.0\ntags: [test]\n---\n# Demo\n")
    (root / "model.safetensors").write_bytes(os.urandom(1024 * 1024))
    (root / "sub" / "notes.txt").write_text("notes\n")
    return root


def _same_tree(downloaded: Path, folder: Path) -> None:
    for name in FILES:
        assert (downloaded / name).read_bytes() == (folder / name).read_bytes(), name


def test_fixture_points_the_client_at_the_server(hub_server: HubServer) -> None:
    assert constants.ENDPOINT == hub_server.url
    assert os.environ["HF_ENDPOINT"] == hub_server.url
    assert constants.HF_HUB_DISABLE_XET and not constants.HF_HUB_OFFLINE
    assert constants.HF_HUB_CACHE == str(hub_server.hub_cache)
    assert hf_hub_url(REPO, "config.json") == f"{hub_server.url}/{REPO}/resolve/main/config.json"
    assert HfApi().whoami()["name"] == hub_server.username


def test_create_repo(hub_server: HubServer) -> None:
    url = create_repo(REPO)
    assert url.repo_id == REPO and url == f"{hub_server.url}/{REPO}"

    info = model_info(REPO)  # like the Hub: an "initial commit" with the default .gitattributes
    assert len(info.sha or "") == 40
    assert [s.rfilename for s in info.siblings or []] == [".gitattributes"]

    with pytest.raises(HfHubHTTPError) as exc_info:
        create_repo(REPO)
    assert exc_info.value.response.status_code == 409
    assert create_repo(REPO, exist_ok=True).repo_id == REPO
    assert create_repo("test-org/shared").repo_id == "test-org/shared"
    with pytest.raises(HfHubHTTPError) as exc_info:
        create_repo("someone-else/repo")
    assert exc_info.value.response.status_code == 403


def test_upload_folder_then_download(hub_server: HubServer, folder: Path, tmp_path: Path) -> None:
    create_repo(REPO)
    commit = upload_folder(repo_id=REPO, folder_path=folder, commit_message="add files")

    # Upload protocol: preupload -> LFS batch -> PUT of the one LFS file -> verify -> NDJSON commit.
    assert hub_server.count_requests("POST", r"/preupload/main$") == 1
    assert hub_server.count_requests("PUT", r"^/__lfs/upload/") == 1
    assert hub_server.count_requests("POST", r"\.git/info/lfs/objects/verify$") == 1
    assert hub_server.count_requests("POST", r"/commit/main$") == 1

    info = model_info(REPO, files_metadata=True)
    assert info.sha == commit.oid
    siblings = {s.rfilename: s for s in info.siblings or []}
    assert set(siblings) == {".gitattributes", *FILES}
    weights = siblings["model.safetensors"]
    assert weights.lfs is not None and weights.lfs.size == 1024 * 1024
    assert siblings["config.json"].lfs is None and siblings["README.md"].lfs is None
    assert sorted(list_repo_files(REPO)) == sorted([".gitattributes", *FILES])
    top_level = {entry.path for entry in HfApi().list_repo_tree(REPO)}
    assert top_level == {".gitattributes", "README.md", "config.json", "model.safetensors", "sub"}

    # hf_hub_download to a fresh cache: identical bytes; the LFS blob is stored under its sha256
    # (X-Linked-Etag honoured) and fetched from the "CDN" redirect.
    cache = tmp_path / "cache1"
    for name in FILES:
        path = Path(hf_hub_download(REPO, name, cache_dir=cache))
        assert path.read_bytes() == (folder / name).read_bytes(), name
        assert path.parent.name == commit.oid or path.parent.parent.name == commit.oid
    lfs_blob = cache / "models--user--demo" / "blobs" / weights.lfs.sha256
    assert lfs_blob.read_bytes() == (folder / "model.safetensors").read_bytes()
    assert hub_server.count_requests("GET", r"^/__cdn/") == 1

    snapshot = Path(snapshot_download(REPO, cache_dir=tmp_path / "cache2"))
    assert snapshot.name == commit.oid
    _same_tree(snapshot, folder)


def test_second_commit_updates_sha(hub_server: HubServer, folder: Path, tmp_path: Path) -> None:
    api = HfApi()
    create_repo(REPO)
    first = upload_folder(repo_id=REPO, folder_path=folder)
    second = api.upload_file(path_or_fileobj=b'{"hidden_size": 64}', path_in_repo="config.json", repo_id=REPO)
    assert second.oid != first.oid
    assert model_info(REPO).sha == second.oid == hub_server.head(REPO)
    assert [c.commit_id for c in api.list_repo_commits(REPO)][:2] == [second.oid, first.oid]

    cache = tmp_path / "cache"
    assert json.loads(Path(hf_hub_download(REPO, "config.json", cache_dir=cache)).read_text()) == {"hidden_size": 64}
    old = Path(hf_hub_download(REPO, "config.json", revision=first.oid, cache_dir=cache))
    assert old.read_bytes() == (folder / "config.json").read_bytes()

    # Unchanged files: the preupload "oid" lets the client skip them; LFS content is not re-sent.
    puts = hub_server.count_requests("PUT", r"^/__lfs/upload/")
    api.upload_file(path_or_fileobj=folder / "model.safetensors", path_in_repo="model.safetensors", repo_id=REPO)
    api.upload_file(path_or_fileobj=folder / "model.safetensors", path_in_repo="copy.safetensors", repo_id=REPO)
    assert hub_server.count_requests("PUT", r"^/__lfs/upload/") == puts
    assert hub_server.repo_files(REPO)["copy.safetensors"] == (folder / "model.safetensors").read_bytes()

    api.delete_file("sub/notes.txt", repo_id=REPO)
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download(REPO, "sub/notes.txt", cache_dir=tmp_path / "cache3")
    assert hub_server.commit_titles(REPO)[0] == "Delete sub/notes.txt with huggingface_hub"


def test_not_found_errors(hub_server: HubServer, tmp_path: Path) -> None:
    create_repo(REPO)
    with pytest.raises(RepositoryNotFoundError):
        model_info("user/missing")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("user/missing", "config.json", cache_dir=tmp_path)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, ".gitattributes", revision="nope", cache_dir=tmp_path)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "missing.json", cache_dir=tmp_path)


def test_branches_pull_requests_and_private_repos(hub_server: HubServer, tmp_path: Path) -> None:
    api = HfApi()
    create_repo(REPO)
    api.create_branch(REPO, branch="dev")
    api.create_branch(REPO, branch="dev", exist_ok=True)
    api.upload_file(path_or_fileobj=b"dev", path_in_repo="f.txt", repo_id=REPO, revision="dev")
    refs = api.list_repo_refs(REPO)
    assert {b.name for b in refs.branches} == {"main", "dev"}
    assert Path(hf_hub_download(REPO, "f.txt", revision="dev", cache_dir=tmp_path)).read_bytes() == b"dev"

    pr = api.upload_file(path_or_fileobj=b"pr", path_in_repo="f.txt", repo_id=REPO, create_pr=True)
    assert pr.pr_revision == "refs/pr/1"
    assert hub_server.repo_files(REPO, revision="refs/pr/1")["f.txt"] == b"pr"
    assert "f.txt" not in hub_server.repo_files(REPO)

    create_repo("user/secret", private=True)
    assert model_info("user/secret").private
    with pytest.raises(RepositoryNotFoundError):
        model_info("user/secret", token=False)


def test_transformers_push_to_hub_and_from_pretrained(hub_server: HubServer) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=8,
        patch_size=4,
        num_labels=3,
    )
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(config).eval()
    commit = model.push_to_hub("user/tiny-vit")

    info = model_info("user/tiny-vit", files_metadata=True)
    assert info.sha == commit.oid
    siblings = {s.rfilename: s for s in info.siblings or []}
    assert {"config.json", "model.safetensors", "README.md"} <= set(siblings)
    assert siblings["model.safetensors"].lfs is not None

    reloaded = transformers.ViTForImageClassification.from_pretrained("user/tiny-vit").eval()
    pixel_values = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(pixel_values).logits, reloaded(pixel_values).logits)

    # `revision=` makes transformers call `create_branch(exist_ok=True)` before the commit.
    config.num_labels = 5
    other = transformers.ViTForImageClassification(config)
    on_branch = other.push_to_hub("user/tiny-vit", revision="dev")
    assert hub_server.head("user/tiny-vit", revision="dev") == on_branch.oid
    assert hub_server.head("user/tiny-vit") == commit.oid
    dev = transformers.ViTForImageClassification.from_pretrained("user/tiny-vit", revision="dev")
    assert dev.config.num_labels == 5


def test_trainer_push_to_hub(hub_server: HubServer, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    config = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=8, patch_size=4
    )
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), push_to_hub=True, hub_model_id="user/tiny-trainer", report_to=[], use_cpu=True
    )
    trainer = transformers.Trainer(model=transformers.ViTForImageClassification(config), args=args)
    commit = trainer.push_to_hub(commit_message="End of training")  # create_repo + upload_folder
    assert hub_server.head("user/tiny-trainer") == commit.oid
    assert {"config.json", "model.safetensors", "README.md"} <= set(hub_server.repo_files("user/tiny-trainer"))


# --- failures ---------------------------------------------------------------------------------------------------------


def test_server_down_raises_connection_error(hub_server: HubServer, tmp_path: Path) -> None:
    create_repo(REPO)
    hub_server.stop()
    # Calls without retries surface httpx's ConnectError (not an HfHubHTTPError, no response)...
    with pytest.raises(httpx.ConnectError):
        create_repo("user/other")
    with pytest.raises(httpx.ConnectError):
        model_info(REPO)
    # ... downloads turn it into LocalEntryNotFoundError (nothing cached), chained to the ConnectError.
    with pytest.raises(LocalEntryNotFoundError) as exc_info:
        hf_hub_download(REPO, ".gitattributes", cache_dir=tmp_path)
    assert isinstance(exc_info.value.__cause__, httpx.ConnectError)

    hub_server.start()  # same port, same repos
    assert len(model_info(REPO).sha or "") == 40


def test_unauthorized(hub_server: HubServer, folder: Path) -> None:
    with pytest.raises(HfHubHTTPError) as exc_info:
        create_repo(REPO, token="hf_wrong_token")
    assert exc_info.value.response.status_code == 401
    assert "Invalid credentials in Authorization header" in str(exc_info.value)

    hub_server.fail_next("POST", r"^/api/repos/create$", status=401)
    with pytest.raises(HfHubHTTPError) as exc_info:
        create_repo(REPO)
    assert exc_info.value.response.status_code == 401

    create_repo(REPO)
    sha = hub_server.head(REPO)
    hub_server.fail_next("POST", r"/commit/main$", status=401)
    with pytest.raises(HfHubHTTPError) as exc_info:
        upload_folder(repo_id=REPO, folder_path=folder)
    assert exc_info.value.response.status_code == 401
    assert hub_server.head(REPO) == sha

    rule = hub_server.fail_next("*", ".*", status=401, count=None)  # every request
    with pytest.raises(HfHubHTTPError) as exc_info:
        model_info(REPO)
    assert exc_info.value.response.status_code == 401
    assert rule.hits == 1
    hub_server.clear_failures()
    assert model_info(REPO).sha == sha


def test_500_during_commit_then_retry(hub_server: HubServer, folder: Path, tmp_path: Path) -> None:
    create_repo(REPO)
    sha = hub_server.head(REPO)
    hub_server.fail_next("POST", r"/commit/main$", status=500)
    with pytest.raises(HfHubHTTPError) as exc_info:
        upload_folder(repo_id=REPO, folder_path=folder)
    assert exc_info.value.response.status_code == 500
    assert hub_server.count_requests("POST", r"/commit/main$") == 1  # the commit call is not retried
    assert hub_server.head(REPO) == sha  # nothing committed

    commit = upload_folder(repo_id=REPO, folder_path=folder)  # the caller retries
    assert hub_server.count_requests("PUT", r"^/__lfs/upload/") == 1  # LFS object kept from the failed attempt
    assert model_info(REPO).sha == commit.oid != sha
    _same_tree(Path(snapshot_download(REPO, cache_dir=tmp_path / "cache")), folder)


def test_5xx_on_lfs_upload_is_retried_by_the_client(hub_server: HubServer, folder: Path) -> None:
    create_repo(REPO)
    rule = hub_server.fail_next("PUT", r"^/__lfs/upload/", status=503)
    upload_folder(repo_id=REPO, folder_path=folder)  # http_backoff retries the PUT
    assert rule.hits == 1
    assert hub_server.count_requests("PUT", r"^/__lfs/upload/") == 2
    assert hub_server.repo_files(REPO)["model.safetensors"] == (folder / "model.safetensors").read_bytes()


# --- server options ---------------------------------------------------------------------------------------------------


def test_inline_lfs_and_range_requests(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`cdn_host=None`: LFS files are served by the resolve URL itself (still with X-Linked-* headers)."""
    from huggingface_hub import get_hf_file_metadata
    from huggingface_hub.utils import get_session

    hub = serve_hub(monkeypatch, tmp_path / "home", cdn_host=None)
    server = next(hub)
    try:
        create_repo(REPO)
        content = os.urandom(4096)
        HfApi().upload_file(path_or_fileobj=content, path_in_repo="w.bin", repo_id=REPO)
        url = hf_hub_url(REPO, "w.bin")
        meta = get_hf_file_metadata(url)
        assert meta.size == 4096 and meta.commit_hash == server.head(REPO)
        assert meta.etag == hashlib.sha256(content).hexdigest()  # X-Linked-Etag, not the pointer's ETag
        assert Path(hf_hub_download(REPO, "w.bin", cache_dir=tmp_path / "c")).read_bytes() == content
        response = get_session().get(url, headers={"Range": "bytes=10-19"})
        assert response.status_code == 206 and response.content == content[10:20]
        assert server.count_requests("GET", r"^/__cdn/") == 0
        assert not server.errors
    finally:
        hub.close()
