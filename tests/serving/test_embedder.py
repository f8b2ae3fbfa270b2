import io
import logging

import numpy as np
import onnx
import pytest
from PIL import Image
from serving_helpers import FEATURE_DIM, IMAGE_SIZE, random_images, write_images
from serving_helpers import tiny, embedder  # noqa: F401 (fixtures)

from instdisc.serving.embedder import CPU, CUDA, Embedder, ProviderError, cuda_driver_present, fit_image


def _cuda_works(path) -> bool:
    return cuda_driver_present() and Embedder(path, device="cuda").provider == CUDA


def test_cuda_request_on_a_cpu_host_is_reported_as_a_fallback(tiny, caplog):
    if _cuda_works(tiny.onnx_path):
        pytest.skip("CUDA works here: nothing falls back")
    with caplog.at_level(logging.WARNING, logger="instdisc.serving.embedder"):
        embedder = Embedder(tiny.onnx_path, device="cuda")
    assert (embedder.requested, embedder.provider, embedder.device) == (CUDA, CPU, "cpu")
    assert embedder.fell_back and not embedder.io_binding
    assert "CUDAExecutionProvider was requested" in caplog.text
    assert "activated CPUExecutionProvider" in caplog.text
    assert embedder.run(random_images(2)).shape == (2, FEATURE_DIM)  # and it still works


def test_strict_mode_fails_instead_of_falling_back(tiny):
    if _cuda_works(tiny.onnx_path):
        pytest.skip("CUDA works here: nothing falls back")
    with pytest.raises(ProviderError, match="CUDAExecutionProvider was requested for .* but "
                                            "onnxruntime activated CPUExecutionProvider"):
        Embedder(tiny.onnx_path, device="cuda", strict=True)


def test_cpu_and_auto_devices(tiny):
    cpu = Embedder(tiny.onnx_path, device="cpu", strict=True)
    assert (cpu.provider, cpu.fell_back, cpu.device) == (CPU, False, "cpu")
    auto = Embedder(tiny.onnx_path)  # CUDA only when a driver exists; otherwise no noisy attempt
    assert auto.requested == (CUDA if cuda_driver_present() else CPU)


def test_threading_defaults_and_override(tiny):
    options = Embedder(tiny.onnx_path, device="cpu", threads=1).session.get_session_options()
    assert options.intra_op_num_threads == 1 and options.inter_op_num_threads == 1
    options = Embedder(tiny.onnx_path, device="cpu").session.get_session_options()
    assert options.intra_op_num_threads == 0  # onnxruntime's default: one per physical core


def test_paths_bytes_pil_and_arrays_give_the_same_embedding(embedder, tmp_path):
    (path,) = write_images(tmp_path, 1)
    pixels = np.asarray(Image.open(path))
    expected = embedder.run(pixels[None])                                        # (1, D)
    for source in (path, str(path), path.read_bytes(), Image.open(path), pixels):
        np.testing.assert_array_equal(embedder.embed(source), expected)
    gray_rgba = [Image.fromarray(pixels).convert("L"), Image.fromarray(pixels).convert("RGBA")]
    assert embedder.embed(gray_rgba).shape == (2, FEATURE_DIM)


def test_batching_does_not_change_results(embedder):
    images = random_images(10)
    whole = Embedder(embedder.model_path, device="cpu", batch_size=10).embed(images)
    np.testing.assert_allclose(embedder.embed(images), whole, atol=1e-6)        # 3 runs of <= 4
    np.testing.assert_allclose(embedder.embed(list(images)), whole, atol=1e-6)


def test_io_binding_path_gives_the_same_result(tiny, embedder):
    bound = Embedder(tiny.onnx_path, device="cpu", io_binding=True)
    images = random_images(5)
    np.testing.assert_array_equal(bound.run(images), embedder.run(images))


def test_fit_image_matches_torchvision_eval_transform():
    from torchvision.transforms import CenterCrop, Compose, Resize

    image = Image.fromarray(random_images(1, size=64)[0]).resize((64, 48))
    for resize in (None, 36):
        ours = fit_image(image, (IMAGE_SIZE, IMAGE_SIZE), resize)
        theirs = Compose([Resize(resize or IMAGE_SIZE), CenterCrop(IMAGE_SIZE)])(image)
        assert ours.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and ours.dtype == np.uint8
        np.testing.assert_array_equal(ours, np.asarray(theirs))


@pytest.mark.parametrize("array, message", [
    (np.zeros((32, 32), np.uint8), r"shape \(32, 32\) \(rank 2\); expected uint8 RGB pixels"),
    (np.zeros((1, 1, 32, 32, 3), np.uint8), r"rank 5"),
    (np.zeros((32, 32, 3), np.float32), r"dtype float32; expected uint8.*astype\(np.uint8\)"),
    (np.zeros((3, 32, 32), np.uint8), r"has 32 channels .*channels-first\?"),
    (np.zeros((2, 32, 32, 4), np.uint8), r"has 4 channels in shape \(2, 32, 32, 4\)"),
    (np.zeros((16, 16, 3), np.uint8), r"size 16x16; the model expects 32x32: pass a file path"),
])
def test_bad_arrays_are_rejected_with_a_clear_message(embedder, array, message):
    with pytest.raises(ValueError, match=message):
        embedder.embed(array)


def test_bad_arguments_and_files(tiny, embedder, tmp_path):
    with pytest.raises(ValueError, match="device = 'gpu': allowed auto, cpu, cuda"):
        Embedder(tiny.onnx_path, device="gpu")
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        Embedder(tmp_path / "missing.onnx")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ValueError, match="cannot read image '.*broken.jpg'"):
        embedder.embed([broken])
    with pytest.raises(ValueError, match="cannot read image '.*nothing.png'"):
        embedder.embed(tmp_path / "nothing.png")
    with pytest.raises(ValueError, match="cannot read image '<bytes>'"):
        embedder.embed(io.BytesIO(b"abc").getvalue())


def test_a_foreign_onnx_model_is_rejected(tiny, tmp_path):
    model = onnx.load(str(tiny.onnx_path))
    del model.metadata_props[:]
    onnx.save(model, str(tmp_path / "foreign.onnx"))
    with pytest.raises(ValueError, match=r"no instdisc metadata keys \['feature_dim'"):
        Embedder(tmp_path / "foreign.onnx", device="cpu")


@pytest.mark.gpu
def test_cuda_session_uses_io_binding_and_matches_the_cpu(tiny):
    if not cuda_driver_present():
        pytest.skip("no NVIDIA driver on this host")
    gpu = Embedder(tiny.onnx_path, device="cuda", strict=True)
    assert (gpu.provider, gpu.device, gpu.io_binding) == (CUDA, "cuda", True)
    images = random_images(7)
    expected = Embedder(tiny.onnx_path, device="cpu").run(images)
    np.testing.assert_allclose(gpu.run(images), expected, atol=1e-4)
