"""Model card and Hub push, against a loopback Hub started by each test (never the internet)."""
from __future__ import annotations

import hashlib
import json
import shutil
import struct
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import pytest
from huggingface_hub import ModelCard, ModelCardData, constants
from huggingface_hub.errors import HfHubHTTPError
from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification, BertTokenizer

from hub_server import TEST_TOKEN, TEST_USER, LocalHub
from optimum_rmtkd.hub import RMTKDHubError, build_model_card, push_to_hub, write_model_card


REPO_ID = f"{TEST_USER}/tiny-bert-rmtkd"
SITES = ["bert.encoder.layer.0.intermediate", "bert.encoder.layer.1.intermediate"]
BENCHMARK_MD = """# Benchmark

| batch | sequence | original p50 (ms) | compressed p50 (ms) |
|---|---|---|---|
| 1 | 64 | 3.10 | 1.90 |
"""


def _png(width: int = 2, height: int = 2) -> bytes:
    """A valid RGB PNG built with the standard library only."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    rows = b"".join(b"\x00" + b"\xff\x80\x00" * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def _report(**overrides) -> dict:
    report = {
        "base_model": "sentence-transformers/all-MiniLM-L6-v2",
        "task": "text-classification",
        "package_version": "0.1.0.dev0",
        "dataset": {
            "name": "rotten_tomatoes", "text_column": "text", "label_column": "label", "calibration_samples": 853
        },
        "metric_name": "accuracy",
        "metrics": {"original": 0.831, "teacher_distilled": 0.8393, "compressed": 0.825},
        "parameters": {"original": 120_000, "compressed": 84_000, "reduction": 0.3},
        "size_bytes": {"original": 480_512, "compressed": 336_384},
        "sites": [
            {
                "name": name,
                "kind": "ffn",
                "original_width": 37,
                "kept_width": 16,
                "rank": 11 + i,
                "estimator": "paper",
                "sigma2": 0.0123,
                "edge": 0.0456,
                "q": 0.0434,
                "n_samples": 853,
                "ks_distance": 0.31 if i == 1 else 0.04,
                "heavy_tailed": i == 1,
                "plot": f"spectra/{name}.png",
            }
            for i, name in enumerate(SITES)
        ],
        "stages": [
            {
                "stage": 1,
                "sites": SITES,
                "metric_before_distillation": 0.796,
                "metric_after_distillation": 0.825,
                "parameters": 84_000,
            }
        ],
        "output_format": "stock",
        "stop_reason": "target parameter reduction reached",
    }
    report.update(overrides)
    return report


@pytest.fixture(scope="module")
def saved_bert(tmp_path_factory) -> Path:
    """A tiny real BERT classifier and tokenizer saved once per module; tests copy it."""
    folder = tmp_path_factory.mktemp("bert")
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(94)]) + "\n")
    saved = folder / "saved"
    BertTokenizer(vocab_file=str(vocab)).save_pretrained(saved)
    config = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
    BertForSequenceClassification(config).save_pretrained(saved)
    return saved


def _write_output(folder: Path, report: dict) -> None:
    """Add what `RMTKDCompressor.compress` and the ONNX exporter write beside the weights, and a benchmark table."""
    config = json.loads((folder / "config.json").read_text())
    config["rmtkd"] = {"original_widths": {name: 37 for name in SITES}, "kept_widths": {name: 16 for name in SITES}}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "rmtkd_config.json").write_text(json.dumps({"estimator": "paper", "tau": 0.5}))
    (folder / "rmtkd_report.json").write_text(json.dumps(report, indent=2))
    (folder / "spectra").mkdir(exist_ok=True)
    for name in SITES:
        (folder / "spectra" / f"{name}.png").write_bytes(_png())
    (folder / "benchmark.md").write_text(BENCHMARK_MD)
    (folder / "onnx").mkdir(exist_ok=True)
    (folder / "onnx" / "model.onnx").write_bytes(b"\x08\x07\x12\x0bdummy-onnx" + bytes(range(256)))
    shutil.copy(folder / "config.json", folder / "onnx" / "config.json")


@pytest.fixture
def model_dir(saved_bert, tmp_path) -> Path:
    folder = tmp_path / "tiny-bert-rmtkd"
    shutil.copytree(saved_bert, folder)
    _write_output(folder, _report())
    return folder


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """The loopback Hub; offline mode, saved tokens and telemetry are switched off so only this server is used."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # read once at import
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-token"))
    with LocalHub() as server:
        yield server
        assert server.unknown_routes == [], (
            f"huggingface_hub called routes the loopback Hub lacks: {server.unknown_routes}"
        )


