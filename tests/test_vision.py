"""The image encoder: EfficientNet-Lite0 with its real ImageNet weights, checked on scikit-image's photos."""
import base64
import io

import numpy as np
import pytest
import torch

from mmchat.errors import MMChatError
from mmchat.multimodal import vision

skdata = pytest.importorskip("skimage.data", reason="scikit-image (the 'test' extra) has the real photos")

CATS = {"tabby cat", "a cat having a striped coat", "Persian cat", "Siamese cat", "Egyptian Mau"}


@pytest.fixture(scope="module")
def photos():
    return {"chelsea": skdata.chelsea(), "coffee": skdata.coffee()}


def test_classifier_top1_on_real_photos(photos):
    grid, logits = vision.encode([photos["chelsea"], photos["coffee"]])
    assert grid.shape == (2, vision.FEATURES, vision.GRID, vision.GRID)  # the encoder's channels and cell colours
    assert (grid[:, vision.CHANNELS:].abs() <= 1).all()  # mean colours in [-1, 1]
    labels = vision.top_labels(logits, k=3)
    cat, coffee = labels[0][0][0], labels[1][0][0]
    assert cat in CATS, labels[0]
    assert coffee in {"espresso", "cup", "coffee mug", "tea cup"}, labels[1]
    assert labels[1][0][1] > 0.5  # a confident espresso: the weights and the preprocessing fit each other


def test_grid_is_what_the_classifier_pools(photos):
    enc = vision.load_encoder()
    x = vision.preprocess([photos["chelsea"]])  # (1, 3, 224, 224)
    assert x.shape == (1, 3, 224, 224) and -1.0 <= x.min() and x.max() <= 1.0
    with torch.inference_mode():
        grid, logits = enc(x)
        again = enc._fc(grid.mean(dim=(2, 3)))
    torch.testing.assert_close(logits, again)
    assert (grid >= 0).all() and (grid <= 6).all()  # after ReLU6


def test_the_same_image_from_every_kind_of_source(tmp_path, photos):
    from PIL import Image
    arr = photos["coffee"]
    path = tmp_path / "coffee.png"
    Image.fromarray(arr).save(path)
    raw = path.read_bytes()
    uri = "data:image/png;base64," + base64.b64encode(raw).decode()
    sources = [arr, str(path), raw, uri, Image.open(io.BytesIO(raw))]
    batch = vision.preprocess(sources)  # (5, 3, 224, 224)
    for i in range(1, len(sources)):
        torch.testing.assert_close(batch[i], batch[0])


@pytest.mark.parametrize("bad, message", [
    (b"\x89PNG\r\n\x1a\n" + b"garbage" * 20, "not a readable image"),
    ("data:image/png;base64,@@@notbase64", "not valid base64"),
    ("data:text/plain;base64,aGVsbG8=", "data:image/png;base64"),
    ("/nonexistent/cat.jpg", "no such image file"),
])
def test_bad_images_are_one_line_errors(bad, message):
    with pytest.raises(MMChatError, match=message) as e:
        vision.open_image(bad)
    assert "\n" not in str(e.value)


def test_truncated_jpeg_is_refused(photos):
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(photos["chelsea"]).save(buf, format="JPEG")
    with pytest.raises(MMChatError, match="not a readable image"):
        vision.open_image(buf.getvalue()[: len(buf.getvalue()) // 2])


def test_decompression_bomb_is_refused():
    from PIL import Image
    buf = io.BytesIO()
    Image.new("1", (9000, 9000)).save(buf, format="PNG")  # tiny file, 81 M pixels once decoded
    assert len(buf.getvalue()) < 100_000
    with pytest.raises(MMChatError, match="too many pixels"):
        vision.open_image(buf.getvalue())


def test_class_names():
    names = vision.imagenet_classes()
    assert len(names) == 1000 and names[281] == "tabby cat" and names[967] == "espresso"
    assert np.all([n.strip() == n and n for n in names])
