"""serve.py, the screening station: predict.py's decisions over HTTP, bad input and abuse refused in one line,
an audit row per request that survives SIGKILL, tokens, history and CSV export. Real uvicorn servers on free
loopback ports (tests/serve_fixture.py); each is stopped and its port checked closed."""

import asyncio
import csv
import hashlib
import io
import json
import os
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from checkpoint_fixture import session_checkpoint_fixture
from conftest import REPO
from patchae.deploy.predict import Predictor, predict_to_folder
from patchae.deploy.serve.auth import TOKEN_VARIABLE, check_client, is_loopback, resolve_token
from patchae.deploy.serve.batching import DynamicBatcher
from patchae.deploy.serve.uploads import Refused
from patchae.errors import PatchAEError
from serve_fixture import HOST, StationProcess, free_port, port_open

trained = session_checkpoint_fixture()

MAX_UPLOAD_MB = 1


@pytest.fixture(scope="module")
def station(trained, tmp_path_factory):
    folder = tmp_path_factory.mktemp("station") / "station"
    server = StationProcess(
        trained.ckpt, folder, f"max_upload_mb={MAX_UPLOAD_MB}", "batch.window_ms=50", "batch.max_size=8"
    ).start()
    try:
        yield server
    finally:
        server.stop()
    assert server.stopped_cleanly(), server.log_tail()  # a graceful stop, not a crash
    assert not port_open(server.port)
    assert audit_rows(folder, "PRAGMA integrity_check") == [("ok",)]


def screened_images(trained) -> list[Path]:
    return sorted((trained.data_dir / "test").rglob("*.png"))


def audit_rows(folder: Path, query: str, *parameters) -> list[tuple]:
    connection = sqlite3.connect(folder / "audit.sqlite", timeout=30)
    try:
        return connection.execute(query, parameters).fetchall()
    finally:
        connection.close()