@pytest.fixture(params=["xet-pipeline", "single-commit"])
def upload_path(request, monkeypatch) -> str:
    """`upload_folder` streams through its xet pipeline when `hf_xet` is installed, else makes one commit: test both."""
    if request.param == "xet-pipeline":
        pytest.importorskip("hf_xet")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", request.param == "single-commit")
    return request.param


def _digests(folder: Path) -> dict[str, str]:
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def _local_files(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


# ----------------------------------------------------------------------------------------------- model card


def test_card_metadata_round_trips_and_body_has_every_section(model_dir):
    card = build_model_card(model_dir, repo_id=REPO_ID)
    reparsed = ModelCard(str(card))
    assert reparsed.data.to_dict() == card.data.to_dict()
    assert ModelCardData(**reparsed.data.to_dict()).to_dict() == card.data.to_dict()

    data = card.data.to_dict()
    assert data["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "text-classification"
    assert data["tags"] == ["rmt-kd", "optimum-rmtkd", "compressed", "knowledge-distillation"]
    assert data["datasets"] == ["rotten_tomatoes"]
    assert data["metrics"] == ["accuracy"]
    assert "license" not in data  # nothing says which license applies
    (result,) = data["model-index"][0]["results"]
    assert data["model-index"][0]["name"] == "tiny-bert-rmtkd"
    assert result["task"] == {"type": "text-classification", "name": "Text Classification"}
    assert result["dataset"] == {"type": "rotten_tomatoes", "name": "rotten_tomatoes"}
    assert result["metrics"] == [
        {"type": "accuracy", "value": 0.825, "name": "accuracy (compressed model)"},
        {"type": "accuracy", "value": 0.831, "name": "accuracy (original model, before compression)"},
    ]

    text = card.text
    assert "| Parameters | 120,000 | 84,000 (30.0% fewer) |" in text
    assert "| Size on disk | 480.5 kB | 336.4 kB |" in text
    row = "| `bert.encoder.layer.0.intermediate` | ffn | 37 → 16 | 11 | `paper` | 0.0123 | 0.0456 | 0.0434 | 853 |"
    assert row + " 0.040 | no |" in text
    assert "| `bert.encoder.layer.1.intermediate` | ffn | 37 → 16 | 12 |" in text
    stage = "| 1 | `bert.encoder.layer.0.intermediate`, `bert.encoder.layer.1.intermediate` |"
    assert stage + " 0.7960 | 0.8250 | 84,000 |" in text
    assert "| **Compressed (this model)** | **0.8250** |" in text
    assert "| Teacher distilled for the same schedule | 0.8393 |" in text
    assert "](spectra/bert.encoder.layer.0.intermediate.png)" in text
    assert "[`bert.encoder.layer.1.intermediate`](spectra/bert.encoder.layer.1.intermediate.png)" in text
    assert "## Benchmark\n\n| batch | sequence | original p50 (ms) | compressed p50 (ms) |\n|---|" in text
    assert '= AutoModelForSequenceClassification.from_pretrained("rmtkd-tester/tiny-bert-rmtkd")' in text
    assert "trust_remote_code" not in text and "import optimum_rmtkd" not in text
    assert "### ONNX" in text and 'snapshot_download("rmtkd-tester/tiny-bert-rmtkd", allow_patterns=["onnx/*"])' in text
    assert 'add_session_config_entry("optimization.disable_specified_optimizers", "SkipLayerNormFusion")' in text
    assert "`bert.encoder.layer.1.intermediate` (KS distance 0.310)" in text  # heavy-tailed warning
    assert "`bert.encoder.layer.0.intermediate` (KS distance" not in text
    assert "853 calibration samples" in text
    assert "Accuracy was measured only on [rotten_tomatoes](https://huggingface.co/datasets/rotten_tomatoes)" in text
    assert "@misc{ettori2025rmtkd," in text
    assert "{{RMT-KD}: Random Matrix Theoretic Causal Knowledge Distillation}" in text
    authors = "Ettori, Davide and Darabi, Nastaran and Senthilkumar, Sureshkumar and Trivedi, Amit Ranjan"
    assert f"author        = {{{authors}}}" in text
    assert "eprint        = {2509.15724}" in text and "year          = {2025}" in text
    assert "\n\n\n" not in text  # the template's control blocks leave no stray blank lines


def test_card_for_per_layer_format_loads_through_optimum_rmtkd(model_dir):
    (model_dir / "rmtkd_report.json").write_text(json.dumps(_report(output_format="per-layer")))
    text = build_model_card(model_dir, repo_id=REPO_ID).text
    assert "import optimum_rmtkd" in text
    assert 'from_pretrained("rmtkd-tester/tiny-bert-rmtkd", trust_remote_code=True)' in text


def test_card_without_optional_parts(model_dir):
    report = _report(
        dataset={"name": None, "text_column": "text", "label_column": "label", "calibration_samples": 100},
        metrics={"original": None, "teacher_distilled": None, "compressed": None},
        size_bytes={"original": None, "compressed": 336_384},
        stages=[],
    )
    for site in report["sites"]:
        site["plot"] = None
    (model_dir / "rmtkd_report.json").write_text(json.dumps(report))
    (model_dir / "benchmark.md").unlink()
    shutil.rmtree(model_dir / "onnx")
    card = build_model_card(model_dir)
    data = ModelCard(str(card)).data.to_dict()
    assert "model-index" not in data and "datasets" not in data
    text = card.text
    assert "# tiny-bert-rmtkd" in text  # the folder name stands in for a repository id
    assert 'from_pretrained("tiny-bert-rmtkd")' in text
    assert "| Size on disk | n/a | 336.4 kB |" in text
    assert "| **Compressed (this model)** | **n/a** |" in text
    for absent in ("## Benchmark", "### ONNX", "![", "before distillation"):
        assert absent not in text
    assert "the data given to the compressor" in text


def test_card_embeds_a_benchmark_written_elsewhere(model_dir, tmp_path):
    (model_dir / "benchmark.md").unlink()
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "benchmark.md").write_text(BENCHMARK_MD.replace("1.90", "1.75"))
    table = "| 1 | 64 | 3.10 | 1.75 |"
    assert "## Benchmark" not in build_model_card(model_dir).text
    assert table in build_model_card(model_dir, benchmark=bench).text  # `rmtkd benchmark --output` folder
    assert table in build_model_card(model_dir, benchmark=bench / "benchmark.md").text
    message = r"`benchmark` must be a benchmark\.md or a folder holding one, got '.*/nowhere'; pass the `--output`"
    with pytest.raises(ValueError, match=message):
        build_model_card(model_dir, benchmark=tmp_path / "nowhere")


def test_card_without_report_says_the_folder_is_not_an_rmtkd_output(model_dir):
    (model_dir / "rmtkd_report.json").unlink()
    with pytest.raises(ValueError, match=r"has no rmtkd_report\.json, so it is not an RMT-KD output folder"):
        build_model_card(model_dir)


def test_card_rejects_an_incomplete_or_unknown_report(model_dir):
    report = _report()
    del report["stop_reason"]
    (model_dir / "rmtkd_report.json").write_text(json.dumps(report))
    with pytest.raises(ValueError, match=r"lacks the keys \['stop_reason'\]"):
        build_model_card(model_dir)
    (model_dir / "rmtkd_report.json").write_text(json.dumps(_report(task="translation")))
    with pytest.raises(ValueError, match=r"`task` in rmtkd_report\.json must be one of .*got 'translation'"):
        build_model_card(model_dir)


def test_local_base_model_stays_out_of_metadata_and_lends_its_license(model_dir, tmp_path):
    base = tmp_path / "my-base-model"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: mit\n---\n# base\n")
    (model_dir / "rmtkd_report.json").write_text(json.dumps(_report(base_model=str(base))))
    card = build_model_card(model_dir)
    assert card.data.base_model is None
    assert card.data.license == "mit"
    assert "a local model (`my-base-model`)" in card.text and str(tmp_path) not in card.text
    assert build_model_card(model_dir, base_model="org/base").data.base_model == "org/base"


def test_default_template_is_package_data_and_its_absence_is_explained(model_dir, tmp_path, monkeypatch):
    import optimum_rmtkd.hub as hub_module

    # Inside the package, so setup.cfg's `[options.package_data]` puts it in the wheel (see test_packaging.py).
    assert hub_module.DEFAULT_TEMPLATE_PATH.parent.parent == Path(hub_module.__file__).resolve().parent
    assert hub_module.DEFAULT_TEMPLATE_PATH.is_file()
    monkeypatch.setattr(hub_module, "DEFAULT_TEMPLATE_PATH", tmp_path / "gone.md")
    with pytest.raises(
        FileNotFoundError,
        match=r"The default model card template '.*/gone\.md' is missing from this installation; pass `template_path=`",
    ):
        build_model_card(model_dir)
    own = tmp_path / "own.md"
    own.write_text("---\n{{ card_data }}\n---\n# My template\n")
    assert build_model_card(model_dir, template_path=own).text.strip() == "# My template"


def test_write_model_card_writes_readme_atomically(model_dir):
    path = write_model_card(model_dir, repo_id=REPO_ID)
    assert path == model_dir / "README.md"
    assert path.read_text() == str(build_model_card(model_dir, repo_id=REPO_ID))
    assert not list(model_dir.glob(".*.tmp"))


def test_card_passes_the_hub_yaml_validation(model_dir, hub, monkeypatch):
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)  # `ModelCard.validate` reads the import-time endpoint
    build_model_card(model_dir, repo_id=REPO_ID).validate()


# ----------------------------------------------------------------------------------------------- push


def test_push_uploads_every_file_byte_for_byte(model_dir, hub, upload_path):
    url = push_to_hub(model_dir, REPO_ID, token=TEST_TOKEN, endpoint=hub.url)
    commits = hub.commits(REPO_ID)
    assert url == f"{hub.url}/{REPO_ID}/commit/{commits[-1]['oid']}"
    assert len(commits) == 2  # the repository's initial commit and the upload
    assert commits[-1]["summary"] == "Upload all-MiniLM-L6-v2 compressed with RMT-KD (30.0% fewer parameters)"
    assert hub.files(REPO_ID) == _local_files(model_dir)
    expected = {"README.md", "model.safetensors", "onnx/model.onnx", "spectra/bert.encoder.layer.0.intermediate.png"}
    assert expected <= set(hub.files(REPO_ID))
    readme = ModelCard(hub.files(REPO_ID)["README.md"].decode())
    assert readme.data.base_model == "sentence-transformers/all-MiniLM-L6-v2"
    assert 'from_pretrained("rmtkd-tester/tiny-bert-rmtkd")' in readme.text
    # The pushed weights are a stock checkpoint.
    reloaded = AutoModelForSequenceClassification.from_pretrained(model_dir)
    assert reloaded.config.intermediate_size == 37