def assert_one_line_error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"] and "\n" not in body["error"]
    return body["error"]


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def png_bomb(side: int = 20000) -> bytes:
    """A valid side x side 1-bit PNG of one colour: 400 megapixels in about 50 KB."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" * (1 + (side + 7) // 8)  # filter byte + the packed pixels
    compressor = zlib.compressobj(9)
    pixels = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def raw_exchange(port: int, head: bytes, chunks: list[bytes] = (), timeout: float = 30) -> tuple[int, dict]:
    """Send a request by hand (a lying Content-Length, an unfinished chunked body) and read the answer."""
    with socket.create_connection((HOST, port), timeout=timeout) as connection:
        connection.sendall(head)
        for chunk in chunks:
            connection.sendall(chunk)
        data = b""
        while b"\r\n\r\n" not in data:
            data += connection.recv(65536)
        head_text, _, body = data.partition(b"\r\n\r\n")
        lines = head_text.decode().split("\r\n")
        length = next(int(line.split(":")[1]) for line in lines if line.lower().startswith("content-length"))
        while len(body) < length:
            body += connection.recv(65536)
        return int(lines[0].split()[1]), json.loads(body)


# -- answers ------------------------------------------------------------------------------------------------
def test_health_and_model_describe_the_served_checkpoint(station, trained):
    health = station.get("/health").json()
    assert health["status"] == "ok" and health["runtime"] == "torch" and health["device"] == "cpu"
    model = station.get("/model").json()
    sha256 = hashlib.sha256(trained.ckpt.read_bytes()).hexdigest()
    assert model["model_sha256"] == sha256 and model["model_id"] == sha256[:12] == health["model_id"]
    assert model["category"] == "synthetic" and model["model"] == "PatchAEModule"
    assert model["backbone"] == "tf_efficientnet_lite0" and model["image_size"] == [64, 64]
    thresholds = Predictor.from_checkpoint(trained.ckpt, device="cpu").thresholds
    assert model["threshold"]["value"] == pytest.approx(thresholds.value)
    assert model["threshold"]["method"] == thresholds.method
    assert model["training"]["image_auroc"] == pytest.approx(trained.results["image_auroc"])


def test_decisions_equal_predict_py_on_the_same_images(station, trained, tmp_path):
    images = screened_images(trained)
    predict_to_folder(
        trained.ckpt, trained.data_dir / "test", tmp_path, device="cpu", overlays=False, show_progress=False
    )
    expected = {
        Path(row["path"]).resolve(): row for row in json.loads((tmp_path / "predictions.json").read_text())
    }

    def post(index_path):
        index, path = index_path
        if index % 2:  # half as multipart forms, half as raw bodies
            return httpx.post(
                f"{station.url}/predict", files={"file": (path.name, path.read_bytes())}, timeout=60
            )
        return station.post(path.read_bytes())

    with ThreadPoolExecutor(max_workers=6) as pool:  # concurrent, so the batcher groups them
        responses = list(pool.map(post, enumerate(images)))
    answers = []
    for path, response in zip(images, responses, strict=True):
        assert response.status_code == 200, response.text
        answer = response.json()
        row = expected[path.resolve()]
        assert answer["decision"] == row["decision"], path
        assert answer["score"] == pytest.approx(row["score"], rel=1e-5, abs=1e-5)
        assert answer["normalized_score"] == pytest.approx(row["normalized_score"], abs=1e-5)
        assert answer["image_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert 1 <= answer["batch_size"] <= 8 and answer["latency_ms"] > 0
        assert response.headers["X-Request-Id"] == answer["id"]
        answers.append(answer)
    assert {a["decision"] for a in answers} == {"normal", "anomalous"}
    # Each answer is in the audit log with the same decision, and its input is stored under its hash.
    for answer in answers:
        [(decision, score, input_path, status)] = audit_rows(
            station.folder,
            "SELECT decision, score, input_path, status FROM requests WHERE request_id = ?",
            answer["id"],
        )
        assert (decision, status) == (answer["decision"], 200) and score == pytest.approx(answer["score"])
        stored = station.folder / input_path
        assert hashlib.sha256(stored.read_bytes()).hexdigest() == answer["image_sha256"]
    # The overlay link serves the image beside its map.
    overlay = station.get(answers[0]["overlay"])
    assert overlay.status_code == 200 and overlay.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(overlay.content)).size == (128, 64)


def test_grey_16_bit_and_jpeg_uploads_score_as_predict_py_reads_the_files(station, trained, tmp_path):
    source = np.asarray(Image.open(screened_images(trained)[-1]).convert("L"))
    files = {
        "grey.png": Image.fromarray(source),
        "sixteen.png": Image.fromarray(source.astype(np.uint16) * 257),
        "part.jpg": Image.fromarray(source).convert("RGB"),
        "alpha.png": Image.fromarray(source).convert("RGBA"),
    }
    predictor = Predictor.from_checkpoint(trained.ckpt, device="cpu")
    for name, image in files.items():
        path = tmp_path / name
        image.save(path)
        [expected] = list(predictor.predict_paths([path]))
        kind = "image/jpeg" if name.endswith(".jpg") else "image/png"
        response = station.post(path.read_bytes(), kind)
        assert response.status_code == 200, response.text
        assert response.json()["decision"] == expected.decision, name
        assert response.json()["score"] == pytest.approx(expected.score, rel=1e-5, abs=1e-5), name


def test_onnx_runtime_decisions_equal_predict_py_with_onnx(trained, tmp_path, request):
    images = screened_images(trained)
    predict_to_folder(
        trained.ckpt,
        trained.data_dir / "test",
        tmp_path / "predict",
        device="cpu",
        overlays=False,
        show_progress=False,
        runtime="onnx",
    )
    expected = {
        Path(row["path"]).resolve(): row
        for row in json.loads((tmp_path / "predict" / "predictions.json").read_text())
    }
    server = StationProcess(trained.ckpt, tmp_path / "station", "runtime=onnx", "overlays=false")
    request.addfinalizer(server.kill)
    with server:
        assert server.get("/model").json()["runtime"] == "onnx"
        for path in images:
            answer = server.post(path.read_bytes()).json()
            assert answer["decision"] == expected[path.resolve()]["decision"], path
            assert answer["score"] == pytest.approx(expected[path.resolve()]["score"], rel=1e-5, abs=1e-5)
            assert answer["runtime"] == "onnx" and answer["overlay"] is None
    assert server.stopped_cleanly()


# -- bad input and abuse --------------------------------------------------------------------------------------
def bad_inputs(trained) -> dict[str, tuple[bytes, str, int]]:
    whole = screened_images(trained)[0].read_bytes()
    return {
        "empty body": (b"", "image/png", 400),
        "not an image": (b"hello, this is text and no image at all", "image/png", 422),
        "truncated PNG": (whole[: len(whole) // 2], "image/png", 422),
        "20000 x 20000 PNG": (png_bomb(), "image/png", 413),
        "wrong content type": (whole, "text/plain", 415),
        "JSON content type": (b'{"image": 1}', "application/json", 415),
    }


@pytest.mark.parametrize(
    "case",
    [
        "empty body",
        "not an image",
        "truncated PNG",
        "20000 x 20000 PNG",
        "wrong content type",
        "JSON content type",
    ],
)
def test_bad_input_gets_a_4xx_with_one_line_and_the_station_keeps_serving(station, trained, case):
    body, content_type, status = bad_inputs(trained)[case]
    if case == "20000 x 20000 PNG":
        assert len(body) < 200_000  # refused for its pixels, not its size on disk
    message = assert_one_line_error(station.post(body, content_type), status)
    if case == "20000 x 20000 PNG":
        assert "400 megapixels" in message and "max_megapixels" in message
    assert station.get("/health").status_code == 200
    good = station.post(screened_images(trained)[0].read_bytes())
    assert good.status_code == 200 and good.json()["decision"] in ("normal", "anomalous")


def test_a_form_without_a_file_is_refused(station):
    response = httpx.post(f"{station.url}/predict", data={"note": "no file here"}, files={}, timeout=60)
    # httpx sends a urlencoded body when there are no files: refused by its type; a form without a file too.
    assert_one_line_error(response, 415)
    boundary = "xyz"
    form = f'--{boundary}\r\nContent-Disposition: form-data; name="note"\r\n\r\nhello\r\n--{boundary}--\r\n'
    response = station.post(form.encode(), f"multipart/form-data; boundary={boundary}")
    assert "holds no file" in assert_one_line_error(response, 400)


def test_a_declared_oversized_body_is_refused_before_it_is_sent(station):
    head = (
        f"POST /predict HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: image/png\r\n"
        f"Content-Length: {100 * 2**20}\r\n\r\n"
    ).encode()
    status, body = raw_exchange(station.port, head)  # not one byte of the 100 MB is sent
    assert status == 413 and "max_upload_mb" in body["error"]
    assert station.get("/health").status_code == 200


def test_a_streamed_oversized_body_is_refused_before_it_ends(station):
    head = (
        f"POST /predict HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: image/png\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    piece = os.urandom(64 * 1024)
    chunks = [f"{len(piece):x}\r\n".encode() + piece + b"\r\n"] * (MAX_UPLOAD_MB * 16 + 2)
    # The body is never finished (no last chunk): an answer proves the station did not wait to read it whole.
    status, body = raw_exchange(station.port, head, chunks)
    assert status == 413 and "max_upload_mb" in body["error"]
    assert station.get("/health").status_code == 200


def test_unknown_paths_methods_and_queries_are_one_line_json(station):
    assert_one_line_error(station.get("/nothing-here"), 404)
    assert_one_line_error(station.get("/predict"), 405)
    assert_one_line_error(station.get("/history?limit=zero"), 422)
    assert_one_line_error(station.get("/overlays/..%2Faudit.sqlite"), 404)


# -- the audit log --------------------------------------------------------------------------------------------
def test_every_post_gets_one_audit_row_written_before_its_answer(station, trained):
    good = screened_images(trained)[0].read_bytes()
    before = audit_rows(station.folder, "SELECT COUNT(*) FROM requests")[0][0]
    requests = [
        (good, "image/png"),
        (b"", "image/png"),
        (good, "text/plain"),
        (b"nope", "image/png"),
        (good, "image/png"),
    ]
    answered = []
    for body, content_type in requests:
        response = station.post(body, content_type)
        request_id = response.headers["X-Request-Id"]
        # The row is there as soon as the answer is: it was committed first.
        [(status,)] = audit_rows(
            station.folder, "SELECT status FROM requests WHERE request_id = ?", request_id
        )
        assert status == response.status_code
        answered.append(request_id)
    after = audit_rows(station.folder, "SELECT COUNT(*) FROM requests")[0][0]
    assert after - before == len(requests) == len(set(answered))
    rows = audit_rows(
        station.folder,
        "SELECT decision, image_sha256, model_sha256, threshold, latency_ms, time FROM requests WHERE request_id = ?",
        answered[-1],
    )
    decision, image_sha256, model_sha256, threshold, latency_ms, when = rows[0]
    assert decision in ("normal", "anomalous") and image_sha256 == hashlib.sha256(good).hexdigest()
    assert model_sha256 == hashlib.sha256(trained.ckpt.read_bytes()).hexdigest()
    assert threshold > 0 and latency_ms > 0 and when.endswith("+00:00")
    assert audit_rows(station.folder, "PRAGMA journal_mode") == [("wal",)]


def test_history_pages_through_the_log_and_exports_csv(station, trained):
    for path in screened_images(trained)[:3]:
        assert station.post(path.read_bytes()).status_code == 200
    total = audit_rows(station.folder, "SELECT COUNT(*) FROM requests")[0][0]
    first = station.get("/history?limit=2").json()
    ids = [row["id"] for row in first["rows"]]
    assert len(ids) == 2 and ids[0] > ids[1] and first["next"] == f"/history?limit=2&before={ids[1]}"
    second = station.get(first["next"]).json()
    assert [row["id"] for row in second["rows"]] == [ids[1] - 1, ids[1] - 2]
    scored = next(row for row in first["rows"] if row["decision"] != "rejected")
    assert scored["overlay"] == f"/overlays/{scored['request_id']}.png"
    everything = station.get("/history?limit=1000").json()
    assert len(everything["rows"]) == total and everything["next"] is None
    export = station.get("/history?format=csv")
    assert export.status_code == 200 and export.headers["content-type"].startswith("text/csv")
    table = list(csv.DictReader(io.StringIO(export.text)))
    assert len(table) >= total and [int(row["id"]) for row in table[:total]] == sorted(
        row["id"] for row in everything["rows"]
    )
    assert {
        "time",
        "image_sha256",
        "input_path",
        "score",
        "decision",
        "threshold",
        "model_sha256",
        "latency_ms",
    } <= set(table[0])
    stats = station.get("/stats").json()
    scored_rows = audit_rows(station.folder, "SELECT decision, COUNT(*) FROM requests GROUP BY decision")
    assert stats["normal"] == dict(scored_rows).get("normal", 0)
    assert stats["anomalous"] == dict(scored_rows).get("anomalous", 0)
    assert sum(stats["histogram"]["counts"]) == stats["normal"] + stats["anomalous"]


def test_sigkill_during_load_loses_no_answered_request(trained, tmp_path, request):
    images = [path.read_bytes() for path in screened_images(trained)]
    server = StationProcess(trained.ckpt, tmp_path / "station", "batch.window_ms=5")
    request.addfinalizer(server.kill)  # whatever fails below, no station outlives the test
    server.start()
    answered: dict[str, str] = {}
    lock, stop = threading.Lock(), threading.Event()

    def client(offset: int) -> None:
        with httpx.Client(timeout=30) as http:
            index = offset
            while not stop.is_set():
                try:
                    response = http.post(
                        f"{server.url}/predict",
                        content=images[index % len(images)],
                        headers={"Content-Type": "image/png"},
                    )
                except httpx.HTTPError:
                    return  # the server is gone
                index += 1
                if response.status_code == 200:
                    with lock:
                        answered[response.json()["id"]] = response.json()["decision"]

    threads = [threading.Thread(target=client, args=(offset,)) for offset in range(4)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 120
    while len(answered) < 30 and time.monotonic() < deadline:
        time.sleep(0.05)
    server.kill()  # SIGKILL, in the middle of the load
    stop.set()
    for thread in threads:
        thread.join(60)
    assert server.process.returncode == -signal.SIGKILL and not port_open(server.port)
    assert len(answered) >= 30

    # The log opens cleanly, and every answered request is in it with the decision its client got.
    assert audit_rows(server.folder, "PRAGMA integrity_check") == [("ok",)]
    logged = dict(audit_rows(server.folder, "SELECT request_id, decision FROM requests"))
    assert {request_id: logged.get(request_id) for request_id in answered} == answered

    # The station starts again on the same folder and goes on appending.
    with server.start():
        assert server.post(images[0]).status_code == 200
        history = server.get("/history?limit=1000").json()["rows"]
        assert answered.keys() <= {row["request_id"] for row in history}
        stats = server.get("/stats").json()  # the page's counters start from the log, not from zero
        counted = dict(audit_rows(server.folder, "SELECT decision, COUNT(*) FROM requests GROUP BY decision"))
        assert stats["normal"] + stats["anomalous"] == counted.get("normal", 0) + counted.get("anomalous", 0)
    assert server.stopped_cleanly() and not port_open(server.port)
    assert audit_rows(server.folder, "PRAGMA integrity_check") == [("ok",)]
    assert len(audit_rows(server.folder, "SELECT id FROM requests")) == len(logged) + 1


# -- who may post -----------------------------------------------------------------------------------------------
def test_token_is_required_when_set(trained, tmp_path):
    token = "s3cret-token-for-the-test"
    image = screened_images(trained)[0].read_bytes()
    with StationProcess(trained.ckpt, tmp_path / "station", env={TOKEN_VARIABLE: token}) as server:
        missing = server.post(image)
        assert "bearer token" in assert_one_line_error(missing, 401)
        assert missing.headers["WWW-Authenticate"] == "Bearer"
        assert_one_line_error(server.post(image, headers={"Authorization": "Bearer wrong"}), 401)
        assert_one_line_error(server.post(image, headers={"Authorization": f"Basic {token}"}), 401)
        accepted = server.post(image, headers={"Authorization": f"Bearer {token}"})
        assert accepted.status_code == 200 and accepted.json()["decision"] in ("normal", "anomalous")
        assert server.get("/health").status_code == 200  # reads stay open
        statuses = [
            status for (status,) in audit_rows(server.folder, "SELECT status FROM requests ORDER BY id")
        ]
        assert statuses == [401, 401, 401, 200]
        assert "s3cret" not in (server.folder / "station.json").read_text()
    assert server.stopped_cleanly() and not port_open(server.port)


def test_without_a_token_only_loopback_clients_may_post(monkeypatch):
    for host in ("127.0.0.1", "127.0.0.2", "::1", "::ffff:127.0.0.1"):
        assert is_loopback(host)
        check_client(host, None, None)
    for host in ("10.0.0.7", "192.168.1.20", "2001:db8::1", "testclient", None):
        with pytest.raises(Refused) as refused:
            check_client(host, None, None)
        assert refused.value.status == 403 and TOKEN_VARIABLE in refused.value.message
    check_client("10.0.0.7", "Bearer abc123", "abc123")  # a token opens posting to other machines
    for authorization in (None, "Bearer abc124", "abc123", "Basic abc123"):
        with pytest.raises(Refused) as refused:
            check_client("127.0.0.1", authorization, "abc123")  # and is then required from loopback too
        assert refused.value.status == 401
    monkeypatch.setenv(TOKEN_VARIABLE, "from-the-environment")
    assert resolve_token(None) == "from-the-environment" and resolve_token("given") == "given"
    monkeypatch.delenv(TOKEN_VARIABLE)
    assert resolve_token(None) is None
    with pytest.raises(PatchAEError):
        resolve_token("has a space")


# -- the batcher and the command line -------------------------------------------------------------------------
def test_requests_arriving_together_are_scored_as_one_batch():
    sizes: list[int] = []

    def process(jobs):
        sizes.append(len(jobs))
        if "fail" in jobs:
            raise ValueError("this batch fails")
        return [job * 2 for job in jobs]

    batcher = DynamicBatcher(process, window_ms=300, max_size=4)
    assert asyncio.run(together(batcher, [1, 2, 3])) == [2, 4, 6] and sizes == [3]
    assert asyncio.run(together(batcher, [1, 2, 3, 4, 5, 6])) == [2, 4, 6, 8, 10, 12] and sizes[1:] == [4, 2]
    failed = asyncio.run(together(batcher, ["fail", 7]))
    assert all(isinstance(result, ValueError) for result in failed)
    assert asyncio.run(together(batcher, [8])) == [16]  # the worker goes on after a failed batch
    alone = DynamicBatcher(process, window_ms=0, max_size=1)  # batching off: every job alone
    assert asyncio.run(together(alone, [1, 2])) == [2, 4] and sizes[-2:] == [1, 1]
    batcher.stop()
    alone.stop()
    assert not batcher.worker.is_alive() and not alone.worker.is_alive()


async def together(batcher, jobs):
    """Submit all jobs at once, as concurrent requests do."""
    return await asyncio.gather(*(batcher.submit(job) for job in jobs), return_exceptions=True)


def test_serve_py_errors_are_one_line(trained, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    missing = subprocess.run(
        [sys.executable, str(REPO / "serve.py"), f"output={tmp_path / 'a'}"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert missing.returncode == 1 and missing.stderr.strip().splitlines()[-1].startswith(
        "error: ckpt= is required"
    )
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        busy = subprocess.run(
            [
                sys.executable,
                str(REPO / "serve.py"),
                f"ckpt={trained.ckpt}",
                f"output={tmp_path / 'b'}",
                f"host={HOST}",
                f"port={taken.getsockname()[1]}",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            cwd=tmp_path,
        )
    assert busy.returncode == 1
    assert "pick another: port=" in busy.stderr.strip().splitlines()[-1]
    assert free_port() > 0


def test_bench_serve_measures_a_station_and_counts_its_audit_rows(trained, tmp_path):
    from patchae.benchmarks.serve import ServeBenchConfig, format_results, run_benchmark

    results = run_benchmark(
        ServeBenchConfig(
            ckpt=str(trained.ckpt),
            images=str(trained.data_dir / "test"),
            requests=6,
            clients=2,
            warmup=2,
            runtimes=["torch"],
            batching=["on"],
            threads=1,
            baseline=False,
            folder=str(tmp_path / "bench"),
        )
    )
    [row] = results["rows"]
    assert row["errors"] == 0 and row["requests"] == 6 and row["images_per_second"] > 0
    assert row["audit_rows"] == row["responses"] == 8 and row["audit_integrity"] == "ok"
    assert row["latency_ms_p50"] <= row["latency_ms_p99"]
    table = format_results(results)
    assert "cores" in table and "8/8" in table
    with pytest.raises(PatchAEError, match="ckpt= is required"):
        run_benchmark(ServeBenchConfig())