def test_push_twice_is_idempotent(model_dir, hub, upload_path):
    first = push_to_hub(model_dir, REPO_ID, token=TEST_TOKEN, endpoint=hub.url)
    files = hub.files(REPO_ID)
    second = push_to_hub(model_dir, REPO_ID, token=TEST_TOKEN, endpoint=hub.url)
    assert second == first
    assert len(hub.commits(REPO_ID)) == 2  # nothing changed, so no second commit
    assert hub.files(REPO_ID) == files


def test_push_with_wrong_token_fails_clearly_and_leaves_the_folder_unchanged(model_dir, hub):
    before = _digests(model_dir)
    with pytest.raises(
        RMTKDHubError,
        match=rf"Authentication failed for {hub.url}: set `HF_TOKEN` or run `hf auth login`\. Local files were left "
        r"in place; pushing again is safe and uploads what is missing\.$",
    ) as info:
        push_to_hub(model_dir, REPO_ID, token="hf_wrong", endpoint=hub.url)
    assert isinstance(info.value.__cause__, HfHubHTTPError)
    assert info.value.__cause__.response.status_code == 401
    assert _digests(model_dir) == before
    assert not (model_dir / "README.md").exists()
    assert hub.repos == {}


def test_push_without_any_token_fails_clearly(model_dir, hub):
    with pytest.raises(RMTKDHubError, match=r"Authentication failed for .*: set `HF_TOKEN` or run `hf auth login`"):
        push_to_hub(model_dir, REPO_ID, endpoint=hub.url)


def test_push_takes_the_token_from_hf_token(model_dir, hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TEST_TOKEN)
    push_to_hub(model_dir, REPO_ID, endpoint=hub.url)
    assert hub.files(REPO_ID)["model.safetensors"] == (model_dir / "model.safetensors").read_bytes()


def test_push_to_unreachable_endpoint_fails_clearly(model_dir, hub):
    with LocalHub() as closed:
        endpoint = closed.url  # a port nothing listens on once this block exits
    before = _digests(model_dir)
    with pytest.raises(RMTKDHubError, match=rf"Could not reach {endpoint} while creating the repository"):
        push_to_hub(model_dir, REPO_ID, token=TEST_TOKEN, endpoint=endpoint)
    assert _digests(model_dir) == before


@pytest.mark.parametrize(
    "removed, message",
    [
        ("rmtkd_report.json", r"is missing rmtkd_report\.json; push the `save_directory`"),
        ("model.safetensors", r"is missing model weights \(model\.safetensors or "),
        ("config.json", r"is missing config\.json; push"),
    ],
)
def test_push_of_an_incomplete_folder_says_what_is_missing(model_dir, hub, removed, message):
    (model_dir / removed).unlink()
    with pytest.raises(ValueError, match=message):
        push_to_hub(model_dir, REPO_ID, token=TEST_TOKEN, endpoint=hub.url)
    assert hub.requests == []


def test_push_without_onnx_skips_the_export_and_its_card_section(model_dir, hub, upload_path):
    push_to_hub(model_dir, REPO_ID, token=TEST_TOKEN, endpoint=hub.url, include_onnx=False)
    remote = hub.files(REPO_ID)
    assert not [path for path in remote if path.startswith("onnx/")]
    assert "### ONNX" not in remote["README.md"].decode()
    expected = {path: data for path, data in _local_files(model_dir).items() if not path.startswith("onnx/")}
    assert remote == expected


def test_push_skips_temporary_files(model_dir, hub):
    (model_dir / ".model.safetensors.abc123.tmp").write_bytes(b"partial")
    (model_dir / "spectra" / ".plot.png.xyz.tmp").write_bytes(b"partial")
    push_to_hub(model_dir, REPO_ID, token=TEST_TOKEN, endpoint=hub.url)
    assert not [path for path in hub.files(REPO_ID) if path.endswith(".tmp")]


def test_push_uploads_only_what_belongs_to_the_model(model_dir, hub, upload_path, caplog):
    (model_dir / "spectra" / "layer[0]*.png").write_bytes(_png())  # a name that is a pattern: sent as a name
    model_files = _local_files(model_dir)
    strays = {
        # What `benchmark -o <model folder>` used to leave: the original's ONNX export and absolute local paths.
        "onnx/original/model.onnx": b"another model's graph",
        "onnx/original/source.json": json.dumps({"fingerprint": {"model_dir": "/home/me/original"}}).encode(),
        "onnx/source.json": b"{}",
        "benchmark.json": json.dumps({"models": {"original": {"path": "/home/me/original"}}}).encode(),
        "benchmark.png": _png(),
        "checkpoint-500/model.safetensors": b"a trainer's checkpoint",
        "rmtkd_state.json": json.dumps({"identity": {"source": "/home/me/original"}}).encode(),
        "notes.txt": b"private",
        ".cache/huggingface/download/model.lock": b"",
    }
    for path, data in strays.items():
        (model_dir / path).parent.mkdir(parents=True, exist_ok=True)
        (model_dir / path).write_bytes(data)
    with caplog.at_level("WARNING", logger="optimum_rmtkd.hub"):
        push_to_hub(model_dir, REPO_ID, token=TEST_TOKEN, endpoint=hub.url)
    remote = hub.files(REPO_ID)
    assert remote.keys() == model_files.keys() | {"README.md"}
    assert {path: remote[path] for path in model_files} == model_files
    # One line names what stayed local, hidden files aside.
    shown = sorted(path for path in strays if not path.startswith("."))
    assert [record.getMessage() for record in caplog.records if "Not uploading" in record.getMessage()] == [
        f"Not uploading {', '.join(shown)}: not part of the model (caches, benchmark results, other files)."
    ]


def test_model_files_match_segment_by_segment(tmp_path):
    from optimum_rmtkd.hub import model_files

    for path in ("model.safetensors", "sub/model.safetensors", "spectra/a[1].png", "spectra/deeper/b.png",
                 "onnx/model.onnx", "onnx/model.onnx.data", "onnx/tokenizer.json", "onnx/compressed/model.onnx",
                 "modeling_rmtkd.py", "train.py", ".model.safetensors.x1.tmp"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(b"x")
    upload, left_out = model_files(tmp_path)
    assert upload == ["model.safetensors", "modeling_rmtkd.py", "onnx/model.onnx", "onnx/model.onnx.data",
                      "onnx/tokenizer.json", "spectra/a[1].png"]
    assert left_out == ["onnx/compressed/model.onnx", "spectra/deeper/b.png", "sub/model.safetensors", "train.py"]
    assert model_files(tmp_path, include_onnx=False)[0] == ["model.safetensors", "modeling_rmtkd.py",
                                                           "spectra/a[1].png"]


def test_push_keeps_a_readme_not_written_by_optimum_rmtkd(model_dir, hub):
    (model_dir / "README.md").write_text("---\nlicense: mit\n---\n# My own card\n")
    push_to_hub(model_dir, REPO_ID, token=TEST_TOKEN, endpoint=hub.url)
    assert hub.files(REPO_ID)["README.md"] == b"---\nlicense: mit\n---\n# My own card\n"
    assert (model_dir / "README.md").read_text() == "---\nlicense: mit\n---\n# My own card\n"


def test_push_stops_before_uploading_when_readme_metadata_is_invalid(model_dir, hub):
    (model_dir / "README.md").write_text("---\nmodel-index: 3\n---\n# My own card\n")
    with pytest.raises(ValueError, match=r"Invalid metadata in README\.md"):
        push_to_hub(model_dir, REPO_ID, token=TEST_TOKEN, endpoint=hub.url)
    assert hub.files(REPO_ID) == {}


def test_push_to_a_branch_and_as_a_pull_request(model_dir, hub, upload_path):
    push_to_hub(model_dir, REPO_ID, token=TEST_TOKEN, endpoint=hub.url, revision="rmtkd")
    assert hub.files(REPO_ID, "rmtkd") == _local_files(model_dir)
    assert hub.files(REPO_ID) == {}
    url = push_to_hub(model_dir, REPO_ID, token=TEST_TOKEN, endpoint=hub.url, create_pr=True)
    assert url == f"{hub.url}/{REPO_ID}/discussions/1"
    assert hub.files(REPO_ID, "refs/pr/1") == _local_files(model_dir)
    assert hub.files(REPO_ID) == {}


def test_push_rejects_a_pull_request_on_another_branch(model_dir, hub):
    with pytest.raises(ValueError, match=r"`revision` must be None with `create_pr=True` .*got 'dev'"):
        push_to_hub(model_dir, REPO_ID, token=TEST_TOKEN, endpoint=hub.url, create_pr=True, revision="dev")


def test_push_passes_hub_ids_for_a_report_that_names_local_paths(model_dir, hub, tmp_path):
    report = _report(base_model=str(tmp_path / "base"))
    report["dataset"]["name"] = str(tmp_path / "reviews.csv")
    (model_dir / "rmtkd_report.json").write_text(json.dumps(report))
    push_to_hub(model_dir, REPO_ID, token=TEST_TOKEN, endpoint=hub.url, base_model="org/base", datasets="org/reviews")
    card = ModelCard(hub.files(REPO_ID)["README.md"].decode())
    assert card.data.base_model == "org/base" and card.data.datasets == ["org/reviews"]
    assert card.data.eval_results[0].dataset_type == "org/reviews"


def test_repo_name_without_namespace_is_created_under_the_user(model_dir, hub):
    push_to_hub(model_dir, "tiny-bert-rmtkd", token=TEST_TOKEN, endpoint=hub.url)
    assert 'from_pretrained("rmtkd-tester/tiny-bert-rmtkd")' in hub.files(REPO_ID)["README.md"].decode()


def test_loopback_hub_answers_unknown_routes_with_501(hub):
    request = urllib.request.Request(f"{hub.url}/api/whoami-v2", headers={"Authorization": f"Bearer {TEST_TOKEN}"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=10)
    assert info.value.code == 501
    assert json.loads(info.value.read()) == {"error": "The loopback Hub does not implement GET /api/whoami-v2."}
    assert hub.unknown_routes.pop() == "GET /api/whoami-v2"


def test_push_command_passes_the_card_metadata_flags(model_dir, hub, tmp_path, monkeypatch):
    import logging

    from optimum_rmtkd.commands.rmtkd_cli import main

    report = _report(base_model=str(tmp_path / "base"))
    report["dataset"]["name"] = str(tmp_path / "reviews.csv")
    (model_dir / "rmtkd_report.json").write_text(json.dumps(report))
    logger = logging.getLogger("optimum_rmtkd")
    monkeypatch.setattr(logger, "handlers", list(logger.handlers))  # `run()` adds its handler; restored after
    monkeypatch.setattr(logger, "propagate", logger.propagate)
    monkeypatch.setattr(logger, "level", logger.level)
    main(["push", str(model_dir), "--hub-model-id", REPO_ID, "--token", TEST_TOKEN, "--endpoint", hub.url,
          "--base-model", "org/base", "--datasets", "org/reviews", "--quiet"])
    card = ModelCard(hub.files(REPO_ID)["README.md"].decode())
    assert card.data.base_model == "org/base" and card.data.datasets == ["org/reviews"]
